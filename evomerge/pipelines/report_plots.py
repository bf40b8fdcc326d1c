"""The report's figures, each a PNG from plain data (no study or run folder in here).

history       every trial's score, failed/stopped trials marked, best so far, baselines labelled
values        the best trial's values: one heatmap per value kind (weight, density...), layer
              group x source, coloured on that value's own search bounds, numbers in the cells
generations   how each value kind moved: per source, the mean over groups of each generation
importance    which values the score depends on (Optuna's PED-ANOVA evaluator)
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIG_DPI = 110


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def split_name(name: str, granularity: str) -> tuple[str, str, str]:
    """(group, source, kind) of a searched value's name: ``layers.3/m1/weight``, ``m1/weight``,
    ``weight``, ``layers.3/t``; missing parts are ``all`` (group) and ``-`` (source)."""
    parts = name.split("/")
    group = parts.pop(0) if granularity == "per_group" and len(parts) > 1 else "all"
    kind = parts.pop()
    return group, (parts[0] if parts else "-"), kind


def history(path: Path, trials: list[dict], baselines: dict[str, float], *, metric: str, title: str) -> Path:
    """``trials``: dicts with number, value (None when failed) and state (complete/failed/stopped)."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    done = [t for t in trials if t["state"] == "complete"]
    stopped = [t for t in trials if t["state"] == "stopped"]
    failed = [t for t in trials if t["state"] == "failed"]
    ax.scatter([t["number"] for t in done], [t["value"] for t in done], s=14, alpha=0.6, color="C0",
               label=f"trial ({len(done)})")
    if stopped:
        ax.scatter([t["number"] for t in stopped], [t["value"] for t in stopped], s=22, marker="v",
                   color="C1", label=f"stopped early ({len(stopped)})")
    best, running, xs = [], -math.inf, []
    for t in sorted(done, key=lambda t: t["number"]):
        running = max(running, t["value"])
        xs.append(t["number"])
        best.append(running)
    ax.step(xs, best, where="post", color="C3", linewidth=2, label="best so far")
    # baselines: one line per distinct value, labelled with every name at that value
    by_value: dict[float, list[str]] = defaultdict(list)
    for name, v in baselines.items():
        by_value[round(v, 4)].append(name)
    for v, names in sorted(by_value.items()):
        ax.axhline(v, linestyle="--", linewidth=1, color="0.45")
        ax.annotate(f"{', '.join(names)}: {v:.4g}", xy=(1.0, v), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8, color="0.25")
    values = [t["value"] for t in done + stopped] + list(baselines.values())
    if failed and values:
        low = min(values)
        span = (max(values) - low) or 1.0
        ax.scatter([t["number"] for t in failed], [low - 0.06 * span] * len(failed), marker="x",
                   color="crimson", s=30, label=f"failed ({len(failed)})")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.25)
    return _save(fig, path)


def _panel_grid(params: dict[str, float], granularity: str, kind: str) -> tuple[list[str], list[str], list[list[float]]]:
    rows: list[str] = []
    cols: list[str] = []
    cells = {}
    for name, v in params.items():
        group, source, k = split_name(name, granularity)
        if k != kind:
            continue
        rows += [group] if group not in rows else []
        cols += [source] if source not in cols else []
        cells[(group, source)] = v
    return rows, cols, [[cells.get((r, c), math.nan) for c in cols] for r in rows]


def _heatmap(ax, rows, cols, grid, vmin, vmax, title: str) -> None:
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                light = (v - vmin) / ((vmax - vmin) or 1) < 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if light else "black")
    ax.set_title(title, fontsize=10)
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def values(path: Path, params: dict[str, float], granularity: str, bounds: dict[str, tuple[float, float]],
           *, title: str) -> Path:
    """One heatmap per value kind (its colour scale is its own search bounds)."""
    kinds = list(dict.fromkeys(split_name(n, granularity)[2] for n in params))
    panels = [(k, *_panel_grid(params, granularity, k)) for k in kinds]
    n_rows = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 3.2 * len(panels) + 1), max(2.6, 0.32 * n_rows + 1.6)),
                             squeeze=False)
    for ax, (kind, rows, cols, grid) in zip(axes[0], panels, strict=True):
        flat = [v for row in grid for v in row if not math.isnan(v)]
        lo, hi = bounds.get(kind, (min(flat), max(flat)))
        _heatmap(ax, rows, cols, grid, lo, hi, f"{kind} (bounds {lo:g}..{hi:g})")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def grid_values(path: Path, rows: list[str], cols: list[str], grid: list[list[float]], *, title: str) -> Path:
    """A single annotated heatmap (a DFS trial's layer path), on the grid's own range."""
    flat = [v for row in grid for v in row if not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(cols) + 2), max(2.5, 0.4 * len(rows) + 1.5)))
    _heatmap(ax, rows, cols, grid, min(flat), max(flat), title)
    return _save(fig, path)


def generations(path: Path, trials: list[tuple[int, dict[str, float]]], granularity: str,
                bounds: dict[str, tuple[float, float]], *, title: str) -> Path:
    """``trials``: (generation, params) of completed trials. Per value kind, a line per source:
    the generation's mean over its trials and groups, with the range over groups shaded."""
    series: dict[tuple[str, str], dict[int, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for gen, params in trials:
        for name, v in params.items():
            group, source, kind = split_name(name, granularity)
            series[(kind, source)][gen][group].append(v)
    kinds = list(dict.fromkeys(k for k, _ in series))
    fig, axes = plt.subplots(1, len(kinds), figsize=(max(5, 4.2 * len(kinds)), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for i, (k, source) in enumerate(s for s in series if s[0] == kind):
            gens = sorted(series[(k, source)])
            per_group = [{g: sum(v) / len(v) for g, v in series[(k, source)][gen].items()} for gen in gens]
            mean = [sum(d.values()) / len(d) for d in per_group]
            ax.plot(gens, mean, marker="o", markersize=3, color=f"C{i}", label=source)
            ax.fill_between(gens, [min(d.values()) for d in per_group], [max(d.values()) for d in per_group],
                            color=f"C{i}", alpha=0.15)
        if kind in bounds:
            ax.set_ylim(*bounds[kind])
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("generation")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def importance(path: Path, scores: dict[str, float], *, title: str, top: int = 20) -> Path:
    items = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
    fig, ax = plt.subplots(figsize=(7.5, max(2.4, 0.28 * len(items) + 1.2)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="C2")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("importance (share of the score's variation)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
