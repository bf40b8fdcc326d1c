"""The report of a run: what a person reads after (or during) a search.

    report/summary.html   one self-contained page (CSS inline, figures embedded)
    report/summary.md     the same content in Markdown, linking the PNGs beside it
    report/*.png          history, values, generations, importance (and image grids for SDXL)

Everything comes from the run folder: the recipe, the study, baselines.json, best.json, the
trial records, and test.json when the run scored a held-out split (``evomerge demo`` writes it),
so a report can be rebuilt at any time without losing anything. Fields other tools add later
(fitness cost, CMA-ES bookkeeping) are shown when present and not required.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import EvomergeError, describe
from evomerge.pipelines import report_page, report_plots
from evomerge.pipelines.fitness import cost_rows
from evomerge.pipelines.run_state import RunPaths
from evomerge.pipelines.study import INTERRUPTED, default_popsize, open_storage, unused_by_cmaes
from evomerge.recipe import Recipe, load_recipe

NOT_METRICS = {"merge_s", "eval_s", "total_s", "reason", "stopped"}


def load_run(run_dir: Path):
    if not (run_dir / "recipe.yaml").exists():
        raise EvomergeError(f"{run_dir}: not a run directory (no recipe.yaml); pass the folder evolve wrote")
    recipe = load_recipe(run_dir / "recipe.yaml")
    paths = RunPaths(run_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, url = paths.study_name(recipe), paths.storage()
    storage, _ = open_storage(url, lock_dir=run_dir)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise EvomergeError(f"{run_dir}: the study {name!r} is not in its storage {url}") from None
    except Exception as e:  # a server that does not answer, a file that is not a study
        raise EvomergeError(f"{run_dir}: cannot read the study {name!r} from {url} ({e.__class__.__name__})") from None
    return recipe, study


def cmaes_use(recipe: Recipe, run_dir: Path, trials: list[FrozenTrial]) -> tuple[int, int] | None:
    """(complete trials CMA-ES did not use, complete trials), for CMA-ES runs."""
    sampler = RunPaths(run_dir).recorded().get("sampler") or {}
    if (sampler.get("kind") or recipe.search.sampler) != "cmaes" or not trials:
        return None
    n_values = max((len(t.params) for t in trials), default=1)
    return unused_by_cmaes(trials, recipe.search.popsize or default_popsize(n_values))


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def trial_state(t: FrozenTrial) -> str:
    if t.state == TrialState.PRUNED or t.user_attrs.get("stopped"):
        return "stopped"
    if t.state == TrialState.FAIL:
        return "interrupted" if t.user_attrs.get("reason") == INTERRUPTED else "failed"
    return {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running"}.get(t.state, "waiting")


def trial_metrics(run_dir: Path, t: FrozenTrial) -> dict[str, float]:
    """A trial's metrics: from its record when there is one, else its numeric user attributes."""
    record = _json(run_dir / "trials" / f"{t.number:05d}.json")
    metrics = (record or {}).get("metrics") or {k: v for k, v in t.user_attrs.items() if k not in NOT_METRICS}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metric_label(recipe: Recipe, score: float, metrics: dict[str, float]) -> str:
    """The evaluator, and which of its metrics the score is (e.g. ``ja_math: accuracy_ja``)."""
    spec = recipe.evaluator or {}
    label = spec.get("callable") if spec.get("kind") == "python" else spec.get("kind", "score")
    same = [k for k, v in metrics.items() if k != "score" and math.isclose(v, score, rel_tol=1e-9, abs_tol=1e-12)]
    return f"{label}: {same[0]}" if same else str(label)


def generation_of(t: FrozenTrial, popsize: int) -> int:
    for key, v in t.system_attrs.items():
        if key.endswith("generation") and isinstance(v, int):  # CMA-ES records it
            return v
    return t.number // popsize


def importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """PED-ANOVA importances (numpy only; fANOVA would need scikit-learn), or why there are none."""
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 10:
        return None, f"parameter importance needs at least 10 completed trials ({len(complete)} so far)"
    try:
        return get_param_importances(study, evaluator=PedAnovaImportanceEvaluator()), ""
    except Exception as e:  # a degenerate study (all scores equal...) has no importances
        return None, f"parameter importance: not computable here ({describe(e)})"


def sources(recipe: Recipe) -> list[tuple[str, str]]:
    if recipe.dfs is not None:
        return [(k, str(getattr(recipe.dfs, "model_" + k))) for k in ("a", "b")]
    return ([("base", recipe.base)] if recipe.base else []) + [(m.label, m.model) for m in recipe.models]


def timing_rows(run_dir: Path, trials: list[FrozenTrial], counts: dict[str, int]) -> list[tuple[str, str]]:
    rows = [("trials", ", ".join(f"{n} {state}" for state, n in counts.items() if n))]
    timed = [t for t in trials if "total_s" in t.user_attrs]
    if timed:
        total = sum(t.user_attrs["total_s"] for t in timed)
        merge = sum(t.user_attrs.get("merge_s", 0.0) for t in timed)
        evaluate = sum(t.user_attrs.get("eval_s", 0.0) for t in timed)
        rows += [("time in trials", f"{total:.1f} s ({total / len(timed):.3f} s per trial)"),
                 ("merge / evaluate / other", f"{merge / total:.1%} / {evaluate / total:.1%} / "
                                              f"{max(total - merge - evaluate, 0) / total:.1%}" if total else "-")]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if starts and ends:
        wall = (max(ends) - min(starts)).total_seconds()
        rows.append(("search wall time", f"{wall:.1f} s ({len(ends) / wall * 3600:.0f} trials per hour)"
                     if wall > 0 else f"{wall:.1f} s"))
    summary = _json(run_dir / "summary.json") or {}
    for k, v in (summary.get("seconds") or {}).items():
        rows.append((f"{k} (s)", f"{v}"))
    for k, v in (summary.get("cost") or {}).items():  # the fitness cost summary, when recorded
        rows.append((f"cost: {k}".replace("_", " "), report_page.fmt(v)))
    for k, v in (_json(run_dir / "run.json") or {}).items():
        if k not in ("storage", "study", "root", "version") and isinstance(v, (int, float, str)):
            rows.append((k.replace("_", " "), report_page.fmt(v)))
    return rows


def unused_row(use: tuple[int, int] | None) -> list[tuple[str, str]]:
    if use is None:
        return []
    unused, complete = use
    return [("complete trials CMA-ES did not use", f"{unused} of {complete} ({unused / max(complete, 1):.1%})")]


def test_results(run_dir: Path) -> dict | None:
    """test.json; runs made before it existed keep their held-out rows in demo.json."""
    test = _json(run_dir / "test.json")
    if test is None and (demo := _json(run_dir / "demo.json")) and "rows" in demo:
        first = next(iter(demo["rows"].values()))
        test = {"metrics": list(first["search"]), "rows": demo["rows"]}
    if test is not None:
        test.setdefault("note", "The search only ever saw the search split; the test split was scored "
                                "once, after it.")
    return test


def gather(run_dir: Path, out: Path) -> dict:
    """Everything the pages show, with the figures written to ``out``."""
    recipe, study = load_run(run_dir)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        raise EvomergeError(f"{run_dir}: no completed trial yet; nothing to report")
    best = max(done, key=lambda t: t.value)
    best_score, best_metrics = best.value, trial_metrics(run_dir, best)
    winner = _json(RunPaths(run_dir).best) or {}
    if "estimate" in winner:  # estimated fitness: the best of the trials re-scored on every item
        best, best_score, best_metrics = study.trials[winner["trial"]], winner["score"], winner["metrics"]
    metric = metric_label(recipe, best_score, best_metrics)
    baselines = _json(run_dir / "baselines.json") or {}
    kinds = {b["name"]: ("source" if "source" in b else "fixed merge") for b in recipe.baselines}
    rows = [{"model": f"baseline: {n}", "kind": kinds.get(n, "baseline"), "score": b["score"],
             "metrics": b.get("metrics") or {}} for n, b in baselines.items()]
    rows.append({"model": f"evolved (trial {best.number})", "kind": "evolved", "score": best_score,
                 "metrics": best_metrics})
    names = list(dict.fromkeys(k for r in rows for k, v in r["metrics"].items()
                               if k != "score" and isinstance(v, (int, float)) and not isinstance(v, bool)))
    counts = {s: 0 for s in ("complete", "stopped", "failed", "interrupted", "running")}
    for t in trials:
        counts[trial_state(t)] = counts.get(trial_state(t), 0) + 1
    title = f"{recipe.name}: {metric} on the search split"
    figures = [{"title": "Optimisation history", "caption": (
        f"Every trial's {metric}; failed trials are marked below the lowest score, trials stopped early "
        "with the score they had; dashed lines are the baselines."),
        "path": report_plots.history(out / "history.png", [
            {"number": t.number, "state": trial_state(t), "value": t.value if t.value is not None else
             (max(t.intermediate_values.values()) if t.intermediate_values else None)}
            for t in trials if trial_state(t) in ("complete", "failed", "stopped")],
            {n: b["score"] for n, b in baselines.items()}, metric=metric, title=title)}]
    notes: list[str] = []
    if recipe.dfs is not None:  # layer-path values: repetitions x layers
        from evomerge.pipelines.dfs_plan import dfs_value_grid

        figures.append({"title": "Best trial's layer path", "caption": "Indicators (> 0: the layer is kept) "
                        "per repetition, and the hand-over scales.", "path": report_plots.grid_values(
                            out / "values.png", *dfs_value_grid(best.params, recipe), title=f"trial {best.number}")})
    else:
        bounds = {k: tuple(v) for k, v in recipe.merge.search.items()}
        g = recipe.merge.granularity
        figures.append({"title": "Best trial's values", "caption": (
            "Per layer group and source; each value kind is coloured on its own search bounds."),
            "path": report_plots.values(out / "values.png", best.params, g, bounds, title=f"trial {best.number}")})
        popsize = recipe.search.popsize or default_popsize(len(best.params))
        generations = [(generation_of(t, popsize), t.params) for t in done]
        if len({gen for gen, _ in generations}) > 1:
            figures.append({"title": "Values over generations", "caption": (
                "Mean over each generation's trials and layer groups, per source; the band spans the groups."),
                "path": report_plots.generations(out / "generations.png", generations, g, bounds,
                                                 title="how the search moved")})
        else:
            notes.append(f"values over generations: one generation so far (population {popsize})")
    scores, why = importances(study)
    if scores:
        figures.append({"title": "Parameter importance", "caption": (
            "Optuna's PED-ANOVA: how much each value separates the best 10% of trials from the rest."),
            "path": report_plots.importance(out / "importance.png", scores, title="which values matter")})
    else:
        notes.append(why)
    figures += image_grids(run_dir, out, baselines, best_score)
    storage = RunPaths(run_dir).storage().removeprefix("journal:")  # optuna-dashboard takes a journal's path
    counted = counts["complete"] + counts["failed"] + counts["stopped"]
    return {"name": recipe.name, "metric": metric, "rows": rows, "metric_names": names,
            "headline": f"{metric}, higher is better. {counted} trials ({recipe.search.sampler}), best: "
                        f"trial {best.number} with {best_score:.4f}.",
            "notes": notes, "test": test_results(run_dir), "sources": sources(recipe), "figures": figures,
            "best": {"trial": best.number, "values": dict(best.params)},
            "timing": timing_rows(run_dir, trials, counts) + unused_row(cmaes_use(recipe, run_dir, trials))
            + cost_rows(trials, run_dir), "cmaes_use": cmaes_use(recipe, run_dir, trials), "recipe_text": (run_dir / "recipe.yaml").read_text(),
            "dashboard": f"optuna-dashboard {storage}", "storage": storage}


def image_grids(run_dir: Path, out: Path, baselines: dict, best_score: float) -> list[dict]:
    """SDXL: the best evaluation's image grid, then each baseline's (evolve keeps a copy)."""
    images = run_dir / "images"
    state = _json(images / "best.json") or {}
    best = "best trial" if math.isclose(state.get("score", math.nan), best_score, rel_tol=1e-6) else \
        "best evaluation (a baseline outscored every trial)"
    found = [(best, images / "best.png")] + [(f"baseline: {n}", images / f"baseline-{n}.png") for n in baselines]
    figures = []
    for label, path in found:
        if path.is_file():
            copy = out / f"images-{path.stem}.png"
            shutil.copyfile(path, copy)
            figures.append({"title": f"Images: {label}", "caption": "Each prompt with its fixed seed, "
                            "as the evaluator sampled them.", "path": copy})
    return figures


def write_report(run_dir: Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    report = gather(run_dir, out)
    (out / "summary.md").write_text(report_page.markdown(report))
    (out / "summary.html").write_text(report_page.page(report))
    files = {f["path"].stem: f["path"] for f in report["figures"]}
    return {**files, "summary": out / "summary.md", "html": out / "summary.html", "storage": report["storage"],
            "cmaes_use": report["cmaes_use"]}
