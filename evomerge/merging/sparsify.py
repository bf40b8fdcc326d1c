"""Sparsification shared by the merge methods: magnitude trims (TIES), random drops (DARE) and
the per-tensor seeded generators that make random drops reproducible.

Pure torch; the fused kernels (``fused.py``) reuse :func:`kth_largest_magnitude` to plan their trims.
"""

from __future__ import annotations

import hashlib

import torch

from evomerge.errors import EvomergeError


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
    ``"l1"`` preserves the L1 norm of the delta (mergekit since 2025), ``"none"`` (or None) does
    not rescale.
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


def outlier_trim(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes (outliers), then the
    smallest, so that a ``density`` fraction is kept. When density + gamma > 1 fewer outliers
    go. Ties in magnitude are ordered by flat index."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mag = delta.abs().reshape(-1)
    mag = mag.float() if mag.device.type == "cpu" else mag
    order = torch.sort(mag, stable=True).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom:bottom + keep]] = 1
    return delta * mask.reshape(delta.shape)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rng: torch.Generator,
             rescale: bool) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with a probability from density - epsilon (smallest
    magnitude of its row) to density + epsilon (largest), by magnitude rank within the row
    (a 1-d tensor is one row); rescale the survivors to the delta's L1 norm when ``rescale``.
    Computed in float32 (bfloat16 stays bfloat16), as mergekit does."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise EvomergeError(f"della: density {density} and epsilon {epsilon}: density +/- epsilon "
                            "must lie strictly between 0 and 1; lower epsilon")
    work = (delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16
            else torch.float32)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # a row of one entry has no rank spread: it keeps the plain density
    spread = ((ranks - low) / (high - low)).nan_to_num(0.5).clamp(0, 1)
    keep = torch.bernoulli((density - epsilon) + spread * 2 * epsilon, generator=rng).to(work)
    original = rows.to(work)
    kept = original * keep
    if rescale:
        kept = rescale_l1(kept, original)
    return kept.to(delta.dtype).reshape(delta.shape)
