"""Opening a recipe's model: a Hub revision, and a PEFT LoRA applied before merging.

A LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is folded into
the weights it targets as PEFT's ``merge_and_unload`` does (``W + scaling * B @ A``, the delta in
float32 for 16-bit adapters, then rounded to the weight's dtype), so ``model+lora`` in a mergekit
YAML merges the same tensors as mergekit, which merges the adapter with PEFT first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.checkpoint import index_safetensors, load_pickle_state_dict, read_tensor
from evomerge.errors import EvomergeError, describe
from evomerge.modalities.base import HUB_PATTERNS, Adapter, TensorSource, local_or_hub

if TYPE_CHECKING:
    from evomerge.recipe import ModelSpec


def fetch(ref: str, revision: str | None, *, allow_pickle: bool = False) -> str:
    """A local folder for ``ref`` at ``revision``. A revision names a Hub commit; a local folder
    is read as it is (as mergekit does)."""
    if revision is None or Path(ref).expanduser().exists():
        return ref

    def download(repo: str) -> Path:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))

    return str(local_or_hub(ref, download))


def open_model(adapter: Adapter, spec: ModelSpec, label: str, *, allow_pickle: bool = False) -> TensorSource:
    """Open a recipe's model (``ModelSpec``): its revision, then its LoRA folded in."""
    source = adapter.open(fetch(spec.model, spec.revision, allow_pickle=allow_pickle), label,
                          allow_pickle=allow_pickle)
    if spec.lora:
        lora_ref, _, lora_rev = spec.lora.partition("@")
        folder = Path(fetch(lora_ref, lora_rev or None, allow_pickle=allow_pickle))
        apply_lora(source, folder, allow_pickle=allow_pickle)
    return source


def _lora_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    entries = index_safetensors(folder, "adapter_model")
    if entries:
        return {name: read_tensor(e) for name, e in entries.items()}
    pickle = folder / "adapter_model.bin"
    if not pickle.exists():
        raise EvomergeError(f"LoRA {folder}: no adapter_model.safetensors; is this a PEFT adapter folder?")
    if not allow_pickle:
        raise EvomergeError(f"LoRA {folder}: only a pickle adapter (adapter_model.bin) found; pickles "
                            "can run code when loaded. Convert it to safetensors, or pass --allow-pickle")
    return load_pickle_state_dict(pickle)


def _lora_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise EvomergeError(f"LoRA {folder}: no adapter_config.json; is this a PEFT adapter folder?")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise EvomergeError(f"{path}: not valid JSON ({describe(e)})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise EvomergeError(f"LoRA {folder}: peft_type {config['peft_type']!r}; only LORA adapters are applied")
    unsupported = [k for k in ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern")
                   if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        key = unsupported[0]
        raise EvomergeError(f"LoRA {folder}: adapter_config.json {key}={config[key]!r} is not supported; "
                            "merge the adapter with PEFT (merge_and_unload) and pass that folder")
    return config


def apply_lora(source: TensorSource, folder: Path, *, allow_pickle: bool = False) -> None:
    """Fold a PEFT LoRA into ``source`` (the changed tensors are held in memory)."""
    config = _lora_config(folder)
    tensors = _lora_tensors(folder, allow_pickle)
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    modules = sorted({n.rsplit(".lora_", 1)[0] for n in tensors if ".lora_A." in n})
    if not modules or any(".lora_" not in n for n in tensors):
        other = next((n for n in tensors if ".lora_" not in n), "no lora_A tensors")
        raise EvomergeError(f"LoRA {folder}: unexpected tensor {other}; only LoRA A/B matrices are applied")
    for module in modules:
        a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        target = module.removeprefix("base_model.model.") + ".weight"
        if a is None or b is None:
            raise EvomergeError(f"LoRA {folder}: {module} lacks lora_A or lora_B weights (embedding LoRAs "
                                "are not supported)")
        if target not in source:
            raise EvomergeError(f"LoRA {folder}: targets {target}, which model {source.label} lacks")
        if a.dtype in (torch.float16, torch.bfloat16):  # PEFT loads 16-bit adapters as float32
            a, b = a.float(), b.float()
        delta = b @ a
        if config.get("fan_in_fan_out"):
            delta = delta.T
        delta = delta * scaling
        weight = source.read(target)
        if tuple(delta.shape) != tuple(weight.shape):
            raise EvomergeError(f"LoRA {folder}: {module} gives shape {list(delta.shape)}, "
                                f"{target} has {list(weight.shape)}")
        source.loaded[target] = (weight.to(torch.promote_types(weight.dtype, delta.dtype)) + delta).to(weight.dtype)
        source.entries.pop(target, None)
