"""Merge methods that work on the models' geometry rather than on sparsified task vectors:
spherical interpolations (slerp, nuslerp, multislerp, karcher), Model Stock, NearSwap,
Arcee Fusion, and passthrough. Plain functions registered by name, as in ``methods.py``.

Each follows mergekit 0.1.5's method of the same name step by step (the same operations in the
same dtype, so a mergekit YAML gives the same tensors here); the docstrings give each value's
meaning and mergekit's default. Methods that take ``base`` read the base model itself (not task
vectors) and return the finished tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F

from evomerge.errors import EvomergeError
from evomerge.merging.registry import (
    Base,
    Flag,
    Fraction,
    Generators,
    OptionalBase,
    Setting,
    Value,
    Weights,
    each,
    merge_method,
)

Distance = Annotated[float, Value(bounds=(0.0, 10.0))]
Scales = Annotated[Sequence[float], Value(per_source=True, bounds=(-10.0, 10.0))]

SLERP_DOT_THRESHOLD = 0.9995  # closer to (anti)collinear than this: interpolate linearly
NORM_EPS = 1e-8


@merge_method("slerp", inputs="models", sources=2)
def slerp(tensors: torch.Tensor, *, t: Fraction) -> torch.Tensor:
    """Spherical interpolation from the first model (t=0) to the second (t=1), whole tensor,
    in float32. Falls back to linear interpolation when the two are (anti)collinear.
    (mergekit lists the base as the first model.)"""
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


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool,
             eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@merge_method("nuslerp", inputs="models", sources=2)
def nuslerp(models: torch.Tensor, base: OptionalBase = None, *, weight: Weights,
            nuslerp_row_wise: Flag = False, nuslerp_flatten: Flag = True) -> torch.Tensor:
    """Spherical interpolation of two models at t = weight[1] / (weight[0] + weight[1])
    (0.5 when the weights sum to ~0), in the inputs' dtype; with a base, of their task vectors
    (then added to the base). ``nuslerp_flatten`` (default true): the whole tensor as one
    vector; else per row of the last dimension, or with ``nuslerp_row_wise`` per column."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    options = {"row_wise": nuslerp_row_wise, "flatten": nuslerp_flatten}
    if base is None:
        return _nuslerp(t, models[0], models[1], **options)
    return base + _nuslerp(t, models[0] - base, models[1] - base, **options)


@merge_method("multislerp", inputs="models")
def multislerp(models: torch.Tensor, base: OptionalBase = None, *, weight: Weights,
               normalize_weights: Flag = True, eps: Setting = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of any number of models (of their task
    vectors when a base is given): project onto the tangent space at the weighted mean of the
    unit vectors, interpolate there, map back, scale by the weighted mean norm. ``weight`` per
    model; ``normalize_weights`` (default true) divides them by their sum; ``eps`` (1e-8)."""
    if len(models) == 1:
        return models[0]
    tensors = models - base if base is not None else models.clone()
    flat = tensors.view(len(tensors), -1)
    weights = torch.tensor(list(weight), dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise EvomergeError("multislerp: the weighted sum of the inputs is zero (antipodal "
                                "inputs with balancing weights); use other weights")
        result = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
    return result if base is None else result + base


@merge_method("karcher", inputs="models")
def karcher(models: torch.Tensor, *, max_iter: Setting = 10, tol: Setting = 1e-5) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the models' directions on the unit hypersphere, equal
    weights, scaled by their mean norm; up to ``max_iter`` (10) iterations, stopping when the
    tangent step is below ``tol`` (1e-5). (mergekit counts the base model as one more model,
    after the listed ones.)"""
    if len(models) == 1:
        return models[0]
    work = torch.float64 if models.dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(models)] * len(models)
    norms = [torch.linalg.vector_norm(x.to(work)) for x in models]
    units = [torch.zeros_like(x) if float(n) == 0.0 else (x / n).to(x.dtype)
             for x, n in zip(models, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(models[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = units[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(work))
        if float(tangent_norm) < tol:
            break
        mean = (torch.cos(tangent_norm) * mean
                + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(work))
        if float(unit_norm) > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


@merge_method("model_stock", inputs="models", min_sources=2)
def model_stock(models: torch.Tensor, base: Base, *, filter_wise: Flag = False) -> torch.Tensor:
    """Model Stock: move from the base towards the models' average by t = k cos / (1 + (k-1) cos),
    cos the mean pairwise cosine of the task vectors (k models, at least two); the base where
    1 + (k-1) cos is ~0. ``filter_wise`` (default false): one t per row instead of per tensor."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if base.dim() == 1 else m for m in models]
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


@merge_method("nearswap", inputs="models", sources=1)
def nearswap(models: torch.Tensor, base: Base, *, t: Distance) -> torch.Tensor:
    """NearSwap: take the model where it is close to the base. Each entry moves from the base
    towards the model by clamp(t / |model - base|, 0, 1): entries closer than ``t`` (required,
    no default) become the model's, farther ones move by t only."""
    model = models[0]
    weight = (t / torch.abs(base - model).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * model + (1 - weight) * base


FUSION_SAMPLE = 1_000_000  # larger tensors: quantiles of this many entries drawn at random


@merge_method("arcee_fusion", inputs="models", sources=1)
def arcee_fusion(models: torch.Tensor, base: Base, *, rng: Generators) -> torch.Tensor:
    """Arcee Fusion: keep the model's change only where it matters. Importance = |model - base|
    times the KL divergence of the rows' softmaxes (model against base); entries whose
    importance reaches median + 1.5 IQR take the model's value, the others the base's. The
    quartiles of tensors over a million entries come from a random sample of a million (drawn
    with the per-tensor seeded generator); no values."""
    model = models[0]
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > FUSION_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (FUSION_SAMPLE,), generator=rng[0],
                                  device=flat.device)]
    ordered = torch.sort(flat).values
    where = (torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[where]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


@merge_method("passthrough", inputs="models", sources=1)
def passthrough(models: torch.Tensor, *, scale: Scales = 1.0) -> torch.Tensor:
    """The one model's tensor, times ``scale`` (per model, default 1: unchanged). Frankenmerges
    (several slices of layers) are built from it by the recipe's slices."""
    factor = each(scale, models)[0]
    return models[0] if factor == 1 else models[0] * factor
