"""``evomerge demo``: the mini-world's Table 1, on a laptop CPU, in minutes.

    build (or load from the cache) the mini-world of --seed: a base, a Japanese-style source,
        a math source (evomerge.miniworld)
    write recipes/miniworld-llm.yaml with the world's paths into the run directory
    evolve it (CMA-ES over per-layer TIES values; fitness: ja_math on the SEARCH split, by default
        estimated from 250 problems with the 8 best re-scored on all; --fitness full scores all)
    score every row on the held-out TEST split (never seen by the search)
    print the table, write the report and summary.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from evomerge.atomic import write_json_atomic
from evomerge.errors import EvomergeError

RECIPE_NAME = "miniworld-llm.yaml"


def template_path() -> Path:
    """The recipe template: the repository's recipes/ folder, or the installed package's copy."""
    from evomerge.shipped import recipes_dir

    path = recipes_dir() / RECIPE_NAME
    if not path.is_file():
        raise EvomergeError(f"recipe template {RECIPE_NAME} not found in {path.parent}")
    return path


# --fitness fast: each trial scores 250 of the 1000 search problems; at the end the 8 best trials
# by that estimate are scored on the rest, raced against each other (evomerge.pipelines.fitness)
FITNESS = {"full": None, "fast": {"mode": "estimated", "anchors": 250, "rescore": 8}}


def concrete_recipe(world: Path, seed: int, template: Path | None = None, fitness: str = "full") -> str:
    text = (template or template_path()).read_text()
    text = text.replace("${WORLD}", str(world)).replace("${SEED}", str(seed))
    if fitness not in FITNESS:
        raise EvomergeError(f"--fitness {fitness!r}: use {' or '.join(FITNESS)}")
    if FITNESS[fitness] is None:
        return text
    recipe = yaml.safe_load(text)
    recipe["search"]["fitness"] = FITNESS[fitness]
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def _metrics(result) -> dict[str, float]:
    return {"accuracy": result.metrics["accuracy"], "accuracy_ja": result.metrics["accuracy_ja"]}


def run_demo(seed: int = 0, run_dir: Path = Path("runs/miniworld"), cache_dir: Path | None = None,
             trials: int | None = None, *, fitness: str = "fast", show_progress: bool = True,
             console: Console | None = None) -> dict:
    """Build/load the world, evolve, score everything on both splits; returns the summary."""
    from evomerge.evaluators.ja_math import JaMathEvaluator
    from evomerge.miniworld.build import build_world, world_dir
    from evomerge.pipelines.evolve import Evolution
    from evomerge.pipelines.report import write_report

    console = console or Console()
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    console.print(f"[bold]mini-world[/] seed {seed}: building or loading the models")
    manifest = build_world(seed, cache_dir, log=console.print)
    build_s = time.perf_counter() - t_start
    world = world_dir(seed, cache_dir)
    console.print(f"world at {world} ({'cached' if manifest.get('cached') else f'built in {build_s:.0f}s'})")

    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / "recipe.yaml"
    text = concrete_recipe(world, seed, fitness=fitness)
    if recipe_path.exists() and yaml.safe_load(recipe_path.read_text()) != yaml.safe_load(text):
        raise EvomergeError(f"{run_dir} holds a run of another world or recipe; pass --run-dir for a new run")
    recipe_path.write_text(text)

    t_search = time.perf_counter()
    # a journal file, not SQLite: a mini-world trial is a fraction of a second, and SQLite's
    # per-value transactions would be a large share of it
    storage = f"journal:{(run_dir / 'study.journal').resolve()}"
    evo = Evolution(recipe_path, run_dir=run_dir, storage=storage, device="cpu", console=console)
    outcome = evo.run(trials, show_progress=show_progress)
    search_s = time.perf_counter() - t_search
    if not outcome.best_values:
        raise EvomergeError(f"{run_dir}: no trial completed; see {run_dir / 'trials'}")

    # -- every row on both splits: search numbers from the run, test numbers scored now ------------
    test_spec = dict(evo.recipe.evaluator)
    test_spec["data"] = {**test_spec["data"], "path": manifest["data"]["test"]}
    test_eval = JaMathEvaluator(test_spec, tokenizer=evo.evaluator.tokenizer)
    rows: dict[str, dict] = {}
    for spec in evo.recipe.baselines:
        runnable = evo.candidates.apply_baseline(spec)
        with torch.no_grad():
            rows[spec["name"]] = {"kind": "source" if "source" in spec else "merge",
                                  "search": {k: outcome.baselines[spec["name"]]["metrics"][k]
                                             for k in ("accuracy", "accuracy_ja")},
                                  "test": _metrics(test_eval(runnable))}
    best = json.loads(evo.paths.best.read_text())
    runnable = evo.candidates.apply(outcome.best_values)
    with torch.no_grad():
        rows["evolved"] = {"kind": "evolved",
                           "search": {"accuracy": best["metrics"]["accuracy"],
                                      "accuracy_ja": best["metrics"]["accuracy_ja"]},
                           "test": _metrics(test_eval(runnable))}
    total_s = time.perf_counter() - t_start

    def shape(split: str) -> dict:
        return {"sources": {n: r[split]["accuracy_ja"] for n, r in rows.items() if r["kind"] == "source"},
                "baselines": {n: r[split]["accuracy_ja"] for n, r in rows.items() if r["kind"] == "merge"},
                "evolved": rows["evolved"][split]["accuracy_ja"]}

    from evomerge.pipelines.evolve import _finished
    from evomerge.pipelines.fitness import search_cost

    finished = _finished(evo.study())
    summary = {"test": shape("test"), "search": shape("search"), "trials": len(finished),
               "seconds": {"build": round(build_s, 1), "search": round(search_s, 1), "total": round(total_s, 1)},
               "seed": seed, "fitness": fitness,
               "cost": search_cost([t.user_attrs for t in finished], run_dir)}
    write_json_atomic(run_dir / "summary.json", summary)
    write_json_atomic(run_dir / "demo.json", {"rows": rows, "world": manifest, "best_trial": best["trial"],
                                              "trial_time": trial_time_split(evo.study())})
    write_test_split(run_dir, rows)
    console.print(results_table(rows, seed))
    report = write_report(run_dir)  # reads test.json: a rebuilt report keeps the test split
    console.print(f"report: {report['summary']}  summary: {run_dir / 'summary.json'}")
    return summary


def results_table(rows: dict[str, dict], seed: int) -> Table:
    """Table 1 of the mini-world: every row on the search split and the held-out test split."""
    table = Table(title=f"mini-world seed {seed}: accuracy on sums with a carry "
                        "(acc_ja: right AND answered in Japanese; test split never seen by the search)")
    for col in ("model", "search acc", "test acc", "search acc_ja", "test acc_ja"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in rows.items():
        label = {"source": name if name == "base" else f"source: {name}", "merge": f"fixed merge: {name}",
                 "evolved": "evolved (best trial)"}[r["kind"]]
        table.add_row(label, f"{r['search']['accuracy']:.1%}", f"{r['test']['accuracy']:.1%}",
                      f"{r['search']['accuracy_ja']:.1%}", f"{r['test']['accuracy_ja']:.1%}",
                      style="bold" if r["kind"] == "evolved" else None)
    return table


def write_test_split(run_dir: Path, rows: dict[str, dict]) -> None:
    """test.json: every row on both splits, kept as data so any later report shows it."""
    write_json_atomic(run_dir / "test.json", {
        "metrics": ["accuracy", "accuracy_ja"], "rows": rows,
        "note": "accuracy_ja (the score): right AND answered in Japanese. The search only ever saw the "
                "search split; the held-out test split was scored once, after it."})


def trial_time_split(study) -> dict:
    """Where the finished trials' time went (from their records, so a resumed run counts all):
    merge, evaluation, and everything else (sampler, storage, records)."""
    from evomerge.pipelines.evolve import _finished

    trials = [t for t in _finished(study) if "total_s" in t.user_attrs]
    total = sum(t.user_attrs["total_s"] for t in trials)
    merge = sum(t.user_attrs.get("merge_s", 0.0) for t in trials)
    evaluate = sum(t.user_attrs.get("eval_s", 0.0) for t in trials)
    return {"trials": len(trials), "total_s": total, "merge_s": merge, "evaluate_s": evaluate,
            "other_s": max(total - merge - evaluate, 0.0),
            "not_evaluation_share": (1 - evaluate / total) if total else None}
