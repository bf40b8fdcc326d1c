"""Merge methods: plain functions on tensors, registered by name.

Each method is one function. Methods that work on task vectors (``delta = model - base``) take
the stacked deltas and return the mixed delta; the engine adds the base. Methods that work on
the models themselves (linear, slerp) take the stacked model tensors and return the result.

Semantics follow mergekit where the name is the same (weights applied before TIES's sign
election, ``normalize`` defaults, density 1.0 by default), so a mergekit YAML gives the same
tensors here. Arithmetic happens in the dtype of the inputs, as mergekit's ``dtype`` means;
linear and slerp accumulate in float32 like mergekit does.

Example::

    >>> import torch
    >>> from evomerge.merging.methods import get_method
    >>> ties = get_method("ties")
    >>> deltas = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    >>> ties(deltas, weight=[1.0, 1.0], density=[1.0, 1.0])
    tensor([ 2., -2.])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from evomerge.errors import EvomergeError
from evomerge.merging import kernels
from evomerge.merging.threads import CHUNK, for_chunks, parallel_map, thread_count

Floats = Sequence[float]


@dataclass(frozen=True)
class ParamSpec:
    """A value a method takes: per source (one per model) or shared by all sources."""

    name: str
    default: float | bool | None
    per_source: bool
    bounds: tuple[float, float] | None = None  # allowed range for searched/fixed values


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    on_deltas: bool  # True: takes task vectors against a base; False: takes the models
    params: tuple[ParamSpec, ...]
    needs_rng: bool = False
    exact_sources: int | None = None  # slerp takes exactly two models
    # takes ``base=`` (task-vector methods) and ``out=`` and returns the finished tensor, so the
    # engine need not allocate the result or add the base in a separate pass
    writes_out: bool = False
    # deltas -> something each call on the same deltas may reuse (passed back as ``prepared=``)
    prepare: Callable[[torch.Tensor], object] | None = None
    doc: str = field(default="")

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params)
        raise EvomergeError(f"method {self.name!r} has no parameter {name!r} (it takes: {known})")


METHODS: dict[str, MergeMethod] = {}

WEIGHT = ParamSpec("weight", None, per_source=True, bounds=(-10.0, 10.0))
DENSITY = ParamSpec("density", 1.0, per_source=True, bounds=(0.0, 1.0))
LAMBDA = ParamSpec("lambda", 1.0, per_source=False, bounds=(-10.0, 10.0))


def merge_method(name: str, *, on_deltas: bool, params: Sequence[ParamSpec], **extra):
    """Register ``fn`` under ``name`` with the values it takes."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS[name] = MergeMethod(
            name, fn, on_deltas, tuple(params), doc=(fn.__doc__ or "").strip(), **extra
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise EvomergeError(
            f"unknown merge method {name!r}: use one of {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def _column(values: Floats, like: torch.Tensor) -> torch.Tensor:
    """Per-source scalars as a tensor that broadcasts over stacked (n_sources, ...) tensors."""
    col = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    return col.reshape((-1,) + (1,) * (like.dim() - 1))


# --- sparsification -------------------------------------------------------------------------


def topk_mask(x: torch.Tensor, density: float, tie_order: str = "index") -> torch.Tensor:
    """Boolean mask of the ``max(1, int(density * numel))`` entries of largest magnitude.

    The threshold is found by selection (no full sort). Entries equal to the threshold are
    taken lowest flat index first (``tie_order="index"``, deterministic); ``"mergekit"``
    reproduces mergekit's choice among ties, which is torch.argsort's order (slow: a full sort).
    """
    n = x.numel()
    k = max(1, int(density * n))
    mag = x.abs().reshape(-1)
    if tie_order == "mergekit":
        mag = mag.float() if mag.device.type == "cpu" else mag
        mask = torch.zeros(n, dtype=torch.bool, device=x.device)
        mask[torch.argsort(mag, descending=True)[:k]] = True
        return mask.reshape(x.shape)
    threshold, n_above = kth_largest_magnitude(mag, k)
    mask = mag > threshold
    if k > n_above:
        tied = (mag == threshold).nonzero().reshape(-1)
        mask[tied[: k - n_above]] = True
    return mask.reshape(x.shape)


SMALL_SELECT = 1 << 15  # up to this many entries, a sort-based selection is faster


def kth_largest_magnitude(x: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th largest |x| exactly, and how many entries are strictly larger.

    Radix selection on the float's bits: non-negative floats order like their bits read as
    integers, so one bincount of the high 16 bits finds the bucket holding the k-th largest and
    a second count inside that bucket (float32 only) finds the value. Linear time, far faster
    than a sort or kthvalue on the CPU.
    """
    mag = x.detach().abs().reshape(-1)
    if mag.numel() <= SMALL_SELECT:  # the histograms' fixed cost dominates small tensors
        value = mag.float().kthvalue(mag.numel() - k + 1).values.to(mag.dtype)
        return value, int((mag > value).sum())
    if mag.dtype in (torch.bfloat16, torch.float16):
        bits = mag.view(torch.int16).to(torch.int32)
        value, n_above = _kth_largest_bin(bits, k, 1 << 15)
        return _bits_to_float(value, mag.dtype, mag.device), n_above
    bits = mag.float().view(torch.int32)
    high = bits >> 16
    hi_value, hi_above = _kth_largest_bin(high, k, 1 << 15)
    low = bits[high == hi_value] & 0xFFFF
    lo_value, lo_above = _kth_largest_bin(low, k - hi_above, 1 << 16)
    return _bits_to_float((hi_value << 16) | lo_value, torch.float32, mag.device), hi_above + lo_above


def _kth_largest_bin(values: torch.Tensor, k: int, bins: int) -> tuple[int, int]:
    """Among non-negative ints below ``bins``: the k-th largest, and how many are larger."""
    counts_desc = torch.bincount(values, minlength=bins).flip(0)
    at_or_above = torch.cumsum(counts_desc, 0)
    position = int(torch.searchsorted(at_or_above, torch.tensor(k, device=values.device)))
    above = int(at_or_above[position - 1]) if position else 0
    return bins - 1 - position, above


def _bits_to_float(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    width = torch.int16 if dtype in (torch.bfloat16, torch.float16) else torch.int32
    return torch.tensor([bits], dtype=torch.int32).to(width).view(dtype)[0].to(device)


def rescale_l1(masked: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm equals ``original``'s (mergekit's DARE rescale)."""
    before, after = original.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude_trim(delta: torch.Tensor, density: float, tie_order: str = "index") -> torch.Tensor:
    """TIES trim: keep the top ``density`` fraction of entries by magnitude, zero the rest."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    return torch.where(topk_mask(delta, density, tie_order), delta, 0)


def dare_drop(
    delta: torch.Tensor, density: float, rng: torch.Generator, rescale: str | None = "inverse"
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; rescale what is kept.

    ``rescale="inverse"`` multiplies kept entries by 1/density (the DARE paper),
    ``"l1"`` preserves the L1 norm of the delta (mergekit since 2025), ``None`` does not rescale.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=rng, device=delta.device) < density
    kept = torch.where(keep, delta, 0)
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        return rescale_l1(kept, delta)
    return kept


def rng_for(seed: int, tensor_name: str, source_index: int, device: torch.device | str = "cpu"):
    """A generator seeded by (seed, tensor name, source): the same seed gives the same masks."""
    digest = hashlib.blake2b(f"{seed}/{tensor_name}/{source_index}".encode(), digest_size=8)
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return g


# --- combining task vectors ------------------------------------------------------------------


def _combine(
    deltas: torch.Tensor, weight: Floats, *, consensus: bool, normalize: bool, lam: float
) -> torch.Tensor:
    """Weighted sum of (sparsified) deltas, optionally with TIES sign consensus."""
    weights = _column(weight, deltas)
    weighted = deltas * weights
    if consensus:
        # The elected sign is that of the weighted sum; entries that disagree (or are zero) drop out.
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(0)
        divisor = (weights * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = weights.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed


@merge_method("task_arithmetic", on_deltas=True, params=[WEIGHT, LAMBDA,
              ParamSpec("normalize", False, per_source=False)])
def task_arithmetic(deltas: torch.Tensor, weight: Floats, *, normalize: bool = False,
                    **shared) -> torch.Tensor:
    """Sum of weighted task vectors: sum_i w_i * delta_i (divided by sum w_i if normalize)."""
    return _combine(deltas, weight, consensus=False, normalize=normalize,
                    lam=shared.get("lambda", 1.0))


@merge_method("ties", on_deltas=True, writes_out=True, params=[WEIGHT, DENSITY, LAMBDA,
              ParamSpec("normalize", True, per_source=False)], prepare=lambda d: ties_prepare(d))
def ties(deltas: torch.Tensor, weight: Floats, density: Floats | None = None, *,
         normalize: bool = True, tie_order: str = "index", prepared=None,
         base: torch.Tensor | None = None, out: torch.Tensor | None = None,
         **shared) -> torch.Tensor:
    """TIES: trim each delta to its top-density entries, elect signs, average the agreeing ones.

    With ``base`` the result is ``base + mixed`` (else the mixed delta), written into ``out``
    when given; ``prepared`` is what :func:`ties_prepare` returned for these deltas.
    """
    density = density or [1.0] * len(deltas)
    lam = shared.get("lambda", 1.0)
    if (tie_order == "index" and _fusable(deltas, weight, base, out)
            and (deltas.dtype != torch.float32 or len(deltas) <= FUSED_FLOAT32_SOURCES)):
        return _ties_fused(deltas, weight, density, normalize=normalize, lam=lam,
                           prepared=prepared, base=base, out=out)
    trimmed = torch.stack([magnitude_trim(d, p, tie_order) for d, p in zip(deltas, density, strict=True)])
    mixed = _combine(trimmed, weight, consensus=True, normalize=normalize, lam=lam)
    result = mixed if base is None else base + mixed
    return result if out is None else out.copy_(result)


def _dare(deltas, density, rng, rescale):
    density = density or [1.0] * len(deltas)
    return torch.stack([dare_drop(d, p, g, rescale) for d, p, g in zip(deltas, density, rng, strict=True)])


@merge_method("dare_ties", on_deltas=True, needs_rng=True, params=[WEIGHT, DENSITY, LAMBDA,
              ParamSpec("normalize", False, per_source=False)])
def dare_ties(deltas: torch.Tensor, weight: Floats, density: Floats | None = None, *,
              rng: Sequence[torch.Generator], normalize: bool = False,
              rescale: str | None = "inverse", **shared) -> torch.Tensor:
    """DARE drop with rescale, then TIES sign consensus (TIES with nothing left to trim)."""
    return ties(_dare(deltas, density, rng, rescale), weight, normalize=normalize, **shared)


@merge_method("dare_linear", on_deltas=True, needs_rng=True, params=[WEIGHT, DENSITY, LAMBDA,
              ParamSpec("normalize", False, per_source=False)])
def dare_linear(deltas: torch.Tensor, weight: Floats, density: Floats | None = None, *,
                rng: Sequence[torch.Generator], normalize: bool = False,
                rescale: str | None = "inverse", **shared) -> torch.Tensor:
    """DARE drop with rescale, then a weighted sum of the task vectors."""
    return _combine(_dare(deltas, density, rng, rescale), weight, consensus=False,
                    normalize=normalize, lam=shared.get("lambda", 1.0))


# --- methods on the models themselves --------------------------------------------------------


@merge_method("linear", on_deltas=False, writes_out=True, params=[WEIGHT,
              ParamSpec("normalize", True, per_source=False)])
def linear(tensors: torch.Tensor, weight: Floats, *, normalize: bool = True,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted average sum_i w_i * x_i / sum_i w_i, accumulated in float32.

    Runs over column chunks with one reused float32 accumulator (elementwise, so the result is
    the same as on the whole tensor), written into ``out`` when given.
    """
    acc_dtype = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weight), dtype=acc_dtype).to(tensors.device)
    flat = tensors.reshape(len(tensors), -1)
    result = torch.empty(tensors.shape[1:], dtype=tensors.dtype, device=tensors.device) if out is None else out
    result_flat, total = result.view(-1), w.sum()
    if _fusable(tensors, weight, out):
        rows = _rows(tensors)
        for_chunks(rows.shape[1], lambda start, end, _: kernels.linear(
            rows, result_flat, start, end, w, normalize, float(total)))
        return result
    width = min(CHUNK, flat.shape[1])

    def accumulator(_worker: int) -> torch.Tensor:
        return torch.empty(width, dtype=acc_dtype, device=tensors.device)

    def average(start: int, end: int, acc: torch.Tensor) -> None:
        part = acc[: end - start].zero_()
        for x, wi in zip(flat[:, start:end], w, strict=True):
            part.addcmul_(x, wi)  # as mergekit: same rounding (fused)
        if normalize:
            part.div_(total)
        result_flat[start:end].copy_(part)

    for_chunks(flat.shape[1], average, accumulator)
    return result


@merge_method("slerp", on_deltas=False, exact_sources=2,
              params=[ParamSpec("t", None, per_source=False, bounds=(0.0, 1.0))])
def slerp(tensors: torch.Tensor, *, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from the first tensor (t=0) to the second (t=1), whole tensor.

    Falls back to linear interpolation when the two are (anti)collinear.
    """
    work = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    a, b = tensors[0].to(work), tensors[1].to(work)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(dot)
        ca = torch.sin((1 - t) * theta) / torch.sin(theta)
        cb = torch.sin(t * theta) / torch.sin(theta)
    return (ca * a + cb * b).to(tensors.dtype)


# --- the fused kernels' side of the methods ------------------------------------------------------

# torch sums more than four float32 rows in another order than 0 + x0 + x1 + ... (the kernel's,
# and torch's own for fewer rows and for 16-bit floats): beyond that, float32 TIES runs torch
FUSED_FLOAT32_SOURCES = 4


def _fusable(stacked: torch.Tensor, weight: Floats | None, *others: torch.Tensor | None) -> bool:
    """Whether the kernels can take this merge: ``stacked`` (sources first) on the CPU in a dtype
    they know, one weight per source, and ``others`` (base, out) contiguous tensors of its dtype
    and of one source's size. Anything else runs the torch code."""
    size = stacked[0].numel() if len(stacked) else 0
    return (kernels.supports(stacked, len(stacked))
            and (weight is None or len(weight) == len(stacked))
            and all(t is None or (t.dtype == stacked.dtype and t.device == stacked.device
                                  and t.is_contiguous() and t.numel() == size) for t in others))


def _rows(stacked: torch.Tensor) -> torch.Tensor:
    """``(sources, entries)``, with unit column stride as the kernels need (copied if not)."""
    rows = stacked.reshape(len(stacked), -1)
    return rows if rows.stride(1) == 1 else rows.contiguous()


# --- TIES, fused --------------------------------------------------------------------------------
#
# The same TIES as above, in one pass per element (kernels.ties) instead of a dozen full-size
# torch ops: the threshold of every source is found first (a magnitude histogram or sorted
# magnitudes, reused across trials via ties_prepare), then each column chunk is merged.

_MAGNITUDE_MASK = {torch.bfloat16: 0x7FFF, torch.float16: 0x7FFF, torch.float32: 0x7FFFFFFF}
SORTED_PREPARE = 1 << 22  # float32 tensors up to this size keep their sorted magnitudes


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


def _ties_fused(deltas: torch.Tensor, weight: Floats, density: Floats, *, normalize: bool,
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
    result = torch.empty(deltas.shape[1:], dtype=deltas.dtype) if out is None else out
    result_flat, base_flat = result.view(-1), None if base is None else base.reshape(-1)
    for_chunks(flat.shape[1], lambda start, end, _: kernels.ties(
        flat, base_flat, result_flat, start, end, thresholds, cuts, weights, normalize, lam))
    return result


def subtract_base_(stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """In place, ``stacked[i] -= base`` for every source: the task vectors (chunks on threads)."""
    if not (_fusable(stacked, None, base) and stacked.is_contiguous()):  # in place: no copies
        return stacked.sub_(base)
    rows, base_flat = _rows(stacked), base.reshape(-1)  # views: stacked is contiguous
    for_chunks(rows.shape[1], lambda start, end, _: kernels.subtract(rows, base_flat, start, end))
    return stacked
