"""Progress bars (rich), silenced when output is not wanted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(title: str, total: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yields ``advance(label)``: one step done, labelled (e.g. the tensor group being merged)."""
    if not enabled:
        yield lambda label="": None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[label]}"), TimeElapsedColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(title, total=total, label="")

        def advance(label: str = "") -> None:
            progress.update(task, advance=1, label=label)

        try:
            yield advance
        except BaseException:  # the error's one line replaces the bar (a pipe would get its last frame)
            progress.live.transient = True
            progress.console.quiet = not progress.console.is_terminal
            raise


@contextmanager
def trial_progress(total: int, done: int, enabled: bool = True) -> Iterator[Callable]:
    """Yields ``update(done, best, timing)`` for a live line: trial n/N, best so far, seconds."""
    if not enabled:
        yield lambda *a: None
        return
    columns = [TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
               TextColumn("best {task.fields[best]}  last: merge {task.fields[merge]}s "
                          "eval {task.fields[eval]}s"), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("trials", total=total, completed=done, best="-", merge="-", eval="-")

        def update(n: int, best: float | None, timing) -> None:
            progress.update(task, completed=n, best="-" if best is None else f"{best:.4f}",
                            merge=f"{timing.merge_s:.2f}", eval=f"{timing.eval_s:.2f}")

        yield update
