"""Threads for the merge loop: column chunks and per-source work spread over the CPU cores.

Inside :func:`chunk_threads` torch runs single-threaded and these helpers hand whole pieces of
work (column chunks of a tensor, or one source each) to a pool of Python threads; torch ops,
the fused kernels and file reads all release the GIL, so the pieces run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

CHUNK = 1 << 18  # columns per step: every source's slice stays in L2/L3
_POOL: ThreadPoolExecutor | None = None  # set inside chunk_threads()
_POOL_SIZE = 1


@contextmanager
def chunk_threads():
    """Within this block torch runs single-threaded and chunk loops get the threads instead.

    Why: torch's own threads meet at a barrier after every op, and on a busy machine one
    descheduled thread stalls each small op (measured 100x slower on 2 shared cores).
    Chunks are independent, so Python threads that each own whole chunks never wait on one
    another (torch releases the GIL inside ops). Entered once per merge: switching torch's
    thread count costs milliseconds.
    """
    global _POOL, _POOL_SIZE
    if _POOL is not None:  # nested: already set up
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _POOL_SIZE = before
    try:
        with ThreadPoolExecutor(before) as pool:
            _POOL = pool
            yield
    finally:
        _POOL, _POOL_SIZE = None, 1
        torch.set_num_threads(before)


def thread_count() -> int:
    """How many threads the helpers below use (1 outside :func:`chunk_threads`)."""
    return _POOL_SIZE if _POOL is not None else 1


def for_chunks(n_cols: int, work: Callable[[int, int, object], None],
               make_state: Callable[[int], object] = lambda worker: None) -> None:
    """Call ``work(start, end, state)`` for every CHUNK of columns; inside
    :func:`chunk_threads` the chunks are spread over its threads, each with its own ``state``
    (what ``make_state(worker)`` returned)."""
    starts = list(range(0, n_cols, CHUNK))
    threads = min(_POOL_SIZE, len(starts)) if _POOL is not None else 1

    grad = torch.is_grad_enabled()  # grad mode is per thread: carry the caller's over

    def run(worker: int, mine: list[int]) -> None:
        with torch.set_grad_enabled(grad):
            state = make_state(worker)
            for start in mine:
                work(start, min(start + CHUNK, n_cols), state)

    if threads <= 1:
        run(0, starts)
        return
    for f in [_POOL.submit(run, i, starts[i::threads]) for i in range(threads)]:
        f.result()


def parallel_map(fn: Callable, items: list, parallel: bool = True) -> list:
    """``[fn(x) for x in items]``, on chunk_threads' threads when inside it (and ``parallel``:
    handing small work to a thread costs more than doing it)."""
    if _POOL is None or len(items) < 2 or not parallel:
        return [fn(x) for x in items]
    grad = torch.is_grad_enabled()  # grad mode is per thread: carry the caller's over

    def call(x):
        with torch.set_grad_enabled(grad):
            return fn(x)

    return list(_POOL.map(call, items))
