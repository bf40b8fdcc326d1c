"""Causal language models in the Llama/Mistral/Qwen layout (``model.layers.N.*``).

Canonical names are the checkpoint's own (``model.embed_tokens.weight``,
``model.layers.3.mlp.down_proj.weight``, ``model.norm.weight``, ``lm_head.weight``).
Groups: ``embed``, ``layers.0`` ... ``layers.{n-1}``, ``head`` (final norm and lm_head).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from evomerge.checkpoint import inside_folder
from evomerge.errors import EvomergeError
from evomerge.modalities.base import (
    LAYER_RE,
    Adapter,
    TensorSource,
    open_checkpoint,
    resolve_folder,
)

# Files that are weights, written by the merge itself; everything else in a folder is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
SKIP_FILES = {"README.md", ".gitattributes"}
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def num_layers(config: dict) -> int:
    text = config.get("text_config", config)
    n = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if type(n) is not int or n < 1:
        raise EvomergeError("config.json has no num_hidden_layers (a positive integer); is this a causal LM folder?")
    return n


def copy_model_files(src: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Copy config, tokenizer and processor files; record the output dtype in config.json."""
    for p in src.iterdir():
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in SKIP_FILES \
                and not p.name.endswith(".index.json"):
            shutil.copy2(inside_folder(src, p), out_dir / p.name)
    config_path = out_dir / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        dtype_name = str(dtype).removeprefix("torch.")
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def alias_tied_head(source: TensorSource, embed: str = "model.embed_tokens.weight") -> None:
    """A model with tied embeddings stores no lm_head (transformers writes only the embedding):
    read its lm_head from the embedding, so it merges with untied heads of the same family."""
    head = "lm_head.weight"
    if head in source or embed not in source or not source.config.get("tie_word_embeddings", False):
        return
    if embed in source.entries:
        source.entries[head] = source.entries[embed]
    else:
        source.loaded[head] = source.loaded[embed]


class CausalLMAdapter(Adapter):
    modality = "causal_lm"
    weights_stem = "model"

    def __init__(self, trust_remote_code: bool = False):
        self.trust_remote_code = trust_remote_code

    def open(self, ref: str, label: str, *, allow_pickle: bool = False) -> TensorSource:
        folder = resolve_folder(ref, allow_pickle=allow_pickle)
        source = open_checkpoint(label, folder, self.weights_stem, lambda n: n, allow_pickle=allow_pickle)
        if "vision_config" in source.config:
            raise EvomergeError(f"model {label}: a vision-language model; use modality: vlm")
        alias_tied_head(source)
        return source

    def group(self, name: str) -> str:
        i = layer_index(name)
        if i is not None:
            return f"layers.{i}"
        return "embed" if "embed_tokens" in name else "head"

    def groups(self, names: list[str]) -> list[str]:
        return ordered_groups(self.group(n) for n in names)

    def layer_fraction(self, name: str, reference: TensorSource) -> float:
        i, n = layer_index(name), num_layers(reference.config)
        return 0.0 if i is None else (i / (n - 1) if n > 1 else 1.0)

    def is_vocab(self, name: str) -> bool:
        return name.endswith(VOCAB_TENSORS)

    def build(self, reference: TensorSource, dtype: torch.dtype, device: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            reference.folder, dtype=dtype, trust_remote_code=self.trust_remote_code,
            use_safetensors=bool(reference.entries))
        return model.to(device).eval()

    def parameters(self, runnable: torch.nn.Module) -> dict[str, torch.Tensor]:
        return dict(runnable.state_dict(keep_vars=True))

    def empty_model(self, config_folder: Path) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_folder))

    def save_extras(self, reference: TensorSource, out_dir: Path, dtype: torch.dtype) -> None:
        copy_model_files(reference.folder, out_dir, dtype)


def ordered_groups(groups) -> list[str]:
    """Distinct groups in first-seen order, with ``layers.N`` sorted numerically."""
    seen = list(dict.fromkeys(groups))
    layers = sorted((g for g in seen if g.startswith("layers.")), key=lambda g: int(g.split(".")[1]))
    head = [g for g in seen if not g.startswith("layers.") and g in ("embed",)]
    tail = [g for g in seen if not g.startswith("layers.") and g not in ("embed",)]
    return head + layers + tail
