"""Plots and tables of a run: what a person looks at after (or during) a search.

``report/history.png``  score of every trial, best so far, baselines as lines
``report/values.png``   heatmap of the best trial's values, group x (source, value)
``report/summary.md``   sources, baselines, best trial, timings (also as summary.html)
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.pipelines.evolve import RunPaths, open_storage  # noqa: E402
from evomerge.recipe import load_recipe  # noqa: E402


def load_run(run_dir: Path):
    if not (run_dir / "recipe.yaml").exists():
        raise EvomergeError(f"{run_dir}: not a run directory (no recipe.yaml); pass the folder evolve wrote")
    recipe = load_recipe(run_dir / "recipe.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=recipe.name, storage=open_storage(RunPaths(run_dir).storage()))
    except KeyError:
        raise EvomergeError(f"{run_dir}: the study {recipe.name!r} is not in its storage") from None
    return recipe, study


def value_grid(params: dict[str, float], granularity: str) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows (groups, or "all"), columns (source/value) and cells of a set of named values.

    Per-group names start with the group (``layers.3/src/weight``, ``layers.3/t``); other names
    (``src/weight``, ``t``) apply to all groups.
    """
    rows, cols, cells = [], [], {}
    for name, v in params.items():
        group, col = name.split("/", 1) if granularity == "per_group" else ("all", name)
        rows += [group] if group not in rows else []
        cols += [col] if col not in cols else []
        cells[(group, col)] = v
    return rows, cols, [[cells.get((r, c), float("nan")) for c in cols] for r in rows]


def write_report(run_dir: Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    recipe, study = load_run(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        raise EvomergeError(f"{run_dir}: no completed trial yet; nothing to report")
    baselines = json.loads((run_dir / "baselines.json").read_text()) if (run_dir / "baselines.json").exists() else {}

    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [t.number for t in done]
    ys = [t.value for t in done]
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y)
        best.append(running)
    ax.scatter(xs, ys, s=12, alpha=0.6, label="trial")
    ax.plot(xs, best, color="C3", label="best so far")
    for i, (name, b) in enumerate(baselines.items()):
        ax.axhline(b["score"], linestyle="--", color=f"C{(i + 4) % 10}", label=f"baseline: {name}")
    ax.set_xlabel("trial")
    ax.set_ylabel("score (search set)")
    ax.set_title(f"{recipe.name}: optimisation history")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=120)
    plt.close(fig)

    bt = study.best_trial
    if recipe.dfs is not None:  # layer-path values: repetitions x layers
        from evomerge.merging.dfs import dfs_value_grid

        rows, cols, grid = dfs_value_grid(bt.params, recipe)
    else:
        rows, cols, grid = value_grid(bt.params, recipe.merge.granularity)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(cols) + 2), max(2.5, 0.35 * len(rows) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(f"best trial {bt.number}: chosen values")
    fig.tight_layout()
    fig.savefig(out / "values.png", dpi=120)
    plt.close(fig)

    storage = RunPaths(run_dir).storage().removeprefix("journal:")  # optuna-dashboard takes a journal's path
    table = [("model", "score")] + [(f"baseline: {n}", f"{b['score']:.4f}") for n, b in baselines.items()]
    table.append((f"evolved (trial {bt.number})", f"{bt.value:.4f}"))
    failed = sum(1 for t in trials if t.state == TrialState.FAIL)
    md = [f"# {recipe.name}", "",
          f"{len(done)} completed trials, {failed} failed. Scores are on the search set.", "",
          "| " + " | ".join(table[0]) + " |", "|---|---|"]
    md += [f"| {a} | {b} |" for a, b in table[1:]]
    md += ["", "## Sources", ""] + ([f"- base: `{recipe.base}`"] if recipe.base else [])
    md += [f"- `{m.label}`: `{m.model}`" for m in recipe.models]
    if recipe.dfs is not None:
        md += [f"- `{k}`: `{getattr(recipe.dfs, 'model_' + k)}`" for k in ("a", "b")]
    md += ["", "## Best values", "", "| value | chosen |", "|---|---|"]
    md += [f"| `{k}` | {v:.4f} |" for k, v in bt.params.items()]
    md += ["", "![history](history.png)", "", "![values](values.png)", "",
           f"Open the Optuna dashboard: `optuna-dashboard {storage}`"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    rows_html = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td></tr>" for a, b in table[1:])
    (out / "summary.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(recipe.name)}</title>"
        f"<h1>{html.escape(recipe.name)}</h1><p>{len(done)} completed trials, {failed} failed.</p>"
        f"<table border=1><tr><th>model</th><th>score</th></tr>{rows_html}</table>"
        f"<img src='history.png'><img src='values.png'>"
        f"<p>Dashboard: <code>optuna-dashboard {html.escape(storage)}</code></p>\n")
    return {"history": out / "history.png", "values": out / "values.png",
            "summary": out / "summary.md", "html": out / "summary.html", "storage": storage}
