"""Evolve a merge recipe: the loop of the paper, on an Optuna study.

    check everything before writing anything: recipe, evaluator, sampler, storage, device, models
    open the recipe's models once, build the runnable model once
    preflight: one evaluation (the first baseline, else the merge at the box centre) must succeed
    score the baselines the recipe asks for (once per study, whichever worker gets there first)
    until the study holds N finished trials:
        claim a trial: CMA-ES samples values (mean 0.5, sigma 1/6 in the normalised box), or wait
            while the current generation is fully asked
        merge in memory into the runnable's parameters
        evaluate the runnable -> one score (higher is better)
        record the trial (study storage + a JSON file) and tell the sampler
    write the best values (and the best model with --export-best)

Everything lives in a run folder; rerunning the same command resumes, and starting it again
while it runs adds a worker (:mod:`evomerge.pipelines.study` says how they share the study). A
trial whose worker died is retired ("interrupted", not counted) and its slot sampled again; a
trial whose merge holds NaN/inf or whose evaluation raises fails alone, and the run goes on
unless ``search.max_consecutive_failures`` trials in a row fail the same way.

A little over 400 lines on purpose: it is the loop above, read top to bottom in one place; how
workers share a study lives in study.py, storage.py and run_state.py.
"""

from __future__ import annotations

import math
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from rich.console import Console

from evomerge.errors import EvomergeError, describe
from evomerge.evaluators.base import Result, load_evaluator
from evomerge.pipelines.candidates import make_candidates
from evomerge.pipelines.fitness import Fitness, Scored
from evomerge.pipelines.run_state import (
    RunPaths,
    claim_run_dir,
    failure_kind,
    json_safe,
    read_json,
    run_folder,
    settle,
    write_json_atomic,
)
from evomerge.pipelines.study import (
    INTERRUPTED,
    Backoff,
    SharedStudy,
    check_storage,
    counted,
    default_popsize,
    distributions,
    make_sampler,
    open_study,
)
from evomerge.progress import TrialLog, timing_summary
from evomerge.recipe import load_recipe
from evomerge.recipe_paths import pin_root

__all__ = ["INTERRUPTED", "Evolution", "EvolveOutcome", "RunPaths", "TrialTiming", "best_values",
           "default_popsize", "write_json_atomic"]


@dataclass
class TrialTiming:
    number: int
    score: float | None
    merge_s: float
    eval_s: float
    total_s: float
    error: str = ""
    generated_tokens: float = 0.0  # generating evaluators (ja_math) record their decoding cost
    generate_s: float = 0.0

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
    """One worker of a run: a recipe, its run folder and study, the runnable model, the evaluator."""

    def __init__(self, recipe_path: str | Path, *, run_dir: str | Path | None = None,
                 storage: str | None = None, sampler: str | None = None, study_name: str | None = None,
                 device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False,
                 console: Console | None = None, command: str | None = None):
        recipe_path = Path(recipe_path)
        self.recipe = load_recipe(recipe_path)
        if not self.recipe.evaluator:
            raise EvomergeError(f"{recipe_path}: field evaluator: missing; evolve needs an evaluator to score trials")
        self.paths = RunPaths(run_folder(self.recipe, run_dir))
        self.console = console or Console()
        check_storage(storage, run_dir=self.paths.root)
        if sampler is not None:
            make_sampler(sampler, {}, seed=0, popsize=None, separable=False)  # a bad name: one line
        text = recipe_path.read_text()
        if recipe_path.resolve() != self.paths.recipe.resolve():
            text = pin_root(text, recipe_path)
        started = self.paths.baselines.exists() or any(self.paths.trials.glob("*.json"))
        self.command = command or f"evomerge evolve {recipe_path} --run-dir NEW_FOLDER"
        self.settings = settle(self.paths, self.recipe, text, storage=storage, study=study_name,
                               sampler=sampler, new_command=self.command, started=started)
        # models and evaluator are opened (and checked) before the run folder is made
        self.candidates = make_candidates(
            self.recipe, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
            console=self.console)
        if not self.candidates.space.names:
            raise EvomergeError(f"{recipe_path}: field merge.search: empty; name the values to search, e.g. weight: [0, 1]")
        self.evaluator = load_evaluator(self.recipe.evaluator, tokenizer_source=self.candidates.tokenizer_source,
                                        settings=self.candidates.evaluator_settings)
        self.fitness = Fitness.for_recipe(self.evaluator, self.recipe.search.fitness, seed=self.recipe.seed)
        claim_run_dir(self.paths, recipe_path, text, self.settings, started=started)
        self.evaluator.set_run_dir(self.paths.root)  # evaluators that write files (image grids)
        self.sampler_kind = self.settings.sampler
        self.storage = self.paths.expand(self.settings.storage)
        self.started_at = time.time()
        self._shared: SharedStudy | None = None
        self._finalized = False  # this worker wrote the study's final best

    def say(self, text: str) -> None:
        """One log line, never wrapped or read as markup (errors quote code and paths)."""
        self.console.print(text, soft_wrap=True, markup=False, highlight=False)

    # -- the study -----------------------------------------------------------------------------

    def shared(self) -> SharedStudy:
        if self._shared is None:
            space = distributions(self.candidates.space)
            popsize = self.recipe.search.popsize or default_popsize(len(space))
            sampler = make_sampler(self.sampler_kind, space, seed=self.recipe.seed,
                                   popsize=self.recipe.search.popsize, separable=self.recipe.search.separable)
            study, lock = open_study(self.storage, self.settings.study, sampler, lock_dir=self.paths.root)
            self._shared = SharedStudy(study, lock, space, popsize if self.sampler_kind == "cmaes" else None)
        return self._shared

    def study(self) -> optuna.Study:
        return self.shared().study

    # -- one trial ----------------------------------------------------------------------------

    def _score(self, runnable) -> Scored:
        with torch.no_grad():
            return self.fitness.score(runnable)

    def run_trial(self, shared: SharedStudy, trial: optuna.Trial) -> TrialTiming:
        start = time.perf_counter()
        values = dict(trial.params)  # sampled when the trial was claimed
        merge_s = eval_s = 0.0
        scored = score = None
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
            record.update(score=score, metrics=json_safe(result.metrics), items=json_safe(result.items),
                          fitness=json_safe(scored.record()))
        except Exception as e:  # a bad candidate fails alone; the run goes on
            record.update(error=describe(e), traceback=traceback.format_exc(limit=3))
        except BaseException:  # Ctrl-C, SIGTERM: nothing half-way, the trial is redone on resume
            shared.interrupt(trial)
            raise
        try:
            record.update(merge_s=merge_s, eval_s=eval_s)
            # one line per trial record: with every item's output inside, pretty-printing costs
            # more than the merge of a small model
            write_json_atomic(self.paths.trials / f"{trial.number:05d}.json", record, indent=None)
            total = time.perf_counter() - start  # bookkeeping up to here; tell() is the sampler's
            try:
                attrs = {"merge_s": merge_s, "eval_s": eval_s, "total_s": total}
                if score is not None:
                    attrs.update(json_safe({**scored.result.metrics, **scored.attrs()}))
                else:
                    attrs["reason"] = record["error"][:500]
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
                shared.release(trial)
                if score is None:
                    shared.study.tell(trial, state=TrialState.FAIL)
                else:
                    shared.study.tell(trial, score)
                    self.fitness.adopt(trial.number, scored)
            except UpdateFinishedTrialError:  # our lease lapsed (a long stall) and another worker retired it
                record["error"] = "retired by another worker while it ran (its lease had lapsed); result dropped"
                score = None
            finally:
                shared.release(trial)
        except BaseException:  # Ctrl-C or an unwritable record before tell(): retire it now, so
            shared.interrupt(trial)  # no live process (a notebook) keeps it running for ever
            raise
        metrics = record.get("metrics", {}) if score is not None else {}
        return TrialTiming(trial.number, score, merge_s, eval_s, time.perf_counter() - start,
                           record.get("error", ""), metrics.get("generated_tokens", 0.0),
                           metrics.get("generate_seconds", 0.0))

    # -- preflight and baselines --------------------------------------------------------------

    def _job(self, shared: SharedStudy, key: str, work, *, fatal: bool) -> dict | None:
        """Run a once-per-study job here, or take another worker's result. A failure is one
        line naming the job: fatal (the preflight: exit 2) or skipped."""
        status = shared.take(key, retry_failed_before=self.started_at)
        if status == "busy":
            status = shared.wait_job(key)["status"]
        if status == "mine":
            try:
                result = work()
            except Exception as e:
                shared.finish(key, failed=describe(e))
                status = "failed"
            except BaseException:  # Ctrl-C: another worker (or the rerun) does it
                shared.finish(key, release=True)
                raise
            else:
                shared.finish(key, result=result)
                return result
        rec = shared.job(key) or {}
        if status == "failed" or "failed" in rec:
            what = "the merge at the centre of the search box" if key == "preflight" else key.replace(":", " ")
            message = f"{what}: {rec.get('failed', 'failed')}"
            if fatal:
                raise EvomergeError(f"preflight: {message}; nothing was searched (fix it and rerun)")
            self.say(f"{message} (skipped)")
            return None
        return rec.get("result")

    def _baseline(self, spec: dict) -> dict:
        with torch.no_grad():
            result: Result = self.evaluator(self.candidates.apply_baseline(spec))
        grids = self.evaluator.grid_dir  # image grids: the report shows each baseline's
        if grids is not None and (grids / "latest.png").exists():
            shutil.copyfile(grids / "latest.png", grids / f"baseline-{spec['name']}.png")
        self.say(f"baseline {spec['name']}: {result.score:.4f}")
        # per-item scores order the items for racing and estimated fitness
        return json_safe({"score": result.score, "metrics": result.metrics, "values": result.values})

    def _centre(self) -> dict:
        space = self.candidates.space
        values = {n: sum(space.bounds(n)) / 2 for n in space.names}
        with torch.no_grad():
            result = self.evaluator(self.candidates.apply(values))
        return {"score": json_safe(result.score)}

    def score_baselines(self, shared: SharedStudy | None = None) -> dict[str, dict]:
        """Score each baseline the recipe names, once per study (kept in baselines.json too).
        The first is the preflight: if it fails, the run stops before trial 1."""
        shared = shared or self.shared()
        done = read_json(self.paths.baselines, "baselines.json") if self.paths.baselines.exists() else {}
        if not self.recipe.baselines:
            self._job(shared, "preflight", self._centre, fatal=True)
        for i, spec in enumerate(self.recipe.baselines):
            name = spec["name"]
            if name not in done:
                result = self._job(shared, f"baseline:{name}", lambda spec=spec: self._baseline(spec), fatal=i == 0)
                if result is not None:
                    done[name] = result
                    write_json_atomic(self.paths.baselines, done)
        return done

    # -- the loop -----------------------------------------------------------------------------

    def run(self, trials: int | None = None, *, export_best: bool = False,
            show_progress: bool = True) -> EvolveOutcome:
        try:
            return self._run(trials, export_best=export_best, show_progress=show_progress)
        finally:  # one Python process may run many evolutions (a notebook): hold nothing after
            if self._shared is not None:
                self._shared.close()
                self._shared = None

    def _run(self, trials: int | None, *, export_best: bool, show_progress: bool) -> EvolveOutcome:
        total = trials or self.recipe.search.trials
        shared = self.shared()
        baselines = self.score_baselines(shared)
        self.fitness.prepare(self.paths.root, [b.get("values", []) for b in baselines.values()])
        self._recover_incumbent(shared.study)
        timings: list[TrialTiming] = []
        streak: list[str] = []
        limit = self.recipe.search.max_consecutive_failures
        done = sum(counted(t) for t in shared.trials())
        complete_before = done >= total
        wait = Backoff()
        with TrialLog(total, done, self.console, enabled=show_progress) as log:
            while True:
                claim = shared.claim(total)
                if claim.retired:
                    log.note(f"retired trial(s) {', '.join(map(str, claim.retired))} of a dead worker; "
                             "their slots are sampled again")
                if claim.kind == "done":
                    break
                if claim.kind == "wait":
                    log.waiting(claim.why)
                    wait()
                    continue
                wait.reset()
                if self.fitness.mode == "racing":
                    self._recover_incumbent(shared.study)  # other workers may have a better one
                timing = self.run_trial(shared, claim.trial)
                timings.append(timing)
                trials_now = shared.trials()
                done = sum(counted(t) for t in trials_now)
                best = max((t.value for t in trials_now if t.state == TrialState.COMPLETE), default=None)
                log.trial(timing, done, best, timing.error)
                if best is not None and timing.score == best:
                    self._write_best(shared.study)
                streak = streak + [failure_kind(timing.error)] if timing.score is None else []
                if limit and len(streak) >= limit and len(set(streak[-limit:])) == 1:
                    raise EvomergeError(f"stopped: the last {limit} trials failed the same way ({timing.error}); "
                                        f"see {self.paths.trials} (search.max_consecutive_failures)")
        outcome = EvolveOutcome(self.paths.root, None, {}, timings, self._refresh_baselines(baselines))
        final = self._job(shared, f"final:{total}", lambda: self._finalize(shared.study), fatal=False)
        if final is not None:
            write_json_atomic(self.paths.best, final)
            outcome.best_value, outcome.best_values = final["score"], final["values"]
        if timings:
            self.console.print(timing_summary(timings))
        # one export per study: by the worker that finished it (or a rerun of a finished one)
        if export_best and outcome.best_values and (complete_before or self._finalized):
            out = self.candidates.export(outcome.best_values, self.paths.root / "best",
                                         extra_card=self._card_note(shared.study), show_progress=show_progress)
            self.say(f"best model written to {out}")
        return outcome

    def _refresh_baselines(self, done: dict[str, dict]) -> dict[str, dict]:
        """Baselines another worker scored meanwhile, into this run folder's baselines.json."""
        shared = self.shared()
        for spec in self.recipe.baselines:
            rec = shared.job(f"baseline:{spec['name']}") or {}
            if spec["name"] not in done and "result" in rec:
                done[spec["name"]] = rec["result"]
        if done:
            write_json_atomic(self.paths.baselines, done)
        return done

    def _finalize(self, study: optuna.Study) -> dict | None:
        """Once per study, by the worker that finds it finished: the re-scores of estimated
        fitness, then best.json."""
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            return None
        self._finalized = True
        self._write_best(study, self._rescore_best(study))
        return read_json(self.paths.best, "best.json")

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
        write_json_atomic(self.paths.best, json_safe(best))

    # -- racing and estimated fitness ---------------------------------------------------------

    def _fitness_record(self, number: int) -> dict | None:
        """A trial's per-item scores, from its record (None when another host ran it)."""
        path = self.paths.trials / f"{number:05d}.json"
        return read_json(path, "trial record").get("fitness") if path.exists() else None

    def _recover_incumbent(self, study: optuna.Study) -> None:
        """Race against the best fully scored trial the study has (its per-item scores are in
        its trial record): after a resume, and before each trial when other workers run."""
        full = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("fitness_full")]
        if full and self.fitness.mode != "full":
            t = max(full, key=lambda t: t.value)
            if self.fitness.incumbent is None or t.value > self.fitness.incumbent.score:
                self.fitness.recover([(t.number, t.value, self._fitness_record(t.number))])

    def _rescore_best(self, study: optuna.Study) -> dict | None:
        """Estimated fitness: the best trials by estimate, re-scored on every item."""
        if self.fitness.mode != "estimated":
            return None
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        top = [(t.number, t.value, self._fitness_record(t.number)) for t in sorted(complete, key=lambda t: -t.value)]
        top = [entry for entry in top if entry[2] is not None][:self.fitness.rescore]  # records here
        with torch.no_grad():
            return self.fitness.finalize(
                self.paths.root, top,
                lambda number: self.candidates.apply(study.trials[number].params), log=self.say)

    def _card_note(self, study: optuna.Study) -> str:
        best = read_json(self.paths.best, "best.json")
        finished = sum(counted(t) for t in study.get_trials(deepcopy=False))
        return (f"## Evolution\n\nBest of {finished} trials ({self.sampler_kind}): "
                f"trial {best['trial']}, score {best['score']:.4f} on the search set.")


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward the total (complete, or failed for a reason of their own)."""
    return [t for t in study.get_trials(deepcopy=False) if counted(t)]


def best_values(run_dir: Path) -> dict[str, float]:
    """The best values recorded in a run directory."""
    path = RunPaths(Path(run_dir)).best
    if not path.exists():
        raise EvomergeError(f"{run_dir}: no best.json; has the run finished a trial?")
    return read_json(path, "best.json")["values"]
