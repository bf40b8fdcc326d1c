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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from evomerge.errors import EvomergeError

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
    if tie_order == "index" and deltas.dtype in _INT_VIEW and deltas.device.type == "cpu":
        return _ties_chunked(deltas, weight, density, normalize=normalize, lam=lam,
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
    """DARE drop with rescale, then TIES sign consensus."""
    return _combine(_dare(deltas, density, rng, rescale), weight, consensus=True,
                    normalize=normalize, lam=shared.get("lambda", 1.0))


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

    for_chunks(flat.shape[1], accumulator, average)
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


# --- TIES, chunked -----------------------------------------------------------------------------
#
# The straightforward TIES (trim each source, stack, weight, elect, average) makes a dozen
# full-size temporaries per tensor; on a CPU each is a trip through main memory plus page
# faults on fresh allocations. The chunked version below runs the *same* torch ops, in the same
# order and dtype, on column slices small enough to stay in cache, into buffers allocated once.
# Every op is elementwise or a reduction over the source axis only, so slicing the columns
# cannot change a single result bit.

CHUNK = 1 << 18  # columns per step: sources x CHUNK x 2 bytes stays in L2/L3


_INT_VIEW = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
             torch.float32: (torch.int32, 0x7FFFFFFF)}
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


def for_chunks(n_cols: int, make_state: Callable[[int], object],
               work: Callable[[int, int, object], None]) -> None:
    """Call ``work(start, end, state)`` for every CHUNK of columns; inside
    :func:`chunk_threads` the chunks are spread over its threads, each with its own ``state``."""
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


def magnitude_bits(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|x| as integers (sign bit cleared): non-negative floats order like their bit patterns."""
    ints, mask = _INT_VIEW[x.dtype]
    return torch.bitwise_and(x.view(ints), mask, out=out)


def magnitude_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of every 16-bit magnitude pattern of a bf16/fp16 tensor (32768 bins), chunked."""
    flat = x.reshape(-1)
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=x.device)
    bits = torch.empty(min(flat.numel(), 4 * CHUNK), dtype=torch.int16, device=x.device)
    for start in range(0, flat.numel(), bits.numel()):
        part = flat[start:start + bits.numel()]
        counts += torch.bincount(magnitude_bits(part, out=bits[: part.numel()]), minlength=1 << 15)
    return counts


SORTED_PREPARE = 1 << 22  # float32 tensors up to this size keep their sorted magnitudes


def ties_prepare(deltas: torch.Tensor) -> list[torch.Tensor] | None:
    """What a trial can reuse across values, so finding a threshold costs no pass over the data:
    each source's magnitude histogram (16-bit floats), or its sorted magnitudes (float32 tensors
    small enough that the copy is cheap)."""
    if deltas.device.type != "cpu":
        return None
    if deltas.dtype in (torch.bfloat16, torch.float16):
        return _map(magnitude_histogram, list(deltas))
    if deltas.dtype == torch.float32 and deltas[0].numel() <= SORTED_PREPARE:
        return [d.abs().reshape(-1).sort().values for d in deltas]
    return None


@dataclass(frozen=True)
class _Trim:
    """Which entries of one source survive the trim: all, none, or magnitude bits above
    ``threshold`` plus those equal to it at flat index below ``cut`` (ties, lowest index first)."""

    mode: str  # "all" | "none" | "top"
    threshold: int = 0
    cut: int = 0


def _plan_trim(delta: torch.Tensor, density: float, prepared: torch.Tensor | None) -> _Trim:
    """Which entries survive; ``prepared`` is this source's share of :func:`ties_prepare`."""
    n = delta.numel()
    if density >= 1:
        return _Trim("all")
    if density <= 0 or n == 0:
        return _Trim("none")
    k = max(1, int(density * n))
    if prepared is not None and prepared.dtype == torch.float32:  # sorted magnitudes, ascending
        value = prepared[n - k]
        n_above = n - int(torch.searchsorted(prepared, value, right=True))
        threshold = int(value.reshape(1).view(torch.int32))
    elif delta.dtype in (torch.bfloat16, torch.float16):
        counts = magnitude_histogram(delta) if prepared is None else prepared
        at_or_above = torch.cumsum(counts.flip(0), 0)
        position = int(torch.searchsorted(at_or_above, torch.tensor(k)))
        n_above = int(at_or_above[position - 1]) if position else 0
        threshold = (1 << 15) - 1 - position
    else:
        value, n_above = kth_largest_magnitude(delta, k)
        threshold = int(value.reshape(1).view(torch.int32))
    return _Trim("top", threshold, _tie_cut(delta.reshape(-1), threshold, k - n_above))


def _tie_cut(flat: torch.Tensor, threshold: int, wanted: int) -> int:
    """The flat index just past the ``wanted``-th entry whose magnitude bits equal ``threshold``."""
    if wanted <= 0:
        return 0
    seen = 0
    for start in range(0, flat.numel(), 4 * CHUNK):
        equal = magnitude_bits(flat[start:start + 4 * CHUNK]) == threshold
        count = int(torch.count_nonzero(equal))
        if seen + count >= wanted:
            return start + _nth_true(equal, wanted - seen) + 1
        seen += count
    return flat.numel()


def _nth_true(mask: torch.Tensor, n: int) -> int:
    """Index of the n-th (1-based) True: count pieces first, nonzero only on the one piece."""
    piece = 1 << 14
    for start in range(0, mask.numel(), piece):
        count = int(torch.count_nonzero(mask[start:start + piece]))
        if count >= n:
            return start + int(mask[start:start + piece].nonzero()[n - 1])
        n -= count
    raise AssertionError("fewer True entries than counted")


def _map(fn: Callable, items: list, parallel: bool = True) -> list:
    """``[fn(x) for x in items]``, on chunk_threads' threads when inside it (and ``parallel``:
    handing small work to a thread costs more than doing it)."""
    if _POOL is None or len(items) < 2 or not parallel:
        return [fn(x) for x in items]
    grad = torch.is_grad_enabled()  # grad mode is per thread: carry the caller's over

    def call(x):
        with torch.set_grad_enabled(grad):
            return fn(x)

    return list(_POOL.map(call, items))


class _TiesBuffers:
    """Scratch for one chunk, allocated once per (sources, dtype) and reused for every tensor."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        ints = _INT_VIEW[dtype][0]
        self.x = torch.empty(n, CHUNK, dtype=dtype, device=device)  # trimmed, weighted deltas
        self.tmp = torch.empty(n, CHUNK, dtype=dtype, device=device)
        self.agree = torch.empty(n, CHUNK, dtype=torch.bool, device=device)
        self.bits = torch.empty(CHUNK, dtype=ints, device=device)
        self.keep = torch.empty(CHUNK, dtype=torch.bool, device=device)
        self.flag = torch.empty(CHUNK, dtype=torch.bool, device=device)
        self.mixed = torch.empty(CHUNK, dtype=dtype, device=device)
        self.divisor = torch.empty(CHUNK, dtype=dtype, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.one = torch.ones((), dtype=dtype, device=device)
        self.minus_one = -self.one


_BUFFERS: dict[tuple, _TiesBuffers] = {}


def _buffers(n: int, dtype: torch.dtype, device: torch.device, worker: int) -> _TiesBuffers:
    """One set per worker thread, kept across calls (a run merges one set of models)."""
    key = (n, dtype, str(device), worker)
    if key not in _BUFFERS:
        for old in [k for k in _BUFFERS if k[3] == worker]:
            del _BUFFERS[old]
        _BUFFERS[key] = _TiesBuffers(n, dtype, device)
    return _BUFFERS[key]


def _ties_chunk(chunk: torch.Tensor, start: int, trims: list[_Trim], weights: torch.Tensor,
                b: _TiesBuffers, normalize: bool, lam: float) -> torch.Tensor:
    """TIES on columns [start, start + width) of the flattened deltas; returns the mixed delta."""
    width = chunk.shape[1]
    x, tmp, agree = b.x[:, :width], b.tmp[:, :width], b.agree[:, :width]
    keep, flag, mixed = b.keep[:width], b.flag[:width], b.mixed[:width]
    for i, trim in enumerate(trims):
        if trim.mode == "all":
            x[i].copy_(chunk[i])
        elif trim.mode == "none":
            x[i].zero_()
        else:
            bits = magnitude_bits(chunk[i], out=b.bits[:width])
            torch.gt(bits, trim.threshold, out=keep)
            if trim.cut > start:  # ties at the threshold before the cut are kept too
                tied = min(trim.cut - start, width)
                torch.ge(bits[:tied], trim.threshold, out=keep[:tied])
            torch.where(keep, chunk[i], b.zero, out=x[i])
    x.mul_(weights)
    # the elected sign is that of the weighted sum; x agrees when x * sign > 0 (zeros never do)
    torch.sum(x, 0, out=mixed)
    torch.ge(mixed, 0, out=flag)
    torch.where(flag, b.one, b.minus_one, out=mixed)
    torch.mul(x, mixed, out=tmp)
    torch.gt(tmp, 0, out=agree)
    torch.mul(x, agree, out=tmp)
    torch.sum(tmp, 0, out=mixed)
    if normalize:
        divisor = b.divisor[:width]
        torch.mul(agree, weights, out=tmp)
        torch.sum(tmp, 0, out=divisor)
        divisor.masked_fill_(torch.eq(divisor, 0, out=flag), 1)
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed


def _ties_chunked(deltas: torch.Tensor, weight: Floats, density: Floats, *, normalize: bool,
                  lam: float, prepared: list[torch.Tensor] | None, base: torch.Tensor | None,
                  out: torch.Tensor | None) -> torch.Tensor:
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    trims = _map(lambda i: _plan_trim(flat[i], density[i], prepared[i] if prepared else None),
                 list(range(n)), parallel=flat.shape[1] >= CHUNK)
    weights = _column(weight, flat)
    result = torch.empty(deltas.shape[1:], dtype=deltas.dtype) if out is None else out
    result_flat, base_flat = result.view(-1), None if base is None else base.reshape(-1)

    def work(start: int, end: int, b: _TiesBuffers) -> None:
        mixed = _ties_chunk(flat[:, start:end], start, trims, weights, b, normalize, lam)
        if base_flat is None:
            result_flat[start:end].copy_(mixed)
        else:
            torch.add(base_flat[start:end], mixed, out=result_flat[start:end])

    for_chunks(flat.shape[1], lambda worker: _buffers(n, deltas.dtype, deltas.device, worker), work)
    return result
