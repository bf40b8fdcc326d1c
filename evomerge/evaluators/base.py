"""What every evaluator shares: the :class:`Result` it returns and how a recipe names one.

An evaluator is any object with a ``name`` that, called on a *runnable* model (the object the
modality adapter built: a transformers causal LM, a diffusers pipeline...), returns a
:class:`Result`. The search maximises ``Result.score``; ``metrics`` go to the study's per-trial
records and ``items`` (one dict per question/prompt) to the run directory for inspection and
re-scoring.

A recipe names its evaluator with a small dict, dispatched on ``kind``::

    evaluator = load_evaluator({"kind": "ja_math", "data": {"path": "mgsm_ja.jsonl"}, "limit": 50},
                               tokenizer_source="runs/base-model")
    result = evaluator(model)
    print(result.score, result.metrics)

Your own scoring function is one line of YAML away::

    evaluator: {kind: python, callable: "my_pkg.scoring:score", options: {n: 20}}

(``my_pkg`` may sit beside the recipe: its folder is importable) where ``def score(model, n=20)`` returns a :class:`Result`, a plain number, or a dict with a
``"score"`` key (the other numeric values become metrics).

New kinds register a factory ``(spec, tokenizer_source) -> Evaluator`` in :data:`EVALUATORS`,
either directly or as a lazy ``"module:attribute"`` string so that heavy imports happen only
when the kind is used. A modality with settings for its evaluator (SDXL: how to sample the
pipeline) hands them over as data: the factory is then also called with ``settings=`` (a dict).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from evomerge.errors import EvomergeError
from evomerge.recipe_paths import importable


@dataclass
class Result:
    """The outcome of one evaluation.

    Attributes:
        score: the single number the search maximises (higher is better).
        metrics: named numbers worth recording alongside (accuracy, n, ...).
        items: one dict per evaluated example, with at least ``prompt``, ``output`` and
            ``correct``; evaluators add their own fields (``answer``, ``predicted``...).
        values: per-item scores aligned with ``items``, whose mean is ``score``, from
            evaluators that score items (:class:`ItemEvaluator`); empty otherwise.
    """

    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    items: list[dict] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@runtime_checkable
class Evaluator(Protocol):
    """Anything with a ``name`` that scores a runnable model (what racing and the tests need).
    Evaluators that evolve loads also subclass :class:`BaseEvaluator`."""

    name: str

    def __call__(self, runnable: Any) -> Result: ...


class BaseEvaluator:
    """What evolve calls on every evaluator, with the defaults of one that writes no files:
    ``grid_dir`` (where image grids go, none) and ``set_run_dir`` (told the run folder, nothing
    to do). Subclass it (or :class:`ScoresItems`) for a new kind."""

    grid_dir: Path | None = None

    def set_run_dir(self, run_dir: Path) -> None:
        """Called by evolve once the run folder exists."""


@runtime_checkable
class ItemEvaluator(Evaluator, Protocol):
    """An evaluator whose score is the mean of per-item scores over ``n_items`` items, and
    which can score any subset of them: what racing and estimated fitness need
    (:mod:`evomerge.pipelines.fitness`). ``score_items(model, [3, 0, 7])`` returns a Result
    whose ``items`` and ``values`` follow the indices given and whose metrics cover only them;
    ``evaluator(model)`` is ``score_items(model, range(n_items))``."""

    n_items: int

    def score_items(self, runnable: Any, indices: Sequence[int]) -> Result: ...


class ScoresItems(BaseEvaluator):
    """A base for :class:`ItemEvaluator` classes (they define ``n_items`` and ``score_items``):
    calling one scores every item."""

    def __call__(self, runnable: Any) -> Result:
        return self.score_items(runnable, range(self.n_items))  # type: ignore[attr-defined]


EvaluatorFactory = Callable[[dict, "str | Path | None"], Evaluator]

# kind -> factory, or "module:attribute" of a factory imported on first use.
EVALUATORS: dict[str, EvaluatorFactory | str] = {
    "ja_math": "evomerge.evaluators.ja_math:JaMathEvaluator",
    "ja_vqa": "evomerge.evaluators.ja_vqa:JaVQAEvaluator",
    "python": "evomerge.evaluators.base:PythonEvaluator",
    "clip_score": "evomerge.evaluators.clip_score:ClipScoreEvaluator",
    "loss": "evomerge.evaluators.loss:LossEvaluator",
}


def register_evaluator(kind: str, factory: EvaluatorFactory | str) -> None:
    """Make ``kind`` available to :func:`load_evaluator` (a later registration replaces it)."""
    EVALUATORS[kind] = factory


def import_object(ref: str, *, what: str) -> Any:
    """Import ``"package.module:attribute"`` (dots allowed in the attribute), with one-line errors."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise EvomergeError(f"{what} {ref!r}: expected 'module:function', e.g. 'my_pkg.scoring:score'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise EvomergeError(f"{what} {ref!r}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise EvomergeError(f"{what} {ref!r}: module {module_name!r} has no {attr!r}") from None
    return obj


def load_evaluator(spec: dict, *, tokenizer_source: str | Path | None = None,
                   settings: dict[str, Any] | None = None) -> Evaluator:
    """Build the evaluator a recipe's ``evaluator:`` block describes.

    Args:
        spec: a dict with ``kind`` (``"ja_math"``, ``"python"``, or any registered kind) and
            that kind's own options.
        tokenizer_source: a folder or Hub id to load a tokenizer from, for kinds that generate
            text (usually the merge's base or first source model).
        settings: the modality's data for its evaluator (the adapter's ``evaluator_settings()``,
            e.g. SDXL's ``sampling`` and ``final_sampling``); passed on only when there are some.
    """
    if not isinstance(spec, dict):
        raise EvomergeError(f"evaluator: expected a mapping with 'kind', got {type(spec).__name__}")
    kind = spec.get("kind")
    if not kind:
        raise EvomergeError(f"evaluator: missing 'kind' (one of: {', '.join(sorted(EVALUATORS))})")
    factory = EVALUATORS.get(kind)
    if factory is None:
        raise EvomergeError(f"evaluator kind {kind!r} is unknown (one of: {', '.join(sorted(EVALUATORS))})")
    if isinstance(factory, str):
        factory = import_object(factory, what=f"evaluator kind {kind!r}")
    if settings:
        evaluator = factory(spec, tokenizer_source, settings=dict(settings))
    else:
        evaluator = factory(spec, tokenizer_source)
    if not isinstance(evaluator, BaseEvaluator):
        raise EvomergeError(f"evaluator kind {kind!r}: {type(evaluator).__name__} must subclass "
                            "evomerge.evaluators.base.BaseEvaluator")
    return evaluator


def as_result(value: Any, *, source: str = "evaluator") -> Result:
    """Coerce what a user's function returned into a :class:`Result`.

    Accepts a Result, a real number, or a dict with ``"score"`` (other numeric entries become
    metrics; a list under ``"items"`` becomes the items).
    """
    if isinstance(value, Result):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Result(score=float(value), metrics={"score": float(value)})
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor / numpy scalar
        return as_result(value.item(), source=source)
    if isinstance(value, dict):
        if "score" not in value:
            raise EvomergeError(f"{source}: returned a dict without a 'score' key (keys: {sorted(value)})")
        score = as_result(value["score"], source=source).score
        metrics = {k: float(v) for k, v in value.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["score"] = score
        items = value.get("items") or []
        if not isinstance(items, list):
            raise EvomergeError(f"{source}: 'items' must be a list of dicts")
        return Result(score=score, metrics=metrics, items=items)
    raise EvomergeError(f"{source}: returned {type(value).__name__}; expected a Result, a number, "
                        "or a dict with 'score'")


class PythonEvaluator(BaseEvaluator):
    """Your own scoring function, named ``"module:function"`` in the spec.

    The function is called as ``fn(model, **options)``; if it accepts a ``tokenizer_source``
    or a ``settings`` keyword (the modality's evaluator settings) it receives that too. NaN scores are rejected, since the search cannot rank them.
    """

    def __init__(self, spec: dict, tokenizer_source: str | Path | None = None, *,
                 settings: dict[str, Any] | None = None):
        ref = spec.get("callable")
        if not ref or not isinstance(ref, str):
            raise EvomergeError("evaluator kind 'python': missing 'callable' (e.g. 'my_pkg.scoring:score')")
        if spec.get("import_path"):  # the recipe's folder: a scoring module may sit beside it
            importable(spec["import_path"])
        self.fn = import_object(ref, what="evaluator callable")
        if not callable(self.fn):
            raise EvomergeError(f"evaluator callable {ref!r} is not callable")
        options = spec.get("options") or {}
        if not isinstance(options, dict):
            raise EvomergeError(f"evaluator callable {ref!r}: 'options' must be a mapping")
        self.options = dict(options)
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            params = {}
        if tokenizer_source is not None and "tokenizer_source" in params:
            self.options.setdefault("tokenizer_source", tokenizer_source)
        if settings and "settings" in params:
            self.options.setdefault("settings", settings)
        self.ref = ref
        self.name = spec.get("name") or ref

    def __call__(self, runnable: Any) -> Result:
        result = as_result(self.fn(runnable, **self.options), source=f"evaluator callable {self.ref!r}")
        if math.isnan(result.score):
            raise EvomergeError(f"evaluator callable {self.ref!r} returned a NaN score")
        return result
