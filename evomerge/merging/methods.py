"""Merge methods: plain functions on tensors, registered by name (see ``registry.py``).

Methods with ``inputs="deltas"`` take the stacked task vectors (``delta = model - base``) and
return the mixed delta; the engine adds the base. Methods with ``inputs="models"`` take the
stacked model tensors and return the result. Each signature declares the method's values (with
bounds) and options; nothing about where the result goes or how it is computed fast: the engine
writes it, and ``fused.py`` runs some methods through C kernels with the same bits.

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

from collections.abc import Sequence
from typing import Annotated

import torch

from evomerge.merging.registry import (
    REGISTRY as METHODS,
)
from evomerge.merging.registry import (
    Densities,
    Flag,
    Floats,
    Fraction,
    Generators,
    MergeMethod,
    Option,
    Scale,
    Weights,
    get_method,
    merge_method,
)
from evomerge.merging.sparsify import dare_drop, magnitude_trim

__all__ = ["METHODS", "MergeMethod", "get_method", "each", "dare"]

TieOrder = Annotated[str, Option(("index", "mergekit"))]
Rescale = Annotated[str, Option(("inverse", "l1", "none"))]


def each(values: Floats | float, stacked: torch.Tensor) -> list[float]:
    """A per-source value as one number per source (a bare default applies to every source)."""
    return list(values) if isinstance(values, Sequence) else [values] * len(stacked)


def _column(values: Floats, like: torch.Tensor) -> torch.Tensor:
    """Per-source scalars as a tensor that broadcasts over stacked (n_sources, ...) tensors."""
    col = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    return col.reshape((-1,) + (1,) * (like.dim() - 1))


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


@merge_method("task_arithmetic", inputs="deltas")
def task_arithmetic(deltas: torch.Tensor, weight: Weights, *, normalize: Flag = False,
                    lambda_: Scale = 1.0) -> torch.Tensor:
    """Sum of weighted task vectors: sum_i w_i * delta_i (divided by sum w_i if normalize),
    times ``lambda``."""
    return _combine(deltas, weight, consensus=False, normalize=normalize, lam=lambda_)


@merge_method("ties", inputs="deltas")
def ties(deltas: torch.Tensor, weight: Weights, density: Densities = 1.0, *,
         normalize: Flag = True, lambda_: Scale = 1.0, tie_order: TieOrder = "index"
         ) -> torch.Tensor:
    """TIES: trim each delta to its top-``density`` entries by magnitude, elect a sign per entry
    (that of the weighted sum), average the agreeing weighted entries (``normalize``), times
    ``lambda``. ``tie_order``: which of the entries tied at the trim threshold are kept
    (``index``: lowest flat index first; ``mergekit``: mergekit's argsort order, slower)."""
    trimmed = torch.stack([magnitude_trim(d, p, tie_order)
                           for d, p in zip(deltas, each(density, deltas), strict=True)])
    return _combine(trimmed, weight, consensus=True, normalize=normalize, lam=lambda_)


def dare(deltas: torch.Tensor, density: Floats | float, rng: Sequence[torch.Generator],
         rescale: str) -> torch.Tensor:
    """Every source's task vector DARE-dropped with its own density and generator."""
    return torch.stack([dare_drop(d, p, g, rescale)
                        for d, p, g in zip(deltas, each(density, deltas), rng, strict=True)])


@merge_method("dare_ties", inputs="deltas")
def dare_ties(deltas: torch.Tensor, weight: Weights, density: Densities = 1.0, *,
              rng: Generators, normalize: Flag = False, lambda_: Scale = 1.0,
              rescale: Rescale = "inverse") -> torch.Tensor:
    """DARE drop (keep each entry with probability ``density``, then ``rescale``: ``inverse``
    1/density, ``l1`` the delta's L1 norm as mergekit, ``none``), then TIES sign consensus."""
    return ties(dare(deltas, density, rng, rescale), weight, normalize=normalize, lambda_=lambda_)


@merge_method("dare_linear", inputs="deltas")
def dare_linear(deltas: torch.Tensor, weight: Weights, density: Densities = 1.0, *,
                rng: Generators, normalize: Flag = False, lambda_: Scale = 1.0,
                rescale: Rescale = "inverse") -> torch.Tensor:
    """DARE drop with ``rescale`` (as dare_ties), then a weighted sum of the task vectors."""
    return _combine(dare(deltas, density, rng, rescale), weight, consensus=False,
                    normalize=normalize, lam=lambda_)


# --- methods on the models themselves --------------------------------------------------------


@merge_method("linear", inputs="models")
def linear(tensors: torch.Tensor, weight: Weights, *, normalize: Flag = True) -> torch.Tensor:
    """Weighted average sum_i w_i * x_i / sum_i w_i (``normalize``), accumulated in float32
    with fused multiply-adds as mergekit's."""
    acc_dtype = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weight), dtype=acc_dtype).to(tensors.device)
    acc = torch.zeros(tensors.shape[1:], dtype=acc_dtype, device=tensors.device)
    for x, wi in zip(tensors, w, strict=True):
        acc.addcmul_(x, wi)
    if normalize:
        acc.div_(w.sum())
    return acc.to(tensors.dtype)


SLERP_DOT_THRESHOLD = 0.9995  # closer to (anti)collinear than this: interpolate linearly
NORM_EPS = 1e-8


@merge_method("slerp", inputs="models", sources=2)
def slerp(tensors: torch.Tensor, *, t: Fraction) -> torch.Tensor:
    """Spherical interpolation from the first tensor (t=0) to the second (t=1), whole tensor.

    Falls back to linear interpolation when the two are (anti)collinear.
    """
    work = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    t = torch.tensor(float(t)).to(work).to(tensors.device)  # t in float32 first, as mergekit has it
    a, b = tensors[0].to(work), tensors[1].to(work)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > NORM_EPS else torch.ones_like(na)
    nb = nb if nb > NORM_EPS else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > SLERP_DOT_THRESHOLD:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(dot)
        ca = torch.sin((1 - t) * theta) / torch.sin(theta)
        cb = torch.sin(t * theta) / torch.sin(theta)
    return (ca * a + cb * b).to(tensors.dtype)
