"""Fused execution of some merge methods on the CPU: the C kernels (``kernels.py``), planned here.

One small interface for the engine: :func:`prepare` makes what repeated merges of the same
inputs may reuse, :func:`merge` runs a method through the kernels and writes ``base + result``
into ``out``, or returns None when the kernels cannot take that call (another device or dtype,
an option they lack, kernels not built or switched off): the engine then calls the method's
torch function, which gives the same bits, only slower. ``methods.py`` knows nothing of this.

TIES in one pass per element (kernels.ties) instead of a dozen full-size torch ops: the
threshold of every source is found first (a magnitude histogram or sorted magnitudes, reused
across trials via :func:`prepare`), then each column chunk is merged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evomerge.merging import kernels
from evomerge.merging.methods import dare
from evomerge.merging.registry import Floats, MergeMethod, each
from evomerge.merging.sparsify import kth_largest_magnitude
from evomerge.merging.threads import CHUNK, for_chunks, parallel_map, thread_count

# torch sums more than four float32 rows in another order than 0 + x0 + x1 + ... (the kernel's,
# and torch's own for fewer rows and for 16-bit floats): beyond that, float32 TIES runs torch
FUSED_FLOAT32_SOURCES = 4
_MAGNITUDE_MASK = {torch.bfloat16: 0x7FFF, torch.float16: 0x7FFF, torch.float32: 0x7FFFFFFF}
SORTED_PREPARE = 1 << 22  # float32 tensors up to this size keep their sorted magnitudes


def prepare(method: MergeMethod, stacked: torch.Tensor) -> object:
    """What every merge of these inputs with ``method`` can reuse (None: nothing)."""
    return ties_prepare(stacked) if method.name == "ties" else None


def merge(method: MergeMethod, stacked: torch.Tensor, values: dict, *,
          base: torch.Tensor | None = None, out: torch.Tensor | None = None,
          prepared: object = None) -> torch.Tensor | None:
    """``method`` on ``stacked`` with ``values`` (its values, options and ``rng``), plus ``base``
    for task-vector methods, written into ``out`` when given; None if the kernels can't take it."""
    run = _FUSED.get(method.name)
    if run is None or not _fusable(stacked, values.get("weight"), base, out):
        return None
    return run(stacked, values, base, out, prepared)


def _fusable(stacked: torch.Tensor, weight: Floats | None, *others: torch.Tensor | None) -> bool:
    """Whether the kernels can take this merge: ``stacked`` (sources first) on the CPU in a dtype
    they know, one weight per source, and ``others`` (base, out) contiguous tensors of its dtype
    and of one source's size."""
    size = stacked[0].numel() if len(stacked) else 0
    return (kernels.supports(stacked, len(stacked))
            and (weight is None or len(weight) == len(stacked))
            and all(t is None or (t.dtype == stacked.dtype and t.device == stacked.device
                                  and t.is_contiguous() and t.numel() == size) for t in others))


def _rows(stacked: torch.Tensor) -> torch.Tensor:
    """``(sources, entries)``, with unit column stride as the kernels need (copied if not)."""
    rows = stacked.reshape(len(stacked), -1)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _result(stacked: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(stacked.shape[1:], dtype=stacked.dtype) if out is None else out


# --- the methods the kernels run ----------------------------------------------------------------


def _linear(models, values, base, out, prepared):
    weights = torch.tensor(list(values["weight"]), dtype=torch.float32)
    normalize, total = values.get("normalize", True), float(weights.sum())
    rows, result = _rows(models), _result(models, out)
    for_chunks(rows.shape[1], lambda start, end, _: kernels.linear(
        rows, result.view(-1), start, end, weights, normalize, total))
    return result


def _ties(deltas, values, base, out, prepared):
    if values.get("tie_order", "index") != "index" or (
            deltas.dtype == torch.float32 and len(deltas) > FUSED_FLOAT32_SOURCES):
        return None
    return _ties_rows(deltas, values["weight"], each(values.get("density", 1.0), deltas),
                      normalize=values.get("normalize", True), lam=values.get("lambda", 1.0),
                      prepared=prepared, base=base, out=out)


def _dare_ties(deltas, values, base, out, prepared):
    """TIES with nothing left to trim, on the DARE-dropped task vectors."""
    if deltas.dtype == torch.float32 and len(deltas) > FUSED_FLOAT32_SOURCES:
        return None
    sparse = dare(deltas, values.get("density", 1.0), values["rng"], values.get("rescale", "inverse"))
    return _ties_rows(sparse, values["weight"], [1.0] * len(deltas),
                      normalize=values.get("normalize", False), lam=values.get("lambda", 1.0),
                      prepared=None, base=base, out=out)


_FUSED: dict[str, Callable[..., torch.Tensor | None]] = {
    "linear": _linear, "ties": _ties, "dare_ties": _dare_ties}


# --- TIES thresholds ------------------------------------------------------------------------------


def ties_prepare(deltas: torch.Tensor) -> list[torch.Tensor] | None:
    """What a trial can reuse across values, so finding a threshold costs no pass over the data:
    each source's magnitude histogram in cumulative form (16-bit floats), or its sorted
    magnitudes (float32 tensors small enough that the copy is cheap)."""
    if not _fusable(deltas, None):
        return None
    if deltas.dtype in (torch.bfloat16, torch.float16):
        return _at_or_above(magnitude_histograms(deltas))
    if (deltas.dtype == torch.float32 and deltas[0].numel() <= SORTED_PREPARE
            and len(deltas) <= FUSED_FLOAT32_SOURCES):
        return [d.abs().reshape(-1).sort().values for d in deltas]
    return None


def magnitude_histograms(deltas: torch.Tensor) -> list[torch.Tensor]:
    """Each source's 16-bit magnitude histogram; every source is split into one piece per
    thread, so three sources on two threads keep both busy."""
    flat = _rows(deltas)
    pieces = thread_count() if flat.shape[1] >= CHUNK else 1
    step = -(-flat.shape[1] // pieces)
    counts = torch.zeros(len(flat), pieces, 1 << 15, dtype=torch.int64)
    tasks = [(i, p) for i in range(len(flat)) for p in range(pieces)]
    parallel_map(lambda t: kernels.histogram16(flat[t[0], t[1] * step:(t[1] + 1) * step],
                                               counts[t[0], t[1]]), tasks)
    return list(counts.sum(1))


def _at_or_above(histograms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per source, how many entries have magnitude bits at or above each pattern, counted from
    the largest pattern down (what a threshold search needs, ready for searchsorted)."""
    return [torch.cumsum(counts.flip(0), 0) for counts in histograms]


def _plan_trim(delta: torch.Tensor, density: float, prepared: torch.Tensor | None) -> tuple[int, int]:
    """Which entries of one source survive the trim, as ``(threshold, cut)``: those whose
    magnitude bits exceed ``threshold``, and those equal to it at flat index below ``cut``
    (ties, lowest index first). ``prepared`` is this source's share of :func:`ties_prepare`."""
    n, everything = delta.numel(), _MAGNITUDE_MASK[delta.dtype]
    if density >= 1:
        return -1, 0
    if density <= 0 or n == 0:
        return everything, 0
    k = max(1, int(density * n))
    tied = -1  # how many entries equal the threshold, where known
    if prepared is not None and prepared.dtype == torch.float32:  # sorted magnitudes, ascending
        value = prepared[n - k]
        n_above = n - int(torch.searchsorted(prepared, value, right=True))
        tied = n - n_above - int(torch.searchsorted(prepared, value))
        threshold = int(value.reshape(1).view(torch.int32))
    elif delta.dtype in (torch.bfloat16, torch.float16):  # prepared: from _at_or_above
        position = int(torch.searchsorted(prepared, k))
        n_above = int(prepared[position - 1]) if position else 0
        tied = int(prepared[position]) - n_above
        threshold = (1 << 15) - 1 - position
    else:
        value, n_above = kth_largest_magnitude(delta, k)
        threshold = int(value.reshape(1).view(torch.int32))
    return threshold, kernels.tie_cut(delta.reshape(-1), threshold, k - n_above, tied)


def _ties_rows(deltas: torch.Tensor, weight: Floats, density: Floats, *, normalize: bool,
               lam: float, prepared: list[torch.Tensor] | None, base: torch.Tensor | None,
               out: torch.Tensor | None) -> torch.Tensor:
    n = deltas.shape[0]
    flat = _rows(deltas)
    trimming = any(0 < p < 1 for p in density)  # dare_ties: nothing left to trim
    if prepared is None and trimming and deltas.dtype in (torch.bfloat16, torch.float16):
        prepared = _at_or_above(magnitude_histograms(flat))
    trims = parallel_map(lambda i: _plan_trim(flat[i], density[i], prepared[i] if prepared else None),
                         list(range(n)), parallel=flat.shape[1] >= CHUNK)
    thresholds = torch.tensor([t for t, _ in trims], dtype=torch.int32)
    cuts = torch.tensor([c for _, c in trims], dtype=torch.int64)
    weights = torch.tensor(list(weight), dtype=deltas.dtype).float()  # rounded, as torch does
    result = _result(deltas, out)
    result_flat, base_flat = result.view(-1), None if base is None else base.reshape(-1)
    for_chunks(flat.shape[1], lambda start, end, _: kernels.ties(
        flat, base_flat, result_flat, start, end, thresholds, cuts, weights, normalize, lam))
    return result
