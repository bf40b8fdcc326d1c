"""Fitness at a fraction of the cost, measured: the mini-world demo with `--fitness full` and
`--fitness fast` for each seed, side by side (evolved model's held-out test accuracy, items the
search scored, evaluation seconds).

    python benchmarks/bench_fitness.py                  # seeds 0 1 2, runs under runs/bench-fitness/
    python benchmarks/bench_fitness.py --seeds 0 2 --out /tmp/bf

Each run is an ordinary demo run folder (`<out>/seed<k>-<mode>/`), so a rerun resumes finished
runs instantly and only prints the table again. Worlds come from the usual cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evomerge.pipelines.demo import run_demo

MODES = ("full", "fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fitness"))
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    quiet = Console(quiet=True)
    rows = {}
    for seed in args.seeds:
        for mode in MODES:
            console.print(f"seed {seed}, --fitness {mode} ...")
            rows[seed, mode] = run_demo(seed, args.out / f"seed{seed}-{mode}", args.cache_dir, fitness=mode,
                                        show_progress=False, console=quiet)
    table = Table(title="mini-world: evolved model's test accuracy (Japanese-counted) and the search's cost")
    for col in ("seed", "full: test acc", "full: items", "fast: test acc", "fast: items", "items fast/full",
                "acc fast-full", "eval s full", "eval s fast"):
        table.add_column(col, justify="right")
    for seed in args.seeds:
        full, fast = rows[seed, "full"], rows[seed, "fast"]
        table.add_row(str(seed), f"{full['test']['evolved']:.1%}", f"{full['cost']['items_scored']:,}",
                      f"{fast['test']['evolved']:.1%}", f"{fast['cost']['items_scored']:,}",
                      f"{fast['cost']['items_scored'] / full['cost']['items_scored']:.2f}x",
                      f"{100 * (fast['test']['evolved'] - full['test']['evolved']):+.1f} pt",
                      f"{full['cost']['evaluate_seconds']:.0f}", f"{fast['cost']['evaluate_seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
