"""Japanese VQA: MeCab ROUGE-L scoring, data layouts, the evaluator on tiny LLaVA models, and a
tiny EvoVLM-JP-style evolve (LLaVA-NeXT language model x a text Mistral of smaller vocabulary).

Scores are checked against rouge_score and an LCS written here, both run directly on MeCab
tokens; images are real PIL images made in code; models are built in code (tests/tiny.py).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import load_evaluator
from evomerge.evaluators.ja_rouge import (
    mecab_tokens,
    normalize_ja,
    rouge_l,
    score_file,
    score_pairs,
)
from evomerge.evaluators.ja_vqa import JaVQAEvaluator, format_prompt, load_examples
from tests.reference import raw_vlm
from tests.tiny import VLM_TEXT_VOCAB, make_vlm_family

V = VLM_TEXT_VOCAB

# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("ＡＢＣ　１２３！", "ABC 123!"),                       # full-width letters, digits, space
    ("ﾊﾝｶｸｶﾅ", "ハンカクカナ"),                             # half-width katakana
    ("検索 エンジン", "検索エンジン"),                      # space between Japanese removed
    ("アルゴリズム C と B", "アルゴリズムCとB"),             # Japanese / ASCII boundary
    ("  Natural   Language\nProcessing ", "Natural Language Processing"),
    ("　　ＰＲＭＬ　　副　読　本　　", "PRML副読本"),
    ("ウェーーーーイ", "ウェーイ"),                          # long vowels collapsed
    ("チルダ~∼〜～削除", "チルダ削除"),                      # tildes dropped
    ("ハイフン‐‑–−", "ハイフン-"),
    ("犬です🐶😀👍🏽🇯🇵!", "犬です!"),                       # emoji, skin tone, flag removed
    ("", ""),
])
def test_normalize_ja(raw: str, expected: str) -> None:
    assert normalize_ja(raw) == expected


def test_mecab_tokens_are_wakati_surfaces_of_normalised_text() -> None:
    from fugashi import Tagger

    text = "ＴＶの 前に 白い犬が２匹います😀"
    assert mecab_tokens(text) == Tagger("-Owakati").parse("TVの前に白い犬が2匹います").split()
    assert mecab_tokens("   ") == []


# Held-back pairs (prediction, reference), already normalised, not used to write the code.
HELD_BACK = [
    ("白い犬が座っています", "白い犬"),
    ("2匹の猫", "猫が2匹"),
    ("青い空と白い雲が見えます。", "空は青い"),
    ("男性がテニスをしています", "テニス"),
    ("赤いバスが道路を走っている", "赤いバスが走っています"),
    ("木のテーブルの上にピザがある", "テーブルの上"),
    ("わかりません", "晴れ"),
    ("信号機は赤です", "赤"),
    ("この写真は東京タワーを写しています", "東京タワー"),
    ("電車が駅に止まっている", "駅に止まっている電車"),
    ("三人の子供が公園で遊んでいます", "子供たちが遊んでいる"),
    ("黄色い花", "黄色い花"),
]


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_matches_rouge_score_and_lcs_on_mecab_tokens() -> None:
    from fugashi import Tagger
    from rouge_score import rouge_scorer

    tagger = Tagger("-Owakati")

    class Whitespace:
        def tokenize(self, text: str) -> list[str]:
            return text.split()

    direct = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    want_rouge, want_lcs = [], []
    for pred, ref in HELD_BACK:
        p, r = tagger.parse(pred).split(), tagger.parse(ref).split()
        want_rouge.append(direct.score(" ".join(r), " ".join(p))["rougeL"].fmeasure * 100)
        lcs = _lcs(p, r)
        want_lcs.append(0.0 if lcs == 0 else 200 * lcs / (len(p) + len(r)))
        assert rouge_l(pred, ref) == pytest.approx(want_rouge[-1], abs=1e-9)
    got = score_pairs([{"prediction": p, "reference": r} for p, r in HELD_BACK])
    assert got["n"] == len(HELD_BACK)
    assert abs(got["rougeL"] - sum(want_rouge) / len(want_rouge)) < 0.01
    assert abs(got["rougeL"] - sum(want_lcs) / len(want_lcs)) < 0.01
    assert 0 < got["rougeL"] < 100


def test_non_japanese_prediction_scores_as_empty() -> None:
    assert rouge_l("white dog 犬", "白い犬") == 0.0          # mostly Latin letters: not Japanese
    assert rouge_l("white dog 犬", "白い犬", require_japanese=False) > 0
    assert rouge_l("黒い犬 dog", "白い犬") > 0               # half the letters kana/kanji: Japanese
    assert rouge_l("123", "2つ") == 0.0                      # no letters: not Japanese
    assert rouge_l("a white dog", "white dog") == pytest.approx(80.0)  # English reference: no rule
    assert score_pairs([{"prediction": "A cat.", "reference": "猫"},
                        {"prediction": "猫", "reference": "猫"}]) == {"rougeL": 50.0, "n": 2}
    assert score_pairs([]) == {"rougeL": 0.0, "n": 0}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def test_score_file_and_cli(tmp_path: Path) -> None:
    rows = [{"prediction": p, "reference": r} for p, r in HELD_BACK] + [
        {"prediction": "A yellow flower.", "reference": "黄色い花"}]
    path = _write_jsonl(tmp_path / "preds.jsonl", rows)
    expected = score_pairs(rows)
    assert score_file(path) == expected
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "score", "ja-rouge", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["n"] == len(rows)
    assert printed["rougeL"] == pytest.approx(expected["rougeL"], abs=1e-9)

    bad = _write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prediction": "犬"}])
    with pytest.raises(EvomergeError, match=r"bad.jsonl:2: missing field 'reference'"):
        score_file(bad)
    broken = _write_jsonl(tmp_path / "broken.jsonl", [rows[0], "", "{not json"])
    with pytest.raises(EvomergeError, match=r"broken.jsonl:3"):
        score_file(broken)
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "score", "ja-rouge", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "bad.jsonl:2" in out.stderr


# --------------------------------------------------------------------------------------------
# Data layouts
# --------------------------------------------------------------------------------------------


def image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_data_layouts(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ims = [image(i, (40 + 8 * i, 48)) for i in range(3)]
    # JA-VG-VQA-500: image (datasets' {"bytes", "path"} struct) + qas list; the first pair counts.
    vg = [{"image": {"bytes": png_bytes(im), "path": None}, "image_id": i,
           "qas": [{"question": f"質問{i}", "answer": f"答え{i}", "qa_id": 1},
                   {"question": "他", "answer": "他", "qa_id": 2}]} for i, im in enumerate(ims)]
    pq.write_table(pa.Table.from_pylist(vg), tmp_path / "vg.parquet")
    got = load_examples({"data": {"path": str(tmp_path / "vg.parquet")}, "offset": 1, "limit": 1})
    assert [(e["question"], e["answer"]) for e in got] == [("質問1", "答え1")]
    assert np.array_equal(np.asarray(got[0]["image"]), np.asarray(ims[1]))

    # In-the-Wild: image, question, answer (image as raw bytes here)
    wild = [{"image": png_bytes(im), "question": f"これは何？{i}", "answer": f"犬{i}"}
            for i, im in enumerate(ims)]
    pq.write_table(pa.Table.from_pylist(wild), tmp_path / "wild.parquet")
    got = load_examples({"path": str(tmp_path / "wild.parquet")})
    assert [e["answer"] for e in got] == ["犬0", "犬1", "犬2"]
    assert all(e["image"].mode == "RGB" for e in got)

    # Local JSONL with image paths relative to the file, and field mapping.
    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(ims):
        im.convert("L").save(tmp_path / "imgs" / f"{i}.png")  # grey: converted to RGB
    local = _write_jsonl(tmp_path / "local.jsonl", [
        {"file": f"imgs/{i}.png", "q": f"色は？{i}", "a": "白"} for i in range(3)])
    spec = {"data": str(local), "image_field": "file", "question_field": "q", "answer_field": "a"}
    got = load_examples(spec)
    assert len(got) == 3 and got[2]["question"] == "色は？2" and got[0]["image"].mode == "RGB"
    assert got[1]["image"].size == (48, 48)

    with pytest.raises(EvomergeError, match=r"row 1: missing image field 'image'"):
        load_examples({"data": str(local), "question_field": "q", "answer_field": "a"})
    with pytest.raises(EvomergeError, match=r"row 1: missing question field 'question'"):
        load_examples({"data": str(local)})
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"image": "nope.png", "question": "q", "answer": "a"}])
    with pytest.raises(EvomergeError, match=r"missing.jsonl: row 1: image: image file 'nope.png' does not exist"):
        load_examples({"data": str(missing)})


def test_format_prompt() -> None:
    assert format_prompt("何色？", "USER: <image>\n{question} ASSISTANT:") == "USER: <image>\n何色？ ASSISTANT:"
    assert format_prompt("何色？", "Q: {question}\nA:") == "Q: <image>\n何色？\nA:"
    assert format_prompt("x", "<image> {question}", image_token="<img>") == "<img> x"
    with pytest.raises(EvomergeError, match=r"\{question\}"):
        format_prompt("x", "no placeholder")


# --------------------------------------------------------------------------------------------
# The evaluator on tiny LLaVA / LLaVA-NeXT
# --------------------------------------------------------------------------------------------


def vqa_file(root: Path, references: list[str] | None = None, n: int = 3) -> Path:
    """A local JSONL set of ``n`` real images (of different sizes) with questions and answers."""
    (root / "imgs").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        image(10 + i, (40 + 8 * i, 48 - 8 * (i % 2))).save(root / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "question": f"ab{'c' * i}?",
                     "answer": references[i] if references else "たす"})
    return _write_jsonl(root / "vqa.jsonl", rows)


GEN = {"num_beams": 2, "repetition_penalty": 1.5, "max_new_tokens": 5}


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_evaluator_end_to_end(tmp_path: Path, kind: str) -> None:
    from transformers import AutoModelForImageTextToText

    paths = make_vlm_family(tmp_path, kind=kind, seed=1)
    model = AutoModelForImageTextToText.from_pretrained(paths["vlm"]).eval()
    data = vqa_file(tmp_path)
    spec = {"kind": "ja_vqa", "data": {"path": str(data)}, **GEN, "batch_size": 2}
    evaluator = load_evaluator(spec, tokenizer_source=paths["vlm"])
    assert isinstance(evaluator, JaVQAEvaluator)
    assert evaluator.prompts[0] == "USER: <image>\nab? ASSISTANT:"  # no chat template: plain
    first = evaluator(model)
    assert first.metrics["n"] == 3 and len(first.items) == 3
    outputs = [it["output"] for it in first.items]
    assert all(outputs), outputs
    assert set(first.items[0]) >= {"prompt", "output", "reference", "rougeL", "correct"}

    # batching (left padding, images of different sizes) does not change the answers
    one = JaVQAEvaluator({**spec, "batch_size": 1}, paths["vlm"])
    assert [it["output"] for it in one(model).items] == outputs

    # the model's own answers as references: ROUGE-L 100 (same text, so the same language)
    (tmp_path / "own").mkdir()
    own = vqa_file(tmp_path / "own", outputs)
    again = JaVQAEvaluator({**spec, "data": str(own)}, paths["vlm"])(model)
    assert [it["output"] for it in again.items] == outputs
    assert [it["rougeL"] for it in again.items] == pytest.approx([100.0] * 3)
    assert again.score == pytest.approx(100.0) and again.metrics["rougeL_any"] == pytest.approx(100.0)
    assert all(it["correct"] for it in again.items)


def test_evaluator_uses_the_chat_template(tmp_path: Path) -> None:
    from transformers import AutoProcessor

    paths = make_vlm_family(tmp_path, kind="llava", seed=2)
    processor = AutoProcessor.from_pretrained(paths["vlm"])
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    data = vqa_file(tmp_path)
    evaluator = JaVQAEvaluator({"data": str(data), **GEN}, processor=processor)
    assert evaluator.prompts[1] == "user:<image>\nabc?\nassistant:"
    sakana = JaVQAEvaluator({"data": str(data), **GEN, "prompt": "ja-shisa-vqa"}, processor=processor)
    assert sakana.prompts[0].startswith("[INST] <<SYS>>\n") and sakana.prompts[0].endswith("<image>\nab? [/INST]")
    with pytest.raises(EvomergeError, match="no chat template"):
        JaVQAEvaluator({"data": str(data), "prompt": "chat"}, paths["vlm"])


# --------------------------------------------------------------------------------------------
# A tiny EvoVLM-JP
# --------------------------------------------------------------------------------------------


def test_tiny_evovlm_evolve_export_reload(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from evomerge.pipelines.evolve import Evolution

    paths = make_vlm_family(tmp_path / "models", kind="llava_next", layout="legacy", seed=4)
    vlm_model = AutoModelForImageTextToText.from_pretrained(paths["vlm"]).eval()
    # References: the source VLM's own answers, so merges near it score higher (a real signal).
    probe = JaVQAEvaluator({"data": str(vqa_file(tmp_path)), **GEN}, paths["vlm"])
    refs = [it["output"] for it in probe(vlm_model).items]
    data = vqa_file(tmp_path, refs)
    recipe = {
        "name": "tiny-evovlm", "modality": "vlm", "base": str(paths["base"]), "dtype": "float32",
        "models": [{"model": str(paths["vlm"]), "name": "llava"},
                   {"model": str(paths["text"]), "name": "shisa"}],
        "merge": {"method": "task_arithmetic", "search": {"weight": [0, 1]}, "granularity": "per_source"},
        "evaluator": {"kind": "ja_vqa", "data": {"path": str(data)}, **GEN, "batch_size": 3,
                      "require_japanese": False},
        "baselines": [{"name": "llava", "source": "llava"}],
        "search": {"sampler": "cmaes", "trials": 4}, "seed": 0,
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    evo = Evolution(recipe_path, run_dir=tmp_path / "run")
    outcome = evo.run(export_best=True, show_progress=False)
    run = tmp_path / "run"
    assert len(list((run / "trials").glob("*.json"))) == 4
    assert json.loads((run / "baselines.json").read_text())["llava"]["score"] == pytest.approx(100.0)
    assert set(outcome.best_values) == {"llava/weight", "shisa/weight"}
    best = json.loads((run / "best.json").read_text())

    # The exported VLM reloads with the stock classes, answers from an image, and reproduces
    # the best trial's score.
    out = run / "best"
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=image(0), text="USER: <image>\nab? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    exported = JaVQAEvaluator(recipe["evaluator"], out)(model)
    assert exported.score == pytest.approx(best["score"], abs=1e-6)

    # Vision tower, projector and image_newline bit-identical to the source VLM's; shared
    # embedding / lm_head rows merged by task arithmetic; the VLM's extra rows kept.
    merged, vlm = raw_vlm(out), raw_vlm(paths["vlm"])
    base, text = load_file(paths["base"] / "model.safetensors"), load_file(paths["text"] / "model.safetensors")
    assert set(merged) == set(vlm)
    kept = [k for k in vlm if k.startswith(("vision_tower.", "multi_modal_projector.", "image_newline"))]
    assert any(k.startswith("vision_tower.") for k in kept) and "image_newline" in kept
    assert any(k.startswith("multi_modal_projector.") for k in kept)
    for k in kept:
        assert torch.equal(merged[k], vlm[k]), k
    w_vlm, w_text = outcome.best_values["llava/weight"], outcome.best_values["shisa/weight"]

    def expected(v: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return b + w_vlm * (v - b) + w_text * (t - b)

    for legacy, plain in (("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
                          ("language_model.lm_head.weight", "lm_head.weight")):
        got, src = merged[legacy], vlm[legacy]
        assert src.shape[0] > V and got.shape == src.shape
        torch.testing.assert_close(got[:V], expected(src[:V], base[plain], text[plain]), rtol=0, atol=1e-5)
        assert not torch.equal(got[:V], src[:V])
        assert torch.equal(got[V:], src[V:])
    layer = "layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged["language_model.model." + layer],
                               expected(vlm["language_model.model." + layer], base["model." + layer],
                                        text["model." + layer]), rtol=0, atol=1e-5)


def test_evovlm_recipe_loads() -> None:
    from evomerge.evaluators.base import EVALUATORS
    from evomerge.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "evovlm-jp.yaml")
    assert recipe.modality == "vlm" and recipe.base == "mistralai/Mistral-7B-v0.1"
    assert [m.model for m in recipe.models] == ["llava-hf/llava-v1.6-mistral-7b-hf", "augmxnt/shisa-gamma-7b-v1"]
    ev = recipe.evaluator
    assert ev["kind"] in EVALUATORS and ev["data"]["hub"] == "SakanaAI/JA-VG-VQA-500"
    assert (ev["num_beams"], ev["repetition_penalty"], ev["max_new_tokens"]) == (5, 1.5, 512)
