"""Evolve a merge recipe: the loop of the paper, on an Optuna study.

    open the recipe's models once, build the runnable model once
    score the baselines the recipe asks for (once per run)
    until the study holds N finished trials:
        ask the sampler for values (CMA-ES: mean 0.5, sigma 1/6 in the normalised box)
        merge in memory into the runnable's parameters
        evaluate the runnable -> one score (higher is better)
        record the trial (study storage + a JSON file) and tell the sampler
    write the best values (and the best model with --export-best)

Everything lives in a run directory; rerunning the same command resumes. A trial that was
running when the process died is marked failed ("interrupted", not counted) and its slot is
sampled again; a trial whose merge holds NaN/inf or whose evaluation raises is failed and
counted, and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from evomerge.errors import EvomergeError, describe
from evomerge.evaluators.base import Result, load_evaluator
from evomerge.pipelines.candidates import make_candidates
from evomerge.pipelines.fitness import Fitness, Scored
from evomerge.recipe import Recipe, load_recipe
from evomerge.recipe_paths import pin_root, same_recipe

INTERRUPTED = "interrupted"


def write_json_atomic(path: Path, data, *, indent: int | None = 2) -> None:
    """Write JSON so a crash leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=float))
    os.replace(tmp, path)


@dataclass
class RunPaths:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def best(self) -> Path:
        return self.root / "best.json"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines.json"

    @property
    def info(self) -> Path:
        return self.root / "run.json"  # the storage URL the run used

    def default_storage(self) -> str:
        return f"sqlite:///{(self.root / 'study.db').resolve()}"

    def storage(self) -> str:
        """The storage a run recorded (``--storage``), else the run folder's SQLite file."""
        if self.info.exists():
            return json.loads(self.info.read_text())["storage"]
        return self.default_storage()


def make_sampler(recipe: Recipe, kind: str) -> optuna.samplers.BaseSampler:
    """CMA-ES as in the paper (Optuna's defaults: mean at the box centre, sigma 1/6, population
    4 + floor(3 ln n)); random and TPE for comparison."""
    seed = recipe.seed
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, popsize=recipe.search.popsize, use_separable_cma=recipe.search.separable,
            warn_independent_sampling=False)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise EvomergeError(f"--sampler {kind!r}: use cmaes, random or tpe")


def open_storage(url: str) -> optuna.storages.BaseStorage | str:
    """The study storage for a URL: any SQLAlchemy URL, or ``journal:PATH`` for Optuna's
    append-only journal file (resumable, safe for several processes on one host, and much
    cheaper per write than SQLite; the mini-world demo uses it, where a trial is a fraction of
    a second). SQLite gets write-ahead logging: each trial writes a few dozen small
    transactions, and WAL commits them without an fsync each (a killed process still loses
    nothing committed; only a power cut can lose the last ones) and lets readers in meanwhile."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if not url.startswith("sqlite:"):
        return url
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url)

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened before the listener get reopened with it
    return storage


def default_popsize(n_values: int) -> int:
    return 4 + math.floor(3 * math.log(max(n_values, 1)))


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward the total: completed, or failed for a reason of their own."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE
            or (t.state == TrialState.FAIL and t.user_attrs.get("reason") != INTERRUPTED)]


def _retire_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed process as failed-interrupted (their slot is redone)."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, "reason", INTERRUPTED)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


@dataclass
class TrialTiming:
    number: int
    score: float | None
    merge_s: float
    eval_s: float
    total_s: float

    @property
    def other_s(self) -> float:
        return max(self.total_s - self.merge_s - self.eval_s, 0.0)


@dataclass
class EvolveOutcome:
    run_dir: Path
    best_value: float | None
    best_values: dict[str, float]
    timings: list[TrialTiming] = field(default_factory=list)
    baselines: dict[str, dict] = field(default_factory=dict)


class Evolution:
    """One run: a recipe, its run directory and study, the runnable model and the evaluator."""

    def __init__(self, recipe_path: str | Path, *, run_dir: str | Path | None = None,
                 storage: str | None = None, sampler: str | None = None, device: str = "cpu",
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 console: Console | None = None):
        self.recipe = load_recipe(recipe_path)
        if not self.recipe.evaluator:
            raise EvomergeError(f"{recipe_path}: field evaluator: missing; evolve needs an evaluator to score trials")
        self.paths = RunPaths(Path(run_dir) if run_dir else Path("runs") / self.recipe.name)
        self.console = console or Console()
        # models are opened (and checked) before the run directory is made
        self.candidates = make_candidates(
            self.recipe, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
            console=self.console)
        if not self.candidates.space.names:
            raise EvomergeError(f"{recipe_path}: field merge.search: empty; name the values to search, e.g. weight: [0, 1]")
        self._claim_run_dir(Path(recipe_path))
        self.sampler_kind = sampler or self.recipe.search.sampler
        self.storage = storage or self.paths.default_storage()
        write_json_atomic(self.paths.info, {"storage": self.storage, "study": self.recipe.name})
        self.evaluator = load_evaluator(self.recipe.evaluator, tokenizer_source=self.candidates.tokenizer_source)
        if hasattr(self.evaluator, "set_run_dir"):  # evaluators that write files (image grids)
            self.evaluator.set_run_dir(self.paths.root)
        self.fitness = Fitness.for_recipe(self.evaluator, self.recipe.search.fitness, seed=self.recipe.seed)

    def _claim_run_dir(self, recipe_path: Path) -> None:
        """Create the run directory with a copy of the recipe, or check it holds the same one."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.paths.trials.mkdir(exist_ok=True)
        text = recipe_path.read_text()
        if recipe_path.resolve() != self.paths.recipe.resolve():
            text = pin_root(text, recipe_path)
        if self.paths.recipe.exists():
            if not same_recipe(self.paths.recipe.read_text(), text):
                raise EvomergeError(
                    f"{self.paths.root} holds a run of a different recipe; pass --run-dir for a new run")
        else:
            self.paths.recipe.write_text(text)

    def study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(
            study_name=self.recipe.name, storage=open_storage(self.storage), direction="maximize",
            sampler=make_sampler(self.recipe, self.sampler_kind), load_if_exists=True)

    # -- one trial ----------------------------------------------------------------------------

    def _evaluate(self, runnable) -> Result:
        with torch.no_grad():
            return self.evaluator(runnable)

    def _score(self, runnable) -> Scored:
        with torch.no_grad():
            return self.fitness.score(runnable)

    def run_trial(self, study: optuna.Study) -> TrialTiming:
        start = time.perf_counter()
        trial = study.ask()
        space = self.candidates.space
        values = {name: trial.suggest_float(name, *space.bounds(name)) for name in space.names}
        merge_s = eval_s = 0.0
        score = None
        record: dict = {"number": trial.number, "values": values}
        try:
            t0 = time.perf_counter()
            runnable = self.candidates.apply(values)
            merge_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            scored = self._score(runnable)
            result = scored.result
            eval_s = time.perf_counter() - t1
            if not math.isfinite(scored.value):
                raise FloatingPointError(f"evaluator returned {scored.value}")
            score = scored.value
            record.update(score=score, metrics=result.metrics, items=result.items, fitness=scored.record())
            for k, v in {**result.metrics, **scored.attrs()}.items():
                trial.set_user_attr(k, v)
        except Exception as e:  # a bad candidate fails alone; the run goes on
            record.update(error=f"{describe(e)}", traceback=traceback.format_exc(limit=3))
            trial.set_user_attr("reason", f"{describe(e)}"[:500])
        trial.set_user_attr("merge_s", merge_s)
        trial.set_user_attr("eval_s", eval_s)
        record.update(merge_s=merge_s, eval_s=eval_s)
        # one line per trial record: with every item's output inside, pretty-printing costs
        # more than the merge of a small model
        write_json_atomic(self.paths.trials / f"{trial.number:05d}.json", record, indent=None)
        total = time.perf_counter() - start  # bookkeeping up to here; tell() is the sampler's
        trial.set_user_attr("total_s", total)
        if score is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, score)
            self.fitness.adopt(trial.number, scored)
        return TrialTiming(trial.number, score, merge_s, eval_s, time.perf_counter() - start)

    # -- baselines ----------------------------------------------------------------------------

    def score_baselines(self) -> dict[str, dict]:
        """Score each baseline the recipe names, once per run (kept in baselines.json)."""
        done = json.loads(self.paths.baselines.read_text()) if self.paths.baselines.exists() else {}
        for spec in self.recipe.baselines:
            name = spec["name"]
            if name in done:
                continue
            result = self._evaluate(self.candidates.apply_baseline(spec))
            grids = getattr(self.evaluator, "grid_dir", None)  # image grids: the report shows each baseline's
            if grids is not None and (grids / "latest.png").exists():
                shutil.copyfile(grids / "latest.png", grids / f"baseline-{name}.png")
            # per-item scores order the items for racing and estimated fitness
            done[name] = {"score": result.score, "metrics": result.metrics, "values": result.values}
            write_json_atomic(self.paths.baselines, done)
            self.console.print(f"baseline [bold]{name}[/]: {result.score:.4f}")
        return done

    # -- the loop -----------------------------------------------------------------------------

    def run(self, trials: int | None = None, *, export_best: bool = False,
            show_progress: bool = True) -> EvolveOutcome:
        total = trials or self.recipe.search.trials
        study = self.study()
        retired = _retire_interrupted(study)
        if retired:
            self.console.print(f"resuming: {retired} interrupted trial(s) will be redone")
        baselines = self.score_baselines()
        self.fitness.prepare(self.paths.root, [b.get("values", []) for b in baselines.values()])
        self._recover_incumbent(study)
        timings: list[TrialTiming] = []
        from evomerge.progress import trial_progress

        done = len(_finished(study))
        with trial_progress(total, done, enabled=show_progress) as update:
            while done < total:
                timing = self.run_trial(study)
                timings.append(timing)
                done = len(_finished(study))
                best = study.best_value if _has_complete(study) else None
                update(done, best, timing)
                if best is not None and timing.score == best:
                    self._write_best(study)
        outcome = EvolveOutcome(self.paths.root, None, {}, timings, baselines)
        if _has_complete(study):
            self._write_best(study, self._rescore_best(study))
            best = json.loads(self.paths.best.read_text())
            outcome.best_value, outcome.best_values = best["score"], best["values"]
        if timings:
            self.console.print(timing_table(timings))
        if export_best and outcome.best_values:
            out = self.candidates.export(outcome.best_values, self.paths.root / "best",
                                         extra_card=self._card_note(study), show_progress=show_progress)
            self.console.print(f"best model written to {out}")
        return outcome

    def _write_best(self, study: optuna.Study, rescored: dict | None = None) -> None:
        """best.json: the best trial, or (estimated fitness) the best of the re-scored trials
        with its full-set score and metrics."""
        t = study.best_trial if rescored is None else study.trials[rescored["trial"]]
        best = {"trial": t.number, "score": t.value, "values": t.params, "metrics": t.user_attrs}
        if rescored is not None:
            best.update(score=rescored["score"], estimate=t.value,
                        metrics={**t.user_attrs, **rescored["metrics"], "fitness_full": True})
        elif not t.user_attrs.get("fitness_full", True):
            best["estimated"] = True  # a trial scored on anchors only: re-scored at the end
        write_json_atomic(self.paths.best, best)

    # -- racing and estimated fitness ---------------------------------------------------------

    def _fitness_record(self, number: int) -> dict:
        return json.loads((self.paths.trials / f"{number:05d}.json").read_text())["fitness"]

    def _recover_incumbent(self, study: optuna.Study) -> None:
        """A resumed run races against the best fully scored trial it had (its per-item scores
        are in its trial record)."""
        full = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("fitness_full")]
        if full and self.fitness.mode != "full":
            t = max(full, key=lambda t: t.value)
            self.fitness.recover([(t.number, t.value, self._fitness_record(t.number))])

    def _rescore_best(self, study: optuna.Study) -> dict | None:
        """Estimated fitness: the best trials by estimate, re-scored on every item."""
        if self.fitness.mode != "estimated":
            return None
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        top = sorted(complete, key=lambda t: -t.value)[:self.fitness.rescore]
        with torch.no_grad():
            return self.fitness.finalize(
                self.paths.root, [(t.number, t.value, self._fitness_record(t.number)) for t in top],
                lambda number: self.candidates.apply(study.trials[number].params), log=self.console.print)

    def _card_note(self, study: optuna.Study) -> str:
        best = json.loads(self.paths.best.read_text())
        return (f"## Evolution\n\nBest of {len(_finished(study))} trials ({self.sampler_kind}): "
                f"trial {best['trial']}, score {best['score']:.4f} on the search set.")


def _has_complete(study: optuna.Study) -> bool:
    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def timing_table(timings: list[TrialTiming]) -> Table:
    """Per-trial time split into merge, evaluation and everything else, with totals."""
    table = Table(title="trial time (s)")
    for col in ("trial", "score", "merge", "evaluate", "other", "total"):
        table.add_column(col, justify="right")
    for t in timings:
        table.add_row(str(t.number), "failed" if t.score is None else f"{t.score:.4f}",
                      f"{t.merge_s:.3f}", f"{t.eval_s:.3f}", f"{t.other_s:.3f}", f"{t.total_s:.3f}")
    m, e, o, s = (sum(getattr(t, a) for t in timings) for a in ("merge_s", "eval_s", "other_s", "total_s"))
    table.add_row("all", "", f"{m:.3f}", f"{e:.3f}", f"{o:.3f}", f"{s:.3f}", style="bold")
    if s > 0:
        table.add_row("share", "", f"{m / s:.1%}", f"{e / s:.1%}", f"{o / s:.1%}", "100%")
    return table


def best_values(run_dir: Path) -> dict[str, float]:
    """The best values recorded in a run directory."""
    path = RunPaths(Path(run_dir)).best
    if not path.exists():
        raise EvomergeError(f"{run_dir}: no best.json; has the run finished a trial?")
    return json.loads(path.read_text())["values"]

