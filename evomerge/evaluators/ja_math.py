"""Japanese grade-school math (MGSM-JA style): generate, read the last number, check the language.

This follows the EvoLLM-JP evaluation (Akiba et al., 2024): zero-shot greedy generation with a
Japanese Alpaca-style prompt, the answer is the **last number** in the response, and a response
only counts when it is **written in Japanese**. Two readings (``metric``):

- ``sakana``: exactly Sakana's published scoring (the numbers of the paper's Table 1): the regex
  ``\\d*\\.?\\d+`` on the raw text, last match, float equality with the reference; Japanese when
  fastText lid.176 gives P(ja) > 0.5 on the text with newlines removed. Its defaults are the
  paper's generation: the ``ja-alpaca-cot`` prompt, stops ``Instruction:``, ``Instruction``,
  ``Response:``, ``Response``, up to 1024 new tokens.
- ``robust`` (the default): the text is NFKC-normalised first (``１２３`` -> ``123``), thousands
  separators are dropped (``1,000`` is 1000, where the regex reads 000) and minus signs are
  read; Japanese when kana/kanji are at least half the letters.

The scoring functions are pure and usable on their own, e.g. to re-score saved outputs::

    >>> extract_answer("答えは１，０００円です。"), sakana_extract_answer("答えは１，０００円です。")
    (1000.0, 0.0)
    >>> is_correct("So the answer is 18.", 18)
    True
    >>> sakana_score("答え：４２", 42)["japanese"]    # fastText: P(ja) 0.01
    False
    >>> score_responses([{"response": "答えは18です。", "answer": 18},
    ...                  {"response": "The answer is 18.", "answer": 18}])
    {'accuracy': 1.0, 'accuracy_ja': 0.5, 'n': 2}

:class:`JaMathEvaluator` runs the whole thing on a transformers causal LM; its ``score`` is
``accuracy_ja`` (correct **and** Japanese), the fitness the paper maximised, and its items
and metrics carry both readings.

One file for one task family (DESIGN.md: scoring, prompts, data and runner together), ~400
lines: the two readings and the runner share the prompt, stop and answer definitions, and a
reader checking evomerge against the paper wants them side by side.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import Result, ScoresItems
from evomerge.evaluators.data import load_rows, read_jsonl
from evomerge.evaluators.generation import (
    Generated,
    greedy_generate,
    load_tokenizer,
    prepare_tokenizer,
)
from evomerge.evaluators.langid import METRICS, JapaneseDetector, check_metric, ja_probability

# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------

# Minus signs NFKC leaves alone.
_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\u2012": "-", "\u2013": "-"})
# A comma between a digit and exactly three digits (not four): "12,345,678" but not "2,5".
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A number: optional minus (not when glued to a digit or Latin letter: "5-3" is 3, "x-3" is 3),
# digits with an optional decimal part, or a bare ".5".
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?(?:\d+(?:\.\d+)?|(?<![\d.])\.\d+)")


def normalize_text(text: str) -> str:
    """NFKC-normalise (full-width digits/letters/punctuation -> ASCII) and unify minus signs."""
    return unicodedata.normalize("NFKC", text).translate(_MINUS)


def extract_answer(text: str) -> float | None:
    """The last number in ``text`` as a float, or None when there is none.

    Full-width digits and punctuation are normalised first and commas that separate thousands
    are removed, so ``"１，０００"`` and ``"1,000"`` both read as 1000.0, while ``"2,5"`` (not a
    thousands pattern) reads as the last number, 5.0. Decimals (``3.5``), bare decimals (``.5``)
    and negatives (``-4``) are read; a hyphen between digits (``5-3``) is not a minus sign.

        >>> extract_answer("12 + 6 = 18。答えは１８です")
        18.0
        >>> extract_answer("合計は12,345,678円") == 12345678
        True
        >>> extract_answer("気温は-4度"), extract_answer("数字はありません")
        (-4.0, None)
    """
    if not text:
        return None
    text = _THOUSANDS.sub("", normalize_text(str(text)))
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1])
    except ValueError:  # pragma: no cover - the regex only matches float syntax
        return None


def parse_reference(answer: Any) -> float | None:
    """A reference answer as a float: numbers as they are, strings by :func:`extract_answer`
    (so GSM8K's ``"... #### 1,000"`` solutions work too)."""
    if isinstance(answer, bool) or answer is None:
        return None
    value = float(answer) if isinstance(answer, (int, float)) else extract_answer(str(answer))
    return value if value is not None and math.isfinite(value) else None  # inf would match anything


def is_correct(response: str, answer: Any, *, rel_tol: float = 1e-6) -> bool:
    """Whether the last number of ``response`` equals the reference ``answer`` numerically
    (``"18"``, ``18`` and ``18.0`` are all the same answer)."""
    predicted = extract_answer(response)
    reference = parse_reference(answer)
    if predicted is None or reference is None:
        return False
    return abs(predicted - reference) <= rel_tol * max(1.0, abs(reference))


# --------------------------------------------------------------------------------------------
# Sakana's reading (metric: sakana)
# --------------------------------------------------------------------------------------------

# Sakana's answer regex, applied to the raw response. Python's \d also matches full-width
# digits, and float() reads them: "４２" is 42, but "１，０００" is two matches, the last "０００".
_SAKANA_NUMBER = re.compile(r"\d*\.?\d+")


def sakana_extract_answer(text: str) -> float | None:
    """The last match of ``\\d*\\.?\\d+`` in ``text`` as a float (None when none): no
    normalisation, no minus sign, no thousands separators (``"1,000"`` reads 0.0)."""
    matches = _SAKANA_NUMBER.findall(text or "")
    return float(matches[-1].replace(",", "")) if matches else None


def sakana_score(response: str, answer: Any) -> dict:
    """Sakana's reading of one response: ``predicted``, ``correct`` (float equality with the
    reference number), ``p_ja`` (fastText P(ja)) and ``japanese`` (``p_ja > 0.5``)."""
    predicted = sakana_extract_answer(response)
    reference = parse_reference(answer)
    p_ja = ja_probability(response)
    return {"predicted": predicted, "correct": predicted is not None and predicted == reference,
            "p_ja": p_ja, "japanese": p_ja > 0.5}


def robust_score(response: str, answer: Any, detector: JapaneseDetector | None = None) -> dict:
    """The ``robust`` reading of one response: ``predicted``, ``correct``, ``japanese``."""
    return {"predicted": extract_answer(response), "correct": is_correct(response, answer),
            "japanese": (detector or JapaneseDetector())(response)}


def score_item(response: str, answer: Any, metric: str,
               detector: JapaneseDetector | None = None) -> dict:
    """One response read the ``metric`` way (see :func:`sakana_score`, :func:`robust_score`)."""
    if check_metric(metric) == "sakana":
        return sakana_score(response, answer)
    return robust_score(response, answer, detector)


# --------------------------------------------------------------------------------------------
# Scoring records
# --------------------------------------------------------------------------------------------


def score_responses(records: Iterable[dict], detector: JapaneseDetector | None = None, *,
                    metric: str = "robust") -> dict:
    """Accuracy of ``{"response", "answer"}`` records under ``metric``.

    Returns ``{"accuracy", "accuracy_ja", "n"}``: ``accuracy`` counts correct answers in any
    language; ``accuracy_ja`` counts an item only if it is correct **and** its response is
    Japanese (the EvoLLM-JP metric). Empty input gives zeros.
    """
    check = detector or JapaneseDetector()
    n = correct = correct_ja = 0
    for record in records:
        response = str(record.get("response", record.get("output", "")) or "")
        item = score_item(response, record.get("answer"), metric, check)
        n += 1
        correct += item["correct"]
        correct_ja += item["correct"] and item["japanese"]
    return {"accuracy": correct / n if n else 0.0, "accuracy_ja": correct_ja / n if n else 0.0,
            "n": n}


def score_file(path: str | Path, detector: JapaneseDetector | None = None, *,
               metric: str = "robust") -> dict:
    """:func:`score_responses` over a JSONL file whose lines have ``response`` (or ``output``,
    as the evaluator writes) and ``answer``; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"{path}: no such file")
    rows = read_jsonl(path, numbered=True)
    for lineno, row in rows:
        if "response" not in row and "output" not in row:
            raise EvomergeError(f"{path}:{lineno}: missing field 'response'")
        if "answer" not in row:
            raise EvomergeError(f"{path}:{lineno}: missing field 'answer'")
    return score_responses((row for _, row in rows), detector, metric=metric)


# --------------------------------------------------------------------------------------------
# Problems and prompt
# --------------------------------------------------------------------------------------------

DEFAULT_PROMPT = (
    "以下は、ある課題についての指示です。指示に従い、考え方と答えを日本語で書いてください。"
    "最後に答えの数値を書いてください。\n\n"
    "### 指示:\n{question}\n\n"
    "### 応答:\n一歩一歩考えましょう。"
)
DEFAULT_STOP = ["### 指示", "### Instruction", "### 応答", "### Response"]
# Sakana's "ja-alpaca-cot" template and vLLM stop strings (the paper's EvoLLM-JP evaluation).
JA_ALPACA_COT_PROMPT = (
    "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を日本語で"
    "記述してください。一歩一歩考えましょう。\n\n### 指示:\n{question}\n\n### 応答:"
)
SAKANA_STOP = ["Instruction:", "Instruction", "Response:", "Response"]
PROMPTS = {"default": DEFAULT_PROMPT, "ja-alpaca-cot": JA_ALPACA_COT_PROMPT}
# Generation defaults of each metric: (prompt, stop strings, max_new_tokens).
METRIC_DEFAULTS = {"robust": (DEFAULT_PROMPT, DEFAULT_STOP, 512),
                   "sakana": (JA_ALPACA_COT_PROMPT, SAKANA_STOP, 1024)}


def _data_spec(spec: dict) -> dict:
    """The data part of an evaluator spec: its ``data`` block (or the spec itself when the
    source keys are at top level), with top-level ``limit``/``offset`` applied unless the data
    block sets its own."""
    data = dict(spec["data"]) if isinstance(spec.get("data"), dict) else dict(spec)
    if isinstance(spec.get("data"), str):
        data = {"path": spec["data"]}
    for key in ("limit", "offset", "question_field", "answer_field"):
        if key in spec and key not in data:
            data[key] = spec[key]
    return data


def _as_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def load_problems(spec: dict) -> list[dict]:
    """Math problems as ``[{"question": str, "answer": int | float}, ...]``.

    ``spec`` is a data spec (see :mod:`evomerge.evaluators.data`: ``path`` or ``hub``,
    ``config``, ``split``, ``offset``, ``limit``) or an evaluator spec holding one under
    ``data``. Field mapping: ``question_field`` (default ``"question"``) and ``answer_field``
    (default ``"answer_number"`` as in MGSM, else ``"answer"``; string answers such as GSM8K's
    ``"... #### 18"`` are read by their last number).

        >>> load_problems({"hub": "juletxara/mgsm", "config": "ja", "limit": 250})  # doctest: +SKIP
    """
    data = _data_spec(spec)
    where = data.get("path") or data.get("hub")
    rows = load_rows(data)
    q_field = data.get("question_field") or "question"
    a_field = data.get("answer_field")
    offset = int(data.get("offset") or 0)
    problems = []
    for i, row in enumerate(rows):
        where_row = f"{where}: row {offset + i + 1}"
        if q_field not in row:
            raise EvomergeError(f"{where_row}: missing question field {q_field!r} "
                                f"(fields: {', '.join(map(str, row))}; set question_field)")
        field = a_field or ("answer_number" if "answer_number" in row else "answer")
        if field not in row:
            raise EvomergeError(f"{where_row}: missing answer field {field!r} "
                                f"(fields: {', '.join(map(str, row))}; set answer_field)")
        answer = parse_reference(row[field])
        if answer is None:
            raise EvomergeError(f"{where_row}: answer {row[field]!r} has no number")
        problems.append({"question": str(row[q_field]), "answer": _as_number(answer)})
    if not problems:
        raise EvomergeError(f"{where}: no problems (check the file, split, offset and limit)")
    return problems


def format_prompt(question: str, template: str = DEFAULT_PROMPT) -> str:
    """The prompt for one question: ``template`` with ``{question}`` replaced (other braces
    are left alone, so templates may contain JSON or LaTeX)."""
    if "{question}" not in template:
        raise EvomergeError("evaluator prompt: the template must contain '{question}'")
    return template.replace("{question}", question)


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` up to the earliest stop string (unchanged when none occurs)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


class JaMathEvaluator(ScoresItems):
    """MGSM-JA-style accuracy of a transformers causal LM.

    Spec keys (all optional but the data source):

    - ``data``: a data spec (``path``/``hub``, ``config``, ``split``...; see :func:`load_problems`),
      or the same keys at top level; ``limit`` and ``offset`` may sit at top level too.
    - ``metric``: ``robust`` (default) or ``sakana`` (the paper's scoring and generation
      defaults); the score uses it, and items and metrics carry both readings
      (``accuracy_ja_sakana``, ``accuracy_ja_robust``...).
    - ``prompt``: ``ja-alpaca-cot`` (Sakana's), ``default``, or a template with ``{question}``.
    - ``chat``: wrap the prompt in the tokenizer's chat template (default false).
    - ``max_new_tokens`` (512 robust, 1024 sakana), ``batch_size`` (8), ``stop`` (the metric's
      stop strings; the end marker always stops).
    - ``require_japanese`` (true): score is ``accuracy_ja``; false makes it ``accuracy``.
    - ``language_model``: a fastText model file for the robust reading's language check.

    Generation is greedy (:func:`~evomerge.evaluators.generation.greedy_generate`): prompts are
    batched by token length and each sequence leaves its batch when it ends. Problems and the
    tokenizer are loaded once, here; each call only generates and scores.
    """

    name = "ja_math"

    def __init__(self, spec: dict, tokenizer_path: str | Path | None = None, *,
                 tokenizer: Any = None):
        self.spec = spec
        self.metric = check_metric(spec.get("metric", "robust"), "evaluator ja_math: metric")
        self.other_metric = next(m for m in METRICS if m != self.metric)
        prompt, stop, max_new = METRIC_DEFAULTS[self.metric]
        self.problems = load_problems(spec)
        template = spec.get("prompt") or prompt
        self.template = PROMPTS.get(template, template)
        self.prompts = [format_prompt(p["question"], self.template) for p in self.problems]
        self.max_new_tokens = int(spec.get("max_new_tokens", max_new))
        self.batch_size = int(spec.get("batch_size", 8))
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise EvomergeError("evaluator: max_new_tokens and batch_size must be >= 1")
        stop = spec.get("stop", stop)
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.require_japanese = bool(spec.get("require_japanese", True))
        self.detector = JapaneseDetector(spec.get("language_model"))
        if tokenizer is None:
            source = tokenizer_path or spec.get("tokenizer")
            if source is None:
                raise EvomergeError("evaluator ja_math: no tokenizer (give the model to take it from)")
            tokenizer = load_tokenizer(source)
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.inputs = [self._render(p) for p in self.prompts]
        self.input_ids = [self.tokenizer(text)["input_ids"] for text in self.inputs]

    def _render(self, prompt: str) -> str:
        if not self.spec.get("chat"):
            return prompt
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise EvomergeError(f"evaluator ja_math: chat: true but the tokenizer has no usable "
                                f"chat template ({type(e).__name__})") from None

    def _eos_ids(self, model) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if int(v) not in ids:
                    ids.append(int(v))
        return ids

    def generate(self, model: Any, indices: Iterable[int] | None = None) -> tuple[list[str], Generated]:
        """Greedy completions of the prompts (those at ``indices``, default all), stop strings
        cut off, and what they cost."""
        prompts = self.input_ids if indices is None else [self.input_ids[i] for i in indices]
        out = greedy_generate(model, self.tokenizer, prompts,
                              max_new_tokens=self.max_new_tokens, eos_ids=self._eos_ids(model),
                              stop=self.stop, batch_size=self.batch_size)
        texts = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, self.stop) for t in texts], out

    @property
    def n_items(self) -> int:
        return len(self.problems)

    def score_items(self, runnable: Any, indices: Iterable[int]) -> Result:
        """Generate and score the problems at ``indices`` only (racing, estimated fitness)."""
        indices = list(indices)
        outputs, cost = self.generate(runnable, indices)
        items = []
        for i, output in zip(indices, outputs, strict=True):
            prompt, problem = self.prompts[i], self.problems[i]
            item = {"prompt": prompt, "question": problem["question"], "output": output,
                    "answer": problem["answer"]}
            for metric in (self.metric, self.other_metric):
                reading = score_item(output, problem["answer"], metric, self.detector)
                if reading["predicted"] is not None:
                    reading["predicted"] = _as_number(reading["predicted"])
                suffix = "" if metric == self.metric else f"_{metric}"
                item.update({f"{k}{suffix}": v for k, v in reading.items()})
            items.append(item)
        n = len(items)
        metrics: dict[str, float] = {}
        for metric in METRICS:
            suffix = "" if metric == self.metric else f"_{metric}"
            correct = [it[f"correct{suffix}"] for it in items]
            japanese = [it[f"japanese{suffix}"] for it in items]
            metrics[f"accuracy_{metric}"] = sum(correct) / n
            metrics[f"accuracy_ja_{metric}"] = sum(c and j for c, j in zip(correct, japanese, strict=True)) / n
        metrics["accuracy"] = metrics[f"accuracy_{self.metric}"]
        metrics["accuracy_ja"] = metrics[f"accuracy_ja_{self.metric}"]
        metrics.update({"n": float(n), "generated_tokens": float(cost.generated_tokens),
                        "generate_seconds": cost.seconds})
        score = metrics["accuracy_ja"] if self.require_japanese else metrics["accuracy"]
        values = [float(it["correct"] and (it["japanese"] or not self.require_japanese)) for it in items]
        return Result(score=score, metrics=metrics, items=items, values=values)
