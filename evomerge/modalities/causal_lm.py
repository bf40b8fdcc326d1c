"""Causal language models of the families in :mod:`evomerge.modalities.layouts`.

Canonical names are the checkpoint's own as transformers reads them
(``model.layers.3.mlp.down_proj.weight``, ``transformer.h.3.attn.c_attn.weight``...). Groups: ``embed``, ``layers.0`` ... ``layers.{n-1}``,
``head`` (final norm and output head). Each model's layout is chosen from its config.json; a
model whose tensors fit no known layout is refused when opened.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from evomerge.checkpoint import inside_folder
from evomerge.errors import EvomergeError
from evomerge.modalities.base import Adapter, TensorSource, open_checkpoint, resolve_folder
from evomerge.modalities.layouts import LAYOUTS, Layout, choose

# Files that are weights, written by the merge itself; everything else in a folder is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
SKIP_FILES = {"README.md", ".gitattributes"}


def text_config(config: dict) -> dict:
    """The language model's config (a VLM's ``text_config``, else the config itself)."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


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


def alias_tied_head(source: TensorSource, layout: Layout) -> None:
    """A model with tied embeddings stores no head (transformers writes only the embedding):
    read its head from the embedding, so it merges with untied heads of the same family."""
    if not layout.ties(text_config(source.config)):
        return
    for head, embed in layout.tied:
        if head in source or embed not in source:
            continue
        if embed in source.entries:
            source.entries[head] = source.entries[embed]
        else:
            source.loaded[head] = source.loaded[embed]


def rename(source: TensorSource, new_name: Callable[[str], str]) -> None:
    """Rename a source's tensors in place."""
    source.entries = {new_name(n): e for n, e in source.entries.items()}
    source.loaded = {new_name(n): t for n, t in source.loaded.items()}


class CausalLMAdapter(Adapter):
    modality = "causal_lm"
    weights_stem = "model"
    layouts: tuple[Layout, ...] = LAYOUTS  # the tables this adapter chooses from

    def __init__(self, trust_remote_code: bool = False):
        self.trust_remote_code = trust_remote_code
        self.layout: Layout | None = None  # that of the models opened, once one is

    def open(self, ref: str, label: str, *, allow_pickle: bool = False) -> TensorSource:
        folder = resolve_folder(ref, allow_pickle=allow_pickle)
        source = open_checkpoint(label, folder, self.weights_stem, lambda n: n, allow_pickle=allow_pickle)
        if "vision_config" in source.config:
            raise EvomergeError(f"model {label}: a vision-language model; use modality: vlm")
        layout = self.bind(choose(source.config, source.names(), label, self.layouts), label)
        if layout.omitted_prefix:
            rename(source, layout.canonical)
        alias_tied_head(source, layout)
        return source

    def bind(self, layout: Layout, label: str) -> Layout:
        """Hold the layout of the models of this merge: all must share its names."""
        if self.layout is None:
            self.layout = layout
        elif not self.layout.same_names(layout):
            raise EvomergeError(f"model {label}: {layout.family} layout, the models before it have the "
                                f"{self.layout.family} layout; merge models of one family")
        return self.layout

    def layout_of(self, name: str) -> Layout:
        """The bound layout; before any model is opened (a plan made from a config alone), the
        first table the name fits (their names do not overlap)."""
        if self.layout is not None:
            return self.layout
        fits = next((lay for lay in self.layouts if lay.group(name) is not None), None)
        if fits is None:
            raise EvomergeError(f"tensor {name} fits no layout evomerge knows "
                                f"({', '.join(lay.family for lay in self.layouts)})")
        return fits

    def group(self, name: str) -> str:
        group = self.layout_of(name).group(name)
        if group is None:  # open() refused such models; a name from elsewhere
            raise EvomergeError(f"tensor {name} is not in the {self.layout_of(name).family} layout")
        return group

    def groups(self, names: list[str]) -> list[str]:
        return ordered_groups(self.group(n) for n in names)

    def layer_fraction(self, name: str, reference: TensorSource) -> float:
        """Layer i of n at i/(n-1), as mergekit places its value lists (one layer: 1); tensors
        outside the layers at 0."""
        layout = self.layout_of(name)
        i = layout.layer_index(name)
        if i is None:
            return 0.0
        n = layout.num_layers(text_config(reference.config))
        return i / (n - 1) if n > 1 else 1.0

    def merge_role(self, name: str, reference: TensorSource) -> str:
        """A reference that ties its head writes none: the head is the merged embedding (a head
        merged apart would be what a trial scores, through the shared storage, but not what a
        loader of the saved model reads)."""
        layout = self.layout_of(name)
        if layout.ties(text_config(reference.config)) and any(name == head for head, _ in layout.tied):
            return "skip"
        return "merge"

    def is_vocab(self, name: str) -> bool:
        return name in self.layout_of(name).vocab

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
