"""Fitness at a fraction of the cost: racing and estimated fitness (``search.fitness``).

Evaluation is the whole cost of an evolutionary merge. Three modes, one item order:

``full``
    every trial scores every item (the paper).
``racing``
    a trial scores its items in chunks, in one fixed order shared by every trial; after each
    chunk it is compared with the *incumbent* (the best trial scored on every item) on the items
    both have seen, by a one-sided Wilcoxon signed-rank test (the test of Optuna's
    ``WilcoxonPruner``), and stops once it is significantly worse. A stopped trial reports the
    incumbent's full-set score plus its mean paired difference on the items it saw: an estimate
    of its own full-set score that uses the incumbent as a control variate (far less noisy than
    its plain mean on a few items, since both models get most items right or wrong together),
    and always below the incumbent's score, so the study's best trial is always fully scored.
``estimated``
    a trial scores only the first ``anchors`` items of the order and reports its mean on them;
    once every trial has run, the ``rescore`` best trials by that estimate are scored on the
    remaining items (raced against each other as above) and the winner is the best full-set
    score, so the exported model's score is always a real full-set score.

The item order is a seeded permutation, stratified by how hard the recipe's baselines found
each item (every prefix, hence the anchor set, holds easy and hard items in proportion). Why
anchor means and not an IRT estimate (MERGE³): CMA-ES uses only the ranks of a generation's
values, and the re-scored trials are chosen by rank too. A Rasch (1PL) model's ability estimate
is a monotone function of the number of anchors right, so its estimate ranks trials exactly as
the anchor mean does, and the search would be the same; a 2PL fit needs far more reference
models than a recipe's few baselines to pin down item discriminations.

    fitness = Fitness.for_recipe(evaluator, recipe.search.fitness, seed=recipe.seed)
    fitness.prepare(run_dir, references=[baseline_result.values, ...])
    scored = fitness.score(runnable)      # Scored: value to tell the sampler, items seen, ...
    fitness.adopt(trial_number, scored)   # a fully scored trial may become the incumbent
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.atomic import write_json_atomic
from evomerge.errors import EvomergeError
from evomerge.evaluators.base import ItemEvaluator, Result

MODES = ("full", "racing", "estimated")
ORDER_FILE = "fitness.json"
RESCORED_FILE = "rescored.json"

# -- pure pieces ---------------------------------------------------------------------------------


def item_order(n: int, seed: int, difficulty: Sequence[float] | None = None, strata: int = 10) -> list[int]:
    """A seeded permutation of ``range(n)`` whose every prefix is spread over difficulty.

    Items are sorted by ``difficulty`` (ties broken at random) and cut into ``strata`` groups
    of equal size; each group is shuffled and its items are laid out evenly over the order
    (item j of a group of size m sits near position j/m), so the first k items hold about
    k/strata items of each group. Without ``difficulty`` this is a plain shuffle.
    """
    rng = random.Random(seed)
    if difficulty is None or n == 0:
        order = list(range(n))
        rng.shuffle(order)
        return order
    if len(difficulty) != n:
        raise ValueError(f"difficulty has {len(difficulty)} values for {n} items")
    tiebreak = [rng.random() for _ in range(n)]
    ranked = sorted(range(n), key=lambda i: (difficulty[i], tiebreak[i]))
    groups = max(1, min(strata, n))
    keys: dict[int, float] = {}
    for g in range(groups):
        members = ranked[g * n // groups:(g + 1) * n // groups]
        rng.shuffle(members)
        for j, item in enumerate(members):
            keys[item] = (j + rng.random()) / len(members)
    return sorted(range(n), key=lambda i: keys[i])


def worse_p_value(diffs: Sequence[float]) -> float:
    """One-sided Wilcoxon signed-rank p-value that ``diffs`` (trial minus incumbent, per item)
    are centred below zero. Items where both score the same carry no information and are
    dropped (for right/wrong items this is the sign test on the items they disagree on)."""
    from scipy.stats import wilcoxon

    nonzero = [d for d in diffs if d != 0]
    if not nonzero:
        return 1.0
    return float(wilcoxon(nonzero, alternative="less", zero_method="wilcox").pvalue)


def cannot_win(trial: Sequence[float], incumbent: Sequence[float], p_threshold: float) -> bool:
    """Whether a trial, on the items both have seen (paired lists), is significantly worse than
    the incumbent: its mean is lower and the one-sided test rejects "no worse" at ``p_threshold``."""
    diffs = [a - b for a, b in zip(trial, incumbent, strict=True)]
    if len(diffs) < 2 or sum(diffs) >= 0:
        return False
    return worse_p_value(diffs) < p_threshold


def paired_estimate(incumbent_score: float, trial: Sequence[float], incumbent: Sequence[float]) -> float:
    """The trial's full-set score estimated from the items both saw: the incumbent's full-set
    score plus the mean paired difference (the incumbent as a control variate)."""
    return incumbent_score + (sum(trial) - sum(incumbent)) / len(trial)


def merge_results(parts: Sequence[Result], values: Sequence[float]) -> Result:
    """One Result for items scored in several calls: the score is the mean of ``values``;
    metrics are item-weighted means of the parts' metrics (``n`` is summed)."""
    sizes = [len(p.values) for p in parts]
    total = sum(sizes)
    metrics: dict[str, float] = {}
    for key in parts[0].metrics:
        if key == "n":
            metrics[key] = float(total)
        elif all(key in p.metrics for p in parts):
            metrics[key] = sum(p.metrics[key] * s for p, s in zip(parts, sizes, strict=True)) / total
    return Result(score=sum(values) / len(values), metrics=metrics,
                  items=[it for p in parts for it in p.items], values=list(values))


# -- one trial's fitness ---------------------------------------------------------------------------


@dataclass
class Scored:
    """What one model's fitness came to.

    Attributes:
        value: what the sampler is told (a full-set score, or an estimate of one).
        result: the evaluator's result on the items scored.
        items: indices of the items scored, in scoring order; ``values`` are their scores.
        full: every item was scored, so ``value`` is the real full-set score.
        stopped: racing stopped the trial (``value`` is its paired estimate).
        seconds: time spent evaluating.
    """

    value: float
    result: Result
    items: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    full: bool = True
    stopped: bool = False
    seconds: float = 0.0

    def record(self) -> dict:
        """The per-trial record of what was scored (for the run folder)."""
        return {"items": self.items, "values": self.values, "full": self.full, "stopped": self.stopped,
                "metrics": self.result.metrics}

    def attrs(self) -> dict:
        """Small per-trial attributes for the study."""
        return {"items_scored": len(self.items) or int(self.result.metrics.get("n", 0)),
                "fitness_full": self.full, "stopped": self.stopped}


@dataclass
class Incumbent:
    trial: int
    score: float
    values: list[float]  # per item, indexed by item


class Fitness:
    """Scores trials for the search in one of :data:`MODES` (see the module docstring).

    Args:
        evaluator: the recipe's evaluator; racing and estimated need an
            :class:`~evomerge.evaluators.base.ItemEvaluator`.
        mode: ``full``, ``racing`` or ``estimated``.
        chunk: items per racing step (default: a tenth of the items).
        anchors: items an estimated trial scores (default 100).
        rescore: how many of the best estimated trials are scored on every item at the end.
        p_threshold: the racing test's level.
        seed: seeds the item order.
    """

    def __init__(self, evaluator: Any, mode: str = "full", *, chunk: int | None = None,
                 anchors: int = 100, rescore: int = 5, p_threshold: float = 0.05, seed: int = 0):
        if mode not in MODES:
            raise EvomergeError(f"search.fitness.mode {mode!r}: use one of {', '.join(MODES)}")
        if mode != "full" and not isinstance(evaluator, ItemEvaluator):
            raise EvomergeError(f"search.fitness.mode {mode}: evaluator {getattr(evaluator, 'name', '?')!r} "
                                "does not score single items (score_items); use mode full")
        self.evaluator = evaluator
        self.mode = mode
        self.n = int(evaluator.n_items) if isinstance(evaluator, ItemEvaluator) else 0
        self.chunk = max(1, chunk or math.ceil(self.n / 10)) if self.n else 1
        self.anchors = max(1, min(anchors, self.n)) if self.n else 0
        self.rescore = rescore
        self.p_threshold = p_threshold
        self.seed = seed
        self.order: list[int] = list(range(self.n))
        self.incumbent: Incumbent | None = None

    @classmethod
    def for_recipe(cls, evaluator: Any, spec: Any, *, seed: int = 0) -> Fitness:
        """From a recipe's ``search.fitness`` block (a FitnessSpec, a dict, or None for full)."""
        if spec is None:
            return cls(evaluator, seed=seed)
        data = spec if isinstance(spec, dict) else spec.model_dump()
        return cls(evaluator, seed=seed, **data)

    # -- the run folder -----------------------------------------------------------------------

    def prepare(self, run_dir: Path, references: Iterable[Sequence[float]] = ()) -> None:
        """Fix the item order for this run: read it from the run folder, or build it (stratified
        by the mean of the ``references``' per-item scores) and write it there."""
        if self.mode == "full":
            return
        path = Path(run_dir) / ORDER_FILE
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("n_items") != self.n or sorted(saved.get("order", [])) != list(range(self.n)):
                raise EvomergeError(f"{path}: item order for {saved.get('n_items')} items, but the evaluator "
                                    f"has {self.n}; the evaluator data changed, use a new --run-dir")
            self.order = saved["order"]
            return
        refs = [list(r) for r in references if len(r) == self.n]
        difficulty = [sum(r[i] for r in refs) / len(refs) for i in range(self.n)] if refs else None
        self.order = item_order(self.n, self.seed, difficulty)
        write_json_atomic(path, {"mode": self.mode, "n_items": self.n, "seed": self.seed,
                                 "stratified_by": len(refs), "order": self.order}, indent=None)

    def recover(self, trials: Iterable[tuple[int, float, dict]]) -> None:
        """Take the best fully scored trial as the incumbent again (resume): ``trials`` are
        (number, value, record["fitness"]) of the study's complete trials."""
        for number, value, rec in trials:
            if rec and rec.get("full") and rec.get("items") and (self.incumbent is None or value > self.incumbent.score):
                self._set_incumbent(number, value, rec["items"], rec["values"])

    def _set_incumbent(self, number: int, score: float, items: Sequence[int], values: Sequence[float]) -> None:
        by_item = [0.0] * self.n
        for i, v in zip(items, values, strict=True):
            by_item[i] = v
        self.incumbent = Incumbent(number, score, by_item)

    # -- scoring ------------------------------------------------------------------------------

    def score(self, runnable: Any) -> Scored:
        """Score one trial's model as the mode says."""
        if self.mode == "full":
            result = self.evaluator(runnable)
            return Scored(result.score, result, list(range(len(result.values))), list(result.values))
        if self.mode == "racing":
            return self.race(runnable)
        anchors = self.order[:self.anchors]
        result = self.evaluator.score_items(runnable, anchors)
        full = len(anchors) == self.n
        return Scored(result.score, result, list(anchors), list(result.values), full=full)

    def race(self, runnable: Any, seen: Scored | None = None) -> Scored:
        """Score the items of the order chunk by chunk (after those ``seen`` already), stopping
        once the trial is significantly worse than the incumbent."""
        parts = [seen.result] if seen else []
        items = list(seen.items) if seen else []
        values = list(seen.values) if seen else []
        while len(items) < self.n:
            chunk = self.order[len(items):len(items) + self.chunk]
            part = self.evaluator.score_items(runnable, chunk)
            parts.append(part)
            items += chunk
            values += list(part.values)
            inc = self.incumbent
            if inc is not None and len(items) < self.n:
                theirs = [inc.values[i] for i in items]
                if cannot_win(values, theirs, self.p_threshold):
                    return Scored(paired_estimate(inc.score, values, theirs), merge_results(parts, values),
                                  items, values, full=False, stopped=True)
        result = merge_results(parts, values)
        return Scored(result.score, result, items, values)

    def adopt(self, number: int, scored: Scored) -> None:
        """After a trial: a fully scored trial that beats the incumbent replaces it."""
        if self.mode != "full" and scored.full and (self.incumbent is None or scored.value > self.incumbent.score):
            self._set_incumbent(number, scored.value, scored.items, scored.values)

    # -- estimated mode: the winner is re-scored on every item -----------------------------------

    def finalize(self, run_dir: Path, trials: Sequence[tuple[int, float, dict]],
                 model_of: Callable[[int], Any], log: Callable[[str], None] = print) -> dict | None:
        """Score the best estimated trials on the remaining items (each raced against the best
        re-scored so far) and return the winner's entry of ``rescored.json`` (``trial``,
        ``score``, ``metrics``...), or None outside estimated mode. ``trials`` are (number,
        value, record["fitness"]) of the ``rescore`` best complete trials, best first;
        ``model_of(number)`` rebuilds a trial's model. Resumable: ``rescored.json`` keeps each
        re-score as it finishes."""
        if self.mode != "estimated" or not trials:
            return None
        import time

        path = Path(run_dir) / RESCORED_FILE
        done: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
        self.incumbent = None
        for key, entry in done.items():
            if entry["full"] and (self.incumbent is None or entry["score"] > self.incumbent.score):
                self._set_incumbent(int(key), entry["score"], entry["items"], entry["values"])
        for number, value, rec in trials:
            if str(number) in done:
                continue
            t0 = time.perf_counter()
            seen = Scored(value, Result(value, rec["metrics"], [], rec["values"]), rec["items"], rec["values"])
            scored = self.race(model_of(number), seen)
            entry = {"trial": number, "estimate": value, "score": scored.value, "full": scored.full,
                     "stopped": scored.stopped, "items_scored": len(scored.items) - len(seen.items),
                     "evaluate_seconds": time.perf_counter() - t0, "metrics": scored.result.metrics,
                     "items": scored.items, "values": scored.values}
            done[str(number)] = entry
            write_json_atomic(path, done, indent=None)
            log(f"re-scored trial {number}: estimate {value:.4f} -> "
                f"{'full-set' if scored.full else 'stopped at'} {scored.value:.4f}"
                + ("" if scored.full else f" after {len(scored.items)} items"))
            self.adopt(number, scored)
        full = [e for e in done.values() if e["full"]]
        return max(full, key=lambda e: e["score"]) if full else None


def search_cost(trial_attrs: Iterable[dict], run_dir: Path) -> dict:
    """Items scored and evaluation seconds of a search: every trial's plus the final re-scores
    (baselines excluded)."""
    items = seconds = 0.0
    for attrs in trial_attrs:
        items += attrs.get("items_scored", 0)
        seconds += attrs.get("eval_s", 0.0)
    path = Path(run_dir) / RESCORED_FILE
    if path.exists():
        for entry in json.loads(path.read_text()).values():
            items += entry["items_scored"]
            seconds += entry["evaluate_seconds"]
    return {"items_scored": int(items), "evaluate_seconds": round(seconds, 1)}



def cost_rows(trials: Sequence[Any], run_dir: Path) -> list[tuple[str, str]]:
    """Rows for a run's report: the items the search scored, in all and per trial (``*``:
    stopped by racing), and those of the final re-scores (``*``: stopped)."""
    counted = [t for t in trials if "items_scored" in t.user_attrs]
    if not counted:
        return []
    cost = search_cost([t.user_attrs for t in counted], run_dir)
    rows = [("items scored (search)", f"{cost['items_scored']:,} in {cost['evaluate_seconds']:.0f} s of evaluation"),
            ("items scored per trial", " ".join(
                f"{t.number}:{t.user_attrs['items_scored']}{'*' if t.user_attrs.get('stopped') else ''}"
                for t in counted))]
    path = Path(run_dir) / RESCORED_FILE
    if path.exists():
        rows.append(("re-scored on every item (trial:items)", " ".join(
            f"{e['trial']}:{e['items_scored']}{'' if e['full'] else '*'}" for e in json.loads(path.read_text()).values())))
    return rows
