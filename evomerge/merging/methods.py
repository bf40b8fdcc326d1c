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
    Densities,
    Flag,
    Floats,
    Fraction,
    Generators,
    MergeMethod,
    Option,
    Scale,
    Value,
    Weights,
    each,
    get_method,
    merge_method,
)
from evomerge.merging.sparsify import dare_drop, magnitude_trim, magprune, outlier_trim, rescale_l1

__all__ = ["MergeMethod", "get_method", "each", "dare"]

TieOrder = Annotated[str, Option(("index", "mergekit"))]
Rescale = Annotated[str, Option(("inverse", "l1", "none"))]
L1Rescale = Annotated[str, Option(("l1", "none"))]  # mergekit's `rescale: true/false`


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


# --- more sparsifications (mergekit's generalized task arithmetic) ---------------------------

Gammas = Annotated[Floats, Value(per_source=True, bounds=(0.0, 1.0))]
Epsilons = Annotated[Floats, Value(per_source=True, bounds=(0.0, 0.5))]


def _breadcrumbs(deltas, weight, density, gamma, *, consensus, normalize, lambda_, rescale):
    trimmed = []
    for d, p, g in zip(deltas, each(density, deltas), each(gamma, deltas), strict=True):
        kept = outlier_trim(d, p, g)
        trimmed.append(rescale_l1(kept, d) if rescale and p < 1 else kept)
    return _combine(torch.stack(trimmed), weight, consensus=consensus, normalize=normalize,
                    lam=lambda_)


@merge_method("breadcrumbs", inputs="deltas")
def breadcrumbs(deltas: torch.Tensor, weight: Weights, density: Densities = 1.0,
                gamma: Gammas = 0.01, *, normalize: Flag = False, lambda_: Scale = 1.0,
                rescale: Flag = False) -> torch.Tensor:
    """Model Breadcrumbs: each task vector loses its ``gamma`` (per model, default 0.01) largest
    entries and its smallest, keeping ``density`` (default 1); then a weighted sum (``weight``
    per model; ``normalize`` divides by the weights' sum, default false; times ``lambda``,
    default 1). ``rescale`` (default false) restores each trimmed vector's L1 norm."""
    return _breadcrumbs(deltas, weight, density, gamma, consensus=False, normalize=normalize,
                        lambda_=lambda_, rescale=rescale)


@merge_method("breadcrumbs_ties", inputs="deltas")
def breadcrumbs_ties(deltas: torch.Tensor, weight: Weights, density: Densities = 1.0,
                     gamma: Gammas = 0.01, *, normalize: Flag = False, lambda_: Scale = 1.0,
                     rescale: Flag = False) -> torch.Tensor:
    """Breadcrumbs' trim (``density``, ``gamma`` per model), then TIES's sign election among the
    weighted vectors (``normalize`` default false, ``lambda`` 1, ``rescale`` false)."""
    return _breadcrumbs(deltas, weight, density, gamma, consensus=True, normalize=normalize,
                        lambda_=lambda_, rescale=rescale)


def _della(deltas, weight, density, epsilon, rng, *, consensus, normalize, lambda_, rescale):
    pruned = torch.stack([magprune(d, p, e, g, rescale == "l1") for d, p, e, g in zip(
        deltas, each(density, deltas), each(epsilon, deltas), rng, strict=True)])
    return _combine(pruned, weight, consensus=consensus, normalize=normalize, lam=lambda_)


@merge_method("della", inputs="deltas")
def della(deltas: torch.Tensor, weight: Weights, density: Densities = 1.0,
          epsilon: Epsilons = 0.15, *, rng: Generators, normalize: Flag = True,
          lambda_: Scale = 1.0, rescale: L1Rescale = "l1") -> torch.Tensor:
    """DELLA: MagPrune keeps each task-vector entry with probability density -/+ ``epsilon``
    (per model, default 0.15) by its magnitude rank in its row; the option ``rescale``
    (``l1``, the default, as mergekit's ``rescale: true``; or ``none``) restores the L1 norm; then TIES's sign election, ``normalize`` (default true), ``lambda``.
    density +/- epsilon must lie inside (0, 1). Random: the per-tensor seeded generators."""
    return _della(deltas, weight, density, epsilon, rng, consensus=True, normalize=normalize,
                  lambda_=lambda_, rescale=rescale)


@merge_method("della_linear", inputs="deltas")
def della_linear(deltas: torch.Tensor, weight: Weights, density: Densities = 1.0,
                 epsilon: Epsilons = 0.15, *, rng: Generators, normalize: Flag = False,
                 lambda_: Scale = 1.0, rescale: L1Rescale = "l1") -> torch.Tensor:
    """DELLA's MagPrune (as ``della``), then a weighted sum (``normalize`` default false)."""
    return _della(deltas, weight, density, epsilon, rng, consensus=False, normalize=normalize,
                  lambda_=lambda_, rescale=rescale)


@merge_method("sce", inputs="deltas")
def sce(deltas: torch.Tensor, *, select_topk: Fraction = 1.0) -> torch.Tensor:
    """SCE (select, calculate, erase): keep the ``select_topk`` fraction (default 1) of entries
    whose values vary most across the task vectors; weigh each vector by its mean square (share
    of the total); drop entries against the elected sign; weighted average. No per-model
    weights."""
    if select_topk < 1:
        deltas = deltas * _varying(deltas, select_topk)
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = deltas.sign() == majority
    energy = deltas.square().reshape(len(deltas), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.ones_like(energy) / len(energy) if abs(total) < 1e-6 else energy / total
    kept = weights.reshape((-1,) + (1,) * (deltas.dim() - 1)) * agree
    return (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)


def _varying(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's selection: 1 at the ``fraction`` of (non-constant) entries of largest variance
    across the task vectors, 0 elsewhere, in their dtype."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


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
