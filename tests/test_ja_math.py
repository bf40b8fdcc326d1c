"""Japanese math evaluator: answer extraction, language check, scoring files, data, generation."""

from __future__ import annotations

import json
import textwrap
import types
from pathlib import Path

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import EVALUATORS, Evaluator, Result, load_evaluator
from evomerge.evaluators.ja_math import (
    DEFAULT_PROMPT,
    DEFAULT_STOP,
    JaMathEvaluator,
    extract_answer,
    format_prompt,
    is_correct,
    load_problems,
    score_file,
    score_responses,
    truncate_at_stop,
)
from evomerge.evaluators.langid import JapaneseDetector, is_japanese

# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text, expected", [
    ("答えは１２３です", 123.0),            # full-width digits
    ("1,000", 1000.0),                      # thousands separator, not "000"
    ("１，０００円になります。", 1000.0),    # full-width digits and comma
    ("合計は12,345,678個", 12345678.0),
    ("$1,234.50 spent", 1234.5),
    ("半分は3.5です", 3.5),
    ("答えは 3.5。", 3.5),                    # sentence-final period is not a decimal point
    ("気温は-4度です", -4.0),
    ("気温は－４度です", -4.0),               # full-width minus
    ("温度は\u22124度", -4.0),               # U+2212 minus sign
    ("10-4=6", 6.0),                         # hyphen between digits is not a minus
    ("5-3", 3.0),
    ("答えは .5 です", 0.5),
    ("2,5", 5.0),                            # not a thousands pattern: last number
    ("1,0000", 0.0),                         # four digits after the comma: not a separator
    ("まず 12 + 6 = 18 です。次に 18 × 2 = 36。答えは36です。", 36.0),
    ("数字はありません", None),
    ("", None),
    ("The answer is 18.", 18.0),
    ("#### 72", 72.0),
])
def test_extract_answer(text, expected):
    got = extract_answer(text)
    assert got == expected, (text, got)


def test_is_correct_tolerates_types():
    assert is_correct("答えは18です", 18)
    assert is_correct("答えは18です", 18.0)
    assert is_correct("答えは18.0です", "18")
    assert is_correct("合計は1,000円", "1,000")
    assert is_correct("...", "Natalia sold 48/2 = 24 clips ... #### 72") is False
    assert is_correct("答えは72", "Natalia sold 48/2 = 24 clips in May.\n#### 72")
    assert not is_correct("答えは17です", 18)
    assert not is_correct("わかりません", 18)
    assert not is_correct("18", None)


# ------------------------------------------------------------------ language


@pytest.mark.parametrize("text, expected", [
    ("答えは１２３です", True),
    ("まず、りんごは3個あります。3 + 5 = 8 なので、答えは8個です。", True),
    ("The answer is 18.", False),
    ("18 + 6 = 24", False),                  # no letters at all
    ("", False),
    ("ＡＢＣ答え", False),                    # 3 Latin vs 2 kanji/kana letters
    ("So 答えは 18", True),                   # 2 Latin letters vs 3 Japanese: 0.6
    ("カタカナとひらがなと漢字", True),
    ("ｶﾀｶﾅ", True),                          # half-width katakana
])
def test_is_japanese(text, expected):
    assert is_japanese(text) is expected


def test_is_japanese_threshold():
    text = "ab答え"  # exactly half
    assert is_japanese(text, threshold=0.5)
    assert not is_japanese(text, threshold=0.51)


def test_detector_defaults_to_characters_and_rejects_missing_model(tmp_path):
    detector = JapaneseDetector()
    assert detector.method == "characters"
    assert detector("答えは8です") and not detector("the answer is 8")
    with pytest.raises(EvomergeError, match="lid.176"):
        JapaneseDetector(tmp_path / "lid.176.bin")


# ------------------------------------------------------------------ scoring

RECORDS = [
    {"response": "答えは１２３です", "answer": 123},                          # correct, ja
    {"response": "１，０００円になります。", "answer": "1000"},               # correct, ja
    {"response": "The total is 1,000 apples, so the answer is 18.", "answer": 18},  # correct, English
    {"response": "まず 12 + 6 = 18 です。答えは18です。", "answer": 18.0},    # correct, ja (mixed)
    {"response": "わかりません", "answer": 5},                                 # no number
    {"response": "答えは3.5です", "answer": 4},                                # wrong
]


def test_score_responses():
    scores = score_responses(RECORDS)
    assert scores["n"] == 6
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["accuracy_ja"] == pytest.approx(3 / 6)
    assert score_responses([]) == {"accuracy": 0.0, "accuracy_ja": 0.0, "n": 0}


def test_score_file(tmp_path):
    path = tmp_path / "outputs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n",
                    encoding="utf-8")
    assert score_file(path) == score_responses(RECORDS)
    # the evaluator's own items (field "output") re-score too
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"output": "答えは8です", "answer": 8}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert score_file(items) == {"accuracy": 1.0, "accuracy_ja": 1.0, "n": 1}


@pytest.mark.parametrize("content, match", [
    ('{"response": "答えは1", "answer": 1}\n{"response": "x", "answer"\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"response": "答えは1", "answer": 1}\n\n{"answer": 3}\n', r"bad\.jsonl:3: missing field 'response'"),
    ('{"response": "答えは1"}\n', r"bad\.jsonl:1: missing field 'answer'"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
])
def test_score_file_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EvomergeError, match=match):
        score_file(path)


def test_score_file_missing(tmp_path):
    with pytest.raises(EvomergeError, match="no such file"):
        score_file(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ data


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


MGSM_ROWS = [{"question": f"q{i}", "answer": None, "answer_number": i * 10,
              "equation_solution": None} for i in range(6)]


def test_load_problems_jsonl_mgsm_layout(tmp_path):
    path = write_jsonl(tmp_path / "mgsm.jsonl", MGSM_ROWS)
    problems = load_problems({"path": str(path)})
    assert problems[:2] == [{"question": "q0", "answer": 0}, {"question": "q1", "answer": 10}]
    assert len(problems) == 6
    assert load_problems({"path": str(path), "limit": 2, "offset": 3}) == [
        {"question": "q3", "answer": 30}, {"question": "q4", "answer": 40}]
    # an evaluator spec with a data block and a top-level limit
    assert len(load_problems({"kind": "ja_math", "data": {"path": str(path)}, "limit": 4})) == 4


def test_load_problems_gsm8k_answers_and_mapping(tmp_path):
    rows = [{"instruction": "問題1", "output": "48/2 = 24\n#### 1,024"},
            {"instruction": "問題2", "output": "#### 3.5"}]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    problems = load_problems({"path": str(path), "question_field": "instruction",
                              "answer_field": "output"})
    assert problems == [{"question": "問題1", "answer": 1024}, {"question": "問題2", "answer": 3.5}]


def test_load_problems_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,problem,solution\n1,りんごは何個?,12\n2,みかんは?,\"1,500\"\n3,x,7\n",
                    encoding="utf-8")
    problems = load_problems({"path": str(path), "question_field": "problem",
                              "answer_field": "solution", "limit": 2})
    assert problems == [{"question": "りんごは何個?", "answer": 12},
                        {"question": "みかんは?", "answer": 1500}]


def test_load_problems_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(MGSM_ROWS[:3]), path)
    assert [p["answer"] for p in load_problems({"path": str(path)})] == [0, 10, 20]


def test_load_problems_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "x", "answer": 1}])
    with pytest.raises(EvomergeError, match=r"row 1: missing question field 'question'.*fields: q"):
        load_problems({"path": str(path)})
    with pytest.raises(EvomergeError, match="missing answer field 'ans'"):
        load_problems({"path": str(path), "question_field": "q", "answer_field": "ans"})
    bad = write_jsonl(tmp_path / "n.jsonl", [{"question": "x", "answer": "わからない"}])
    with pytest.raises(EvomergeError, match="has no number"):
        load_problems({"path": str(bad)})
    with pytest.raises(EvomergeError, match="does not exist"):
        load_problems({"path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(EvomergeError, match="no problems"):
        load_problems({"path": str(path), "question_field": "q", "offset": 5})
    with pytest.raises(EvomergeError, match="give 'path'"):
        load_problems({})


def test_prompt_and_stop():
    prompt = format_prompt("1+1は?")
    assert "1+1は?" in prompt and "日本語" in prompt and prompt.endswith("一歩一歩考えましょう。")
    assert "{question}" in DEFAULT_PROMPT
    assert format_prompt("a{b}", '{"q": "{question}"}') == '{"q": "a{b}"}'
    assert format_prompt("x", "Q: {question} {not_a_field}") == "Q: x {not_a_field}"
    with pytest.raises(EvomergeError, match="question"):
        format_prompt("x", "no placeholder")
    assert truncate_at_stop("答えは8です。\n\n### 指示:\n次の問題", DEFAULT_STOP) == "答えは8です。\n\n"
    assert truncate_at_stop("A ### Response B ### Instruction", DEFAULT_STOP) == "A "
    assert truncate_at_stop("no stop", DEFAULT_STOP) == "no stop"


# ------------------------------------------------------------------ the evaluator


@pytest.fixture()
def problems_file(tmp_path) -> Path:
    rows = [{"question": q, "answer_number": a} for q, a in
            [("1+1=?", 2), ("abc?", 8), ("2+3=?", 5), ("x", 8), ("9?", 9)]]
    return write_jsonl(tmp_path / "problems.jsonl", rows)


@pytest.fixture(scope="module")
def tiny_lm(llama_fp32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_fp32["m1"]).eval()


def test_evaluator_on_tiny_model(llama_fp32, tiny_lm, problems_file):
    spec = {"kind": "ja_math", "data": {"path": str(problems_file)}, "max_new_tokens": 6,
            "batch_size": 3, "prompt": "{question} ", "stop": []}
    evaluator = load_evaluator(spec, tokenizer_source=llama_fp32["m1"])
    assert isinstance(evaluator, Evaluator) and evaluator.name == "ja_math"
    assert evaluator.tokenizer.padding_side == "left"
    result = evaluator(tiny_lm)
    assert isinstance(result, Result)
    assert result.metrics["n"] == 5 and len(result.items) == 5
    assert set(result.items[0]) >= {"prompt", "output", "answer", "predicted", "correct", "japanese"}
    assert [it["answer"] for it in result.items] == [2, 8, 5, 8, 9]  # data order kept
    assert result.score == result.metrics["accuracy_ja"]
    assert any(it["output"] for it in result.items)

    # batching with left padding gives what one-at-a-time gives
    single = JaMathEvaluator({**spec, "batch_size": 1}, llama_fp32["m1"])(tiny_lm)
    assert [it["output"] for it in single.items] == [it["output"] for it in result.items]

    # a stop string cuts the output where it first occurs (greedy: the prefix is unchanged)
    text = next(it["output"] for it in result.items if len(it["output"].replace(" ", "")) > 1)
    stop = text.replace(" ", "")[1]
    stopped = JaMathEvaluator({**spec, "stop": [stop]}, llama_fp32["m1"])(tiny_lm)
    for full, cut in zip(result.items, stopped.items, strict=True):
        assert cut["output"] == truncate_at_stop(full["output"], [stop])
    assert any(len(c["output"]) < len(f["output"]) for f, c in zip(result.items, stopped.items, strict=True))


def hf_greedy(model, tok, texts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers' own greedy generate, one prompt at a time (no padding)."""
    out = []
    for text in texts:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def test_sequences_stop_on_their_own_and_match_generate(tiny_lm, problems_file):
    """Each sequence ends at its stop string or end marker and leaves the batch; the tokens it
    got are transformers' greedy ones, and its text is decode-then-truncate of them."""
    from tiny import tiny_tokenizer
    from tokenizers import decoders

    tok = tiny_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # decode without spaces between tokens
    spec = {"data": {"path": str(problems_file)}, "max_new_tokens": 12, "batch_size": 5,
            "prompt": "{question} ", "stop": []}
    evaluator = JaMathEvaluator(spec, tokenizer=tok)
    full = evaluator(tiny_lm)
    reference = hf_greedy(tiny_lm, tok, evaluator.inputs, 12)
    decoded = [tok.decode(r, skip_special_tokens=True) for r in reference]
    assert [it["output"] for it in full.items] == decoded
    produced = sum(len(r) for r in reference)  # generate pads nothing for a single prompt
    assert full.metrics["generated_tokens"] == produced and full.metrics["generate_seconds"] > 0

    stop = next(it["output"][2] for it in full.items if len(it["output"]) > 2)
    rows: list[int] = []  # batch size of every forward pass
    hook = tiny_lm.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        stopped = JaMathEvaluator({**spec, "stop": [stop]}, tokenizer=tok)(tiny_lm)
    finally:
        hook.remove()
    for f, c in zip(full.items, stopped.items, strict=True):
        assert c["output"] == truncate_at_stop(f["output"], [stop])
    # rows that hit the stop string left the batch: later passes ran on fewer rows
    hit = sum(stop in f["output"] for f in full.items)
    assert 0 < hit < 5 and rows[0] == 5 and min(rows) <= 5 - hit and rows == sorted(rows, reverse=True)
    assert stopped.metrics["generated_tokens"] < full.metrics["generated_tokens"]


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose greedy continuation is always ``reply`` then the end marker:
    its logits put all weight on the next scripted token (the same for every row)."""

    def __init__(self, tokenizer, reply: str):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.vocab = max(len(tokenizer), max(self.script) + 1)
        self.calls: list[int] = []  # batch size of each prefill
        self.rows: list[int] = []   # batch size of every forward

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None, **kwargs):
        assert (attention_mask[:, -1] == 1).all(), "padding must be on the left"
        if input_ids.shape[1] > 1 or not self.rows:
            self.calls.append(input_ids.shape[0])
            self.step = 0
        self.rows.append(input_ids.shape[0])
        token = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, token] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_evaluator_scores_japanese_and_english(llama_fp32, problems_file):
    from tiny import tiny_tokenizer

    spec = {"kind": "ja_math", "data": {"path": str(problems_file)}, "batch_size": 2}
    tok = tiny_tokenizer()
    evaluator = JaMathEvaluator(spec, tokenizer=tok)
    ja = ScriptedLM(tok, "こたえは8です。")
    result = evaluator(ja)
    assert ja.calls == [2, 2, 1]
    assert {k: result.metrics[k] for k in ("accuracy", "accuracy_ja", "n")} == {
        "accuracy": 0.4, "accuracy_ja": 0.4, "n": 5.0}
    assert result.metrics["accuracy_ja_robust"] == 0.4  # the default metric, under its own name
    # every row produced the reply and the end marker: 3 prefills of 2, 2, 1 rows
    assert result.metrics["generated_tokens"] == 5 * len(ja.script)
    assert result.score == 0.4
    assert [it["correct"] for it in result.items] == [False, True, False, True, False]
    assert all(it["japanese"] for it in result.items)
    assert result.items[1]["predicted"] == 8

    en = evaluator(ScriptedLM(tok, "the answer is 8"))
    assert en.metrics["accuracy"] == 0.4 and en.metrics["accuracy_ja"] == 0.0 and en.score == 0.0
    assert not any(it["japanese"] for it in en.items)
    lenient = JaMathEvaluator({**spec, "require_japanese": False}, tokenizer=tok)
    assert lenient(ScriptedLM(tok, "the answer is 8")).score == 0.4

    # a stop string cuts a run-on response before it reads the next "question"
    run_on = ScriptedLM(tok, "こたえは8です。9")
    assert evaluator(run_on).metrics["accuracy"] == 0.2  # reads 9
    assert JaMathEvaluator({**spec, "stop": ["。"]}, tokenizer=tok)(run_on).metrics["accuracy"] == 0.4


def test_evaluator_needs_a_tokenizer(problems_file):
    with pytest.raises(EvomergeError, match="tokenizer"):
        load_evaluator({"kind": "ja_math", "data": {"path": str(problems_file)}},
                       tokenizer_source=None)
    with pytest.raises(EvomergeError, match="could not load"):
        JaMathEvaluator({"data": {"path": str(problems_file)}}, problems_file.parent / "nope")


# ------------------------------------------------------------------ registry and custom callables


def test_unknown_kind_and_missing_callable():
    assert {"ja_math", "python"} <= set(EVALUATORS)
    with pytest.raises(EvomergeError, match="unknown"):
        load_evaluator({"kind": "nope"}, tokenizer_source=None)
    with pytest.raises(EvomergeError, match="missing 'kind'"):
        load_evaluator({}, tokenizer_source=None)
    with pytest.raises(EvomergeError, match="missing 'callable'"):
        load_evaluator({"kind": "python"}, tokenizer_source=None)
    with pytest.raises(EvomergeError, match="module:function"):
        load_evaluator({"kind": "python", "callable": "no_colon"}, tokenizer_source=None)
    with pytest.raises(EvomergeError, match="cannot import"):
        load_evaluator({"kind": "python", "callable": "surely_missing_mod_xyz:f"},
                       tokenizer_source=None)


def test_python_callable(tmp_path, monkeypatch):
    (tmp_path / "my_scoring.py").write_text(textwrap.dedent("""
        from evomerge.evaluators.base import Result

        def as_float(model, scale=1.0):
            return scale * model["value"]

        def as_dict(model):
            return {"score": model["value"], "loss": 0.25, "label": "x",
                    "items": [{"prompt": "p", "output": "o", "correct": True}]}

        def as_result(model, tokenizer_source=None):
            return Result(score=1.0, metrics={"tok": float(tokenizer_source is not None)})

        def bad(model):
            return "oops"

        def no_score(model):
            return {"loss": 1.0}

        not_callable = 3
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = {"value": 0.5}

    ev = load_evaluator({"kind": "python", "callable": "my_scoring:as_float",
                         "options": {"scale": 4}}, tokenizer_source=None)
    assert ev.name == "my_scoring:as_float"
    assert ev(model).score == 2.0

    res = load_evaluator({"kind": "python", "callable": "my_scoring:as_dict"},
                         tokenizer_source=None)(model)
    assert res.score == 0.5 and res.metrics == {"score": 0.5, "loss": 0.25}
    assert res.items[0]["correct"] is True

    res = load_evaluator({"kind": "python", "callable": "my_scoring:as_result"},
                         tokenizer_source="some/tokenizer")(model)
    assert res.metrics == {"tok": 1.0}

    with pytest.raises(EvomergeError, match="returned str"):
        load_evaluator({"kind": "python", "callable": "my_scoring:bad"}, tokenizer_source=None)(model)
    with pytest.raises(EvomergeError, match="without a 'score'"):
        load_evaluator({"kind": "python", "callable": "my_scoring:no_score"},
                       tokenizer_source=None)(model)
    with pytest.raises(EvomergeError, match="has no 'missing'"):
        load_evaluator({"kind": "python", "callable": "my_scoring:missing"}, tokenizer_source=None)
    with pytest.raises(EvomergeError, match="not callable"):
        load_evaluator({"kind": "python", "callable": "my_scoring:not_callable"},
                       tokenizer_source=None)
