"""Progress bars (rich), silenced when output is not wanted, and the search's trial log."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class TrialLog:
    """A search's progress: a live bar on a terminal; otherwise one line per trial, flushed at
    once (a log file or a pipe shows each trial as it ends). Both carry an ETA from the study's
    pace since this worker started (every worker's trials count)."""

    def __init__(self, total: int, done: int, console: Console | None = None, enabled: bool = True):
        self.total, self.start_done, self.enabled = total, done, enabled
        self.console = console or Console()
        self.t0 = time.monotonic()
        self._bar: Progress | None = None
        self._waiting = ""

    def __enter__(self) -> TrialLog:
        if self.enabled and self.console.is_terminal:
            columns = [TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("best {task.fields[best]}  last: merge {task.fields[merge]}s "
                                  "eval {task.fields[eval]}s  ETA {task.fields[eta]}"), TimeElapsedColumn()]
            self._bar = Progress(*columns, console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("trials", total=self.total, completed=self.start_done,
                                            best="-", merge="-", eval="-", eta="-")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def eta(self, done: int) -> str:
        pace = (done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        return _duration((self.total - done) / pace) if pace > 0 and done < self.total else "-"

    def trial(self, timing, done: int, best: float | None, note: str = "") -> None:
        self._waiting = ""
        best_s = "-" if best is None else f"{best:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, best=best_s, merge=f"{timing.merge_s:.2f}",
                             eval=f"{timing.eval_s:.2f}", eta=self.eta(done))
            if note:
                self._bar.console.print(note, soft_wrap=True, markup=False, highlight=False)
        elif self.enabled:
            score = "failed" if timing.score is None else f"{timing.score:.4f}"
            self.line(f"trial {timing.number}: {score}{f' ({note})' if note else ''}  best {best_s}  "
                      f"merge {timing.merge_s:.2f}s eval {timing.eval_s:.2f}s  {done}/{self.total} done, "
                      f"ETA {self.eta(done)}")

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, soft_wrap=True, markup=False, highlight=False)
        elif self.enabled:
            self.line(text)

    def waiting(self, why: str) -> None:
        """Said once per wait, not once per poll."""
        if why != self._waiting:
            self._waiting = why
            self.note(f"waiting: {why}")

    def line(self, text: str) -> None:
        print(text, file=self.console.file, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def timing_summary(timings: list, title: str = "trial time (s)") -> Table:
    """Where this worker's trial time went: totals, shares and percentiles of merge,
    evaluation and everything else (one row per part, whatever the number of trials)."""
    failed = sum(t.score is None for t in timings)
    table = Table(title=f"{title}: {len(timings)} trials" + (f", {failed} failed" if failed else ""))
    for col in ("part", "total", "share", "mean", "p50", "p90", "max"):
        table.add_column(col, justify="right")
    whole = sum(t.total_s for t in timings)
    for label, attr in (("merge", "merge_s"), ("evaluate", "eval_s"), ("other", "other_s"), ("trial", "total_s")):
        values = [getattr(t, attr) for t in timings]
        total = sum(values)
        table.add_row(label, f"{total:.2f}", f"{total / whole:.1%}" if whole else "-",
                      f"{total / max(len(values), 1):.3f}", f"{percentile(values, 0.5):.3f}",
                      f"{percentile(values, 0.9):.3f}", f"{max(values, default=0):.3f}",
                      style="bold" if attr == "total_s" else None)
    rates = [t.generated_tokens / t.generate_s for t in timings if t.generate_s > 0]
    if rates:  # generation speed: the whole worker's, then per trial
        tokens, seconds = (sum(getattr(t, a) for t in timings) for a in ("generated_tokens", "generate_s"))
        table.add_row("tokens/s", f"{tokens / seconds:.0f}", "-", f"{sum(rates) / len(rates):.0f}",
                      f"{percentile(rates, 0.5):.0f}", f"{percentile(rates, 0.9):.0f}", f"{max(rates):.0f}")
    return table
