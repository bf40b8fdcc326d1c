"""The merge's dtype, decided in one place for merge, plan and DFS.

A recipe's ``dtype`` wins; else the reference model's: the dtype its first floating tensor is
stored in (read from safetensors headers, so ``plan`` agrees with ``merge`` whenever the weights
are on disk), else the dtype its config.json records, else float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.modalities.base import TensorSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise EvomergeError(f"dtype {name!r}: use one of float32, float16, bfloat16")
    return DTYPES[name]


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype a config.json records (``dtype`` or the older ``torch_dtype``), if any."""
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def default_dtype(requested: str | None, reference: TensorSource) -> torch.dtype:
    """The dtype a merge computes in (see the module docstring)."""
    if requested:
        return parse_dtype(requested)
    for name in reference.names():
        if reference.dtype(name).is_floating_point:
            return reference.dtype(name)
    return config_dtype(reference.config) or torch.float32
