"""What a model looks like to evomerge: every tensor's canonical name, shape and merge group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evomerge.modalities import get_adapter
from evomerge.strict_io import read_json


@dataclass
class ModelInfo:
    modality: str
    groups: dict[str, str]  # canonical tensor name -> group, in merge order
    shapes: dict[str, tuple[int, ...]]


def detect_modality(ref: str) -> str:
    """sdxl for a pipeline (model_index.json), a UNet config or a single file; vlm for a config
    with vision_config; causal_lm otherwise. Hub ids: from their config files."""
    from evomerge.modalities.sdxl import is_single_file

    if is_single_file(ref):
        return "sdxl"
    path = Path(ref).expanduser()
    if not path.exists():
        from evomerge.modalities.base import config_folder

        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(ref, "model_index.json")
            return "sdxl"
        except Exception:
            path = config_folder(ref, None)
    if (path / "model_index.json").exists():
        return "sdxl"
    config_path = path / "config.json"
    config = read_json(config_path, "config.json") if config_path.exists() else {}
    if config.get("_class_name") == "UNet2DConditionModel":
        return "sdxl"
    return "vlm" if "vision_config" in config else "causal_lm"


def inspect_model(ref: str, *, modality: str | None = None, grouping: str = "blocks",
                  allow_pickle: bool = False) -> ModelInfo:
    """Open a model as a merge would and list its tensors with their groups (merge order)."""
    modality = modality or detect_modality(ref)
    adapter = get_adapter(modality, grouping=grouping)
    source = adapter.open(ref, "model", allow_pickle=allow_pickle)
    names = source.names()
    order = {g: i for i, g in enumerate(adapter.groups(names))}
    names = sorted(names, key=lambda n: order[adapter.group(n)])
    return ModelInfo(modality, {n: adapter.group(n) for n in names}, {n: tuple(source.shape(n)) for n in names})
