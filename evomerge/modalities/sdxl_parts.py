"""What completes an SDXL UNet into a pipeline, loaded as diffusers would: Hub subfolders of
one weight variant, pipeline components with the classes ``model_index.json`` names (safetensors
unless pickles are allowed), and a LoRA's weight deltas computed exactly as ``fuse_lora`` does.
The adapter (:mod:`evomerge.modalities.sdxl`) decides when each is needed.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import EvomergeError, describe
from evomerge.modalities.base import local_or_hub

if TYPE_CHECKING:
    from evomerge.recipe import LoraSpec

LORA_ADAPTER = "evomerge"


def _weight_variant(filename: str) -> str | None:
    """``model.fp16.safetensors`` -> fp16, ``model-00001-of-00002.safetensors`` -> None."""
    parts = Path(filename).name.split(".")
    return parts[1].split("-")[0] if len(parts) > 2 else None


def fetch(ref: str, subfolders: list[str], variant: str | None = None) -> Path:
    """A local folder for a pipeline folder or Hub id, fetching only ``subfolders`` (and
    model_index.json) from the Hub: configs, tokenizer files and safetensors weights of one
    variant (``variant`` where the folder has it, else the plain weights, else any)."""

    def download(repo: str) -> Path:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(repo)
        wanted = ["model_index.json"]
        for sub in subfolders:
            inside = [f for f in files if f.startswith(f"{sub}/") and f.count("/") == 1]
            weights = [f for f in inside if f.endswith(".safetensors")]
            by_variant: dict[str | None, list[str]] = {}
            for f in weights:
                by_variant.setdefault(_weight_variant(f), []).append(f)
            pick = variant if variant in by_variant else (None if None in by_variant else next(iter(by_variant), None))
            wanted += [f for f in inside if not f.endswith((".safetensors", ".bin", ".onnx", ".msgpack", ".ckpt",
                                                             ".onnx_data", ".pb", ".h5"))]
            wanted += by_variant.get(pick, [])
        return Path(snapshot_download(repo, allow_patterns=wanted))

    return local_or_hub(ref, download)


def folder_variant(folder: Path, variant: str | None) -> str | None:
    """``variant`` when ``folder`` holds weights of that variant, else None (plain weights)."""
    if variant and any(_weight_variant(p.name) == variant for p in folder.glob("*.safetensors")):
        return variant
    if folder.is_dir() and not any(_weight_variant(p.name) is None for p in folder.glob("*.safetensors")):
        found = {_weight_variant(p.name) for p in folder.glob("*.safetensors")}
        return next(iter(sorted(v for v in found if v)), None)
    return None


def load_component(ref: str, name: str, dtype: torch.dtype | None, variant: str | None = None,
                   *, allow_pickle: bool = False) -> Any:
    """One pipeline component (``text_encoder``, ``tokenizer``, ``vae``...) from a pipeline folder
    or Hub id, with the class its model_index.json names (safetensors weights unless pickles
    are allowed)."""
    root = fetch(ref, [name], variant)
    folder = root / name
    if not folder.is_dir():
        raise EvomergeError(f"sdxl.components.{name}: {ref} has no {name}/ folder")
    index = root / "model_index.json"
    library, class_name = (json.loads(index.read_text()).get(name) or [None, None]) if index.exists() else (None, None)
    cls = None
    if library in ("transformers", "diffusers") and class_name:
        cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:  # a custom class (remote code): the auto classes
        from transformers import AutoModel, AutoTokenizer

        if "tokenizer" in name:
            return AutoTokenizer.from_pretrained(folder, use_fast=False)
        cls = AutoModel
    if "tokenizer" in name or "scheduler" in name or not hasattr(cls, "from_pretrained"):
        return cls.from_pretrained(folder)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if (v := folder_variant(folder, variant)) is not None:
        kwargs["variant"] = v
    try:
        return cls.from_pretrained(folder, use_safetensors=None if allow_pickle else True, **kwargs)
    except (OSError, ValueError) as e:
        raise EvomergeError(f"sdxl.components.{name}: cannot load from {ref} ({describe(e)}); pickle "
                            "weights need --allow-pickle") from None


def lora_deltas(spec: LoraSpec, unet_config: dict, dtype: torch.dtype, device: str | torch.device = "cpu",
                *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weight deltas a LoRA adds when fused: canonical UNet name -> delta (in ``dtype``).

    diffusers reads the file (diffusers, kohya and peft formats, network alphas and adapter
    metadata) and loads it into a UNet built on the meta device (no weights); peft then computes
    each delta (in float32) from the real LoRA factors, scaled by ``spec.scale`` as ``fuse_lora``
    scales them.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    kwargs = {"weight_name": spec.weight_name} if spec.weight_name else {}
    if not allow_pickle:  # diffusers would fall back to (or be pointed at) a pickle
        named = spec.weight_name or (spec.path if Path(spec.path).expanduser().is_file() else None)
        if named is not None and not str(named).endswith(".safetensors"):
            raise EvomergeError(f"sdxl.lora {named!r}: a pickle file; pickles can run code when loaded. "
                                "Convert it to safetensors, or pass --allow-pickle if you trust it")
        kwargs["use_safetensors"] = True
    try:  # unet_config: how original-layout (sgm) LoRA block names map to diffusers'
        state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
            spec.path, return_lora_metadata=True, unet_config=unet.config, **kwargs)
    except Exception as e:
        raise EvomergeError(f"sdxl.lora {spec.path!r}: cannot read ({describe(e)})") from None
    factors = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not factors:
        raise EvomergeError(f"sdxl.lora {spec.path!r}: no UNet LoRA weights in it")
    if not any("lora_A" in k for k in factors):
        factors = convert_unet_state_dict_to_peft(factors)
    try:
        StableDiffusionXLPipeline.load_lora_into_unet(
            dict(state), alphas, unet, adapter_name=LORA_ADAPTER, metadata=metadata, low_cpu_mem_usage=True)
    except Exception as e:
        raise EvomergeError(f"sdxl.lora {spec.path!r}: does not fit this UNet ({describe(e)})") from None
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not isinstance(module, BaseTunerLayer) or LORA_ADAPTER not in getattr(module, "lora_A", {}):
                continue
            for part in ("lora_A", "lora_B"):
                weight = factors[f"{name}.{part}.weight"].to(torch.float32)
                getattr(module, part)[LORA_ADAPTER].weight = torch.nn.Parameter(weight, requires_grad=False)
            if spec.scale != 1.0:
                module.scale_layer(spec.scale)
            deltas[f"{name}.weight"] = module.get_delta_weight(LORA_ADAPTER).to(device=device, dtype=dtype)
    return deltas


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-component progress bars while a pipeline loads (once per run, not worth a bar)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()
