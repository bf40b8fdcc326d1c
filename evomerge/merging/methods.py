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


def kth_largest_magnitude(x: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th largest |x| exactly, and how many entries are strictly larger.

    Radix selection on the float's bits: non-negative floats order like their bits read as
    integers, so one bincount of the high 16 bits finds the bucket holding the k-th largest and
    a second count inside that bucket (float32 only) finds the value. Linear time, far faster
    than a sort or kthvalue on the CPU.
    """
    mag = x.detach().abs().reshape(-1)
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


@merge_method("ties", on_deltas=True, params=[WEIGHT, DENSITY, LAMBDA,
              ParamSpec("normalize", True, per_source=False)])
def ties(deltas: torch.Tensor, weight: Floats, density: Floats | None = None, *,
         normalize: bool = True, tie_order: str = "index", **shared) -> torch.Tensor:
    """TIES: trim each delta to its top-density entries, elect signs, average the agreeing ones."""
    density = density or [1.0] * len(deltas)
    trimmed = torch.stack([magnitude_trim(d, p, tie_order) for d, p in zip(deltas, density)])
    return _combine(trimmed, weight, consensus=True, normalize=normalize,
                    lam=shared.get("lambda", 1.0))


def _dare(deltas, density, rng, rescale):
    density = density or [1.0] * len(deltas)
    return torch.stack([dare_drop(d, p, g, rescale) for d, p, g in zip(deltas, density, rng)])


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


@merge_method("linear", on_deltas=False, params=[WEIGHT,
              ParamSpec("normalize", True, per_source=False)])
def linear(tensors: torch.Tensor, weight: Floats, *, normalize: bool = True) -> torch.Tensor:
    """Weighted average sum_i w_i * x_i / sum_i w_i, accumulated in float32."""
    work = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weight), dtype=work)
    out = torch.zeros(tensors.shape[1:], dtype=work, device=tensors.device)
    for x, wi in zip(tensors, w):
        out.add_(x.to(work) * wi.to(tensors.device))
    if normalize:
        out.div_(w.sum().to(tensors.device))
    return out.to(tensors.dtype)


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
