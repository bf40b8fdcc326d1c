"""Straightforward reference implementations of the merge methods, written independently of
evomerge's (sorts instead of selection, float64, one source at a time), for the tests."""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def topk_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Mask of the max(1, int(density*n)) largest |delta|, ties taken lowest index first."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    mag = delta.abs().reshape(-1).double()
    order = torch.sort(-mag, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(delta.shape)


def ties(base, models, weights, densities, *, normalize=True, lam=1.0):
    """TIES as mergekit defines it, in float64: trim, elect sign of the weighted sum, average."""
    base64 = base.double()
    weighted, kept_weights = [], []
    for m, w, d in zip(models, weights, densities, strict=True):
        delta = (m - base).double()  # the delta rounds as the merge's dtype does
        trimmed = torch.where(topk_keep(delta, d), delta, torch.zeros_like(delta))
        weighted.append(trimmed * w)
        kept_weights.append(w)
    total = sum(weighted)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    mixed = torch.zeros_like(base64)
    divisor = torch.zeros_like(base64)
    for wd, w in zip(weighted, kept_weights, strict=True):
        agree = torch.sign(wd) == sign
        mixed += torch.where(agree, wd, 0.0)
        divisor += torch.where(agree, w, 0.0)
    if normalize:
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return base64 + lam * mixed


def task_arithmetic(base, models, weights, *, lam=1.0, normalize=False):
    base64 = base.double()
    mixed = sum(w * (m - base).double() for m, w in zip(models, weights, strict=True))
    if normalize:
        mixed = mixed / sum(weights)
    return base64 + lam * mixed


def linear(models, weights, *, normalize=True):
    out = sum(w * m.double() for m, w in zip(models, weights, strict=True))
    return out / sum(weights) if normalize else out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995):
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    dot = float(torch.dot(a64 / a64.norm(), b64 / b64.norm()))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > dot_threshold:
        out = (1 - t) * a64 + t * b64
    else:
        theta = math.acos(dot)
        out = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return out.reshape(a.shape)


# mergekit's per-layer values, worked out by hand from its rule (a list's first value on the first
# layer, its last on the last, straight lines between neighbours): (list length, depth) -> the
# weight of each list entry. Depth is layer / (layers - 1).
GRADIENT_WEIGHTS: dict[tuple[int, Fraction], tuple[float, ...]] = {
    (2, Fraction(0)): (1, 0), (2, Fraction(1)): (0, 1),                      # 2 layers
    (2, Fraction(1, 2)): (1 / 2, 1 / 2),                                     # 3 layers, middle
    (2, Fraction(1, 3)): (2 / 3, 1 / 3), (2, Fraction(2, 3)): (1 / 3, 2 / 3),  # 4 layers
    (3, Fraction(0)): (1, 0, 0), (3, Fraction(1)): (0, 0, 1),
    (3, Fraction(1, 2)): (0, 1, 0),
    (3, Fraction(1, 3)): (1 / 3, 2 / 3, 0), (3, Fraction(2, 3)): (0, 2 / 3, 1 / 3),
    (4, Fraction(0)): (1, 0, 0, 0), (4, Fraction(1)): (0, 0, 0, 1),
    (4, Fraction(1, 3)): (0, 1, 0, 0), (4, Fraction(2, 3)): (0, 0, 1, 0),
    (4, Fraction(1, 2)): (0, 1 / 2, 1 / 2, 0),
}


def gradient(values, depth: float) -> float:
    """mergekit's per-layer value of ``values`` (a number, or a list spread over depth 0..1),
    read from the hand-worked table above."""
    if not isinstance(values, list):
        return values
    weights = GRADIENT_WEIGHTS[(len(values), Fraction(depth).limit_denominator(12))]
    return sum(w * v for w, v in zip(weights, values, strict=True))


def raw_vlm(folder) -> dict[str, torch.Tensor]:
    """A VLM folder's tensors under legacy names, whatever layout is on disk (independent of evomerge)."""
    from safetensors.torch import load_file

    out = {}
    for k, v in load_file(folder / "model.safetensors").items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        elif k.startswith("model."):
            k = k[len("model."):]
        out[k] = v
    return out
