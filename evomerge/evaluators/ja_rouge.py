"""Japanese VQA scoring: ROUGE-L on MeCab tokens, as Sakana scored EvoVLM-JP (and a robust reading).

This follows the EvoVLM-JP evaluation (Akiba et al., 2024; Sakana AI's ``evomerge/eval``): the
VLM answers one question per image with beam search (5 beams, repetition penalty 1.5, up to 512
new tokens), and each answer is compared with the reference by **ROUGE-L F-measure x 100**
computed on **MeCab words** (fugashi + unidic-lite, wakati output) after Sakana's
normalisation (emoji removed with ``emoji`` and Sakana's ranges, ``neologdn.normalize``,
whitespace collapsed). A prediction that is **not Japanese** counts as the empty string when
the reference is Japanese, so a model that answers well in English scores nothing. Two
readings (``metric``):

- ``sakana``: exactly Sakana's published scoring: the language rule is fastText lid.176
  (blank when P(ja) of the reference >= 0.5 and P(ja) of the prediction < 0.5), and the mean
  is rouge_score's ``BootstrapAggregator`` "mid" (the median of 1000 resampled means), with
  NumPy's global generator seeded with 42 for the call, so the number is deterministic and
  equals what Sakana's ``rouge_ja`` gives right after ``np.random.seed(42)``;
- ``robust`` (the default): the kana/kanji character rule and the plain mean of the per-item
  F-measures (what the bootstrap estimates, without its sampling noise).

The scoring functions are pure and usable on their own, e.g. to re-score saved outputs::

    >>> normalize_ja("ＡＢＣ　１２３ です 。")
    'ABC 123です。'
    >>> mecab_tokens("白い犬です")
    ['白い', '犬', 'です']
    >>> round(rouge_l("白い犬です", "白い猫です"), 2)
    66.67
    >>> rouge_l("A white dog.", "白い犬")     # not Japanese: scored as empty
    0.0
    >>> score_pairs([{"prediction": "白い犬", "reference": "白い犬"},
    ...              {"prediction": "黒い", "reference": "白い"}])
    {'rougeL': 50.0, 'n': 2}

:mod:`evomerge.evaluators.ja_vqa` generates the answers and scores them with these functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluators.data import read_jsonl
from evomerge.evaluators.langid import JapaneseDetector, check_metric, is_japanese, ja_probability

# --------------------------------------------------------------------------------------------
# Normalisation (Sakana's: emoji removed, neologdn, whitespace collapsed)
# --------------------------------------------------------------------------------------------

# The ranges Sakana's regex removes after emoji.is_emoji: emoticons, symbols & pictographs,
# transport & map, flags, dingbats.
_EMOJI_RANGES = re.compile(
    "[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF\U0001F1E0-\U0001F1FF"
    "\U00002702-\U000027B0]+")


def remove_emoji(text: str) -> str:
    """``text`` without the characters ``emoji.is_emoji`` flags and Sakana's emoji ranges."""
    import emoji

    return _EMOJI_RANGES.sub("", "".join(c for c in text if not emoji.is_emoji(c)))


def normalize_ja(text: str) -> str:
    """Sakana's normalisation: emoji removed, ``neologdn.normalize`` (full-width ASCII and
    half-width katakana unified, long vowels and hyphens collapsed, tildes dropped, spaces
    between Japanese characters removed), then whitespace collapsed to single spaces."""
    import neologdn

    return " ".join(neologdn.normalize(remove_emoji(text)).split())


# --------------------------------------------------------------------------------------------
# MeCab tokens and ROUGE-L
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tagger() -> Any:
    """One MeCab tagger in wakati mode (space-separated surface forms). fugashi finds the
    unidic-lite dictionary by itself when it is installed."""
    try:
        from fugashi import Tagger
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise EvomergeError(f"ja_vqa scoring needs fugashi and unidic-lite ({e})") from None
    try:
        return Tagger("-Owakati")
    except Exception as e:  # pragma: no cover - no dictionary
        raise EvomergeError(f"MeCab could not start (is unidic-lite installed?): {e}") from None


def mecab_tokens(text: str) -> list[str]:
    """The surface forms MeCab (unidic-lite) splits ``text`` into, after :func:`normalize_ja`."""
    normalized = normalize_ja(text)
    if not normalized:
        return []
    return _tagger().parse(normalized).split()


class MecabTokenizer:
    """The ``tokenize(text) -> list[str]`` object rouge_score's RougeScorer accepts."""

    def tokenize(self, text: str) -> list[str]:
        return mecab_tokens(text)


# Sakana scores all three types; the bootstrap draws for rouge1 and rouge2 come first, so
# they are kept to give the rougeL "mid" Sakana's code gives for the same seed.
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL"]
BOOTSTRAP_SEED = 42


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(ROUGE_TYPES, tokenizer=MecabTokenizer())


def bootstrap_mid(scores: list[dict], seed: int = BOOTSTRAP_SEED) -> float:
    """rouge_score's ``BootstrapAggregator`` mid F-measure x 100 of ROUGE-L over per-item score
    dicts, with NumPy's global generator seeded for the call (and restored after it)."""
    import numpy as np
    from rouge_score.scoring import BootstrapAggregator

    if not scores:
        return 0.0
    aggregator = BootstrapAggregator()
    for score in scores:
        aggregator.add_scores(score)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return float(result["rougeL"].mid.fmeasure) * 100.0


def japanese_rule(prediction: str, reference: str, detector: JapaneseDetector | None = None, *,
                  metric: str = "robust") -> str:
    """The prediction to score: ``""`` when the reference is Japanese and the prediction is not,
    else the prediction unchanged. ``sakana``: fastText P(ja) >= 0.5 for the reference and
    < 0.5 for the prediction; ``robust``: the character rule of :func:`is_japanese` (or
    ``detector``)."""
    if check_metric(metric) == "sakana":
        blank = ja_probability(reference) >= 0.5 and ja_probability(prediction) < 0.5
    else:
        check = detector or is_japanese
        blank = check(reference) and not check(prediction)
    return "" if blank else prediction


def rouge_scores(prediction: str, reference: str, *, require_japanese: bool = True,
                 detector: JapaneseDetector | None = None, metric: str = "robust") -> dict:
    """rouge_score's ``{type: Score}`` of one pair, after the Japanese rule when required."""
    if require_japanese:
        prediction = japanese_rule(prediction, reference, detector, metric=metric)
    return _scorer().score(reference, prediction)


def rouge_l(prediction: str, reference: str, *, require_japanese: bool = True,
            detector: JapaneseDetector | None = None, metric: str = "robust") -> float:
    """ROUGE-L F-measure x 100 (0..100) of ``prediction`` against ``reference`` on MeCab words.

    With ``require_japanese`` (the default, as in the paper) a non-Japanese prediction for a
    Japanese reference scores as the empty string, i.e. 0.
    """
    scores = rouge_scores(prediction, reference, require_japanese=require_japanese,
                          detector=detector, metric=metric)
    return scores["rougeL"].fmeasure * 100.0


def aggregate(scores: list[dict], metric: str) -> float:
    """ROUGE-L x 100 over items: bootstrap mid (``sakana``) or the plain mean (``robust``)."""
    if check_metric(metric) == "sakana":
        return bootstrap_mid(scores)
    return sum(s["rougeL"].fmeasure for s in scores) * 100.0 / len(scores) if scores else 0.0


def score_pairs(records: Iterable[dict], *, require_japanese: bool = True,
                detector: JapaneseDetector | None = None, metric: str = "robust") -> dict:
    """ROUGE-L of ``{"prediction", "reference"}`` records: ``{"rougeL": F x 100, "n"}``.

    ``output`` and ``answer`` are accepted for ``prediction`` and ``reference`` (the evaluator's
    item fields). ``metric`` picks the language rule and the aggregation (see the module
    docstring); empty input gives 0.
    """
    scores = []
    for record in records:
        prediction = record.get("prediction", record.get("output", ""))
        reference = record.get("reference", record.get("answer", ""))
        scores.append(rouge_scores(str(prediction or ""), str(reference or ""),
                                   require_japanese=require_japanese, detector=detector,
                                   metric=metric))
    return {"rougeL": aggregate(scores, metric), "n": len(scores)}


def score_file(path: str | Path, *, require_japanese: bool = True, metric: str = "robust") -> dict:
    """:func:`score_pairs` over a JSONL file whose lines have ``prediction`` and ``reference``
    (strings); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"{path}: no such file")
    rows = read_jsonl(path, numbered=True)
    for lineno, row in rows:
        for key in ("prediction", "reference"):
            if key not in row:
                raise EvomergeError(f"{path}:{lineno}: missing field {key!r}")
            if row[key] is not None and not isinstance(row[key], str):
                raise EvomergeError(f"{path}:{lineno}: field {key!r} must be a string, "
                                    f"got {type(row[key]).__name__}")
    return score_pairs((row for _, row in rows), require_japanese=require_japanese, metric=metric)
