"""LLaVA and LLaVA-NeXT: the language model is merged with text LLMs of the same family.

Canonical names are the VLM module names of current transformers
(``model.language_model.layers.N.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.image_newline``, ``lm_head.weight``). Hub checkpoints often use the legacy layout
(``language_model.model.layers.N.*``, ``language_model.lm_head.weight``, ``vision_tower.*``);
text LLMs use ``model.layers.N.*``. Both are renamed here, so the engine sees one name space.
The vision tower, projector and image_newline are kept from the VLM; embeddings and lm_head
merge the rows all sources share and keep the VLM's extra rows (image token, padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.modalities.base import D, TensorSource, open_checkpoint, resolve_folder
from evomerge.modalities.causal_lm import CausalLMAdapter, alias_tied_head, text_config
from evomerge.modalities.layouts import VLM_LAYOUTS, VLM_LM_PREFIX, choose
from evomerge.strict_io import read_json

LM = VLM_LM_PREFIX
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")
LEGACY = [  # (on-disk prefix, canonical prefix), first match wins
    ("language_model.model.", LM),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
]


def vlm_name(name: str) -> str:
    for old, new in LEGACY:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def text_llm_name(name: str) -> str:
    return LM + name[len("model."):] if name.startswith("model.") else name


class VLMAdapter(CausalLMAdapter):
    modality = "vlm"
    layouts = VLM_LAYOUTS

    def open(self, ref: str, label: str, *, allow_pickle: bool = False) -> TensorSource:
        folder = resolve_folder(ref, allow_pickle=allow_pickle)
        config_path = folder / "config.json"
        config = read_json(config_path, "config.json") if config_path.exists() else {}
        is_vlm = "vision_config" in config
        source = open_checkpoint(label, folder, self.weights_stem, vlm_name if is_vlm else text_llm_name,
                                 allow_pickle=allow_pickle)
        layout = choose(text_config(config) if is_vlm else config, source.names(), label, self.layouts,
                        ignore=VISION_PREFIXES)
        layout = self.bind(layout, label)
        if not is_vlm:
            alias_tied_head(source, layout)
        return source

    def group(self, name: str) -> str:
        return "vision" if name.startswith(VISION_PREFIXES) else super().group(name)

    def merge_role(self, name: str, reference: TensorSource) -> str:
        return "keep" if name.startswith(VISION_PREFIXES) else super().merge_role(name, reference)

    def default_reference(self, candidates: Sequence[D]) -> D:
        """The first LLaVA model (the output is a VLM)."""
        for c in candidates:
            if "vision_config" in c.config:
                return c
        raise EvomergeError("modality vlm: none of the models is a LLaVA model (no vision_config)")

    def check_reference(self, reference: TensorSource) -> None:
        if "vision_config" not in reference.config:
            raise EvomergeError(
                f"model {reference.label}: the first model of a vlm merge must be the LLaVA model "
                "(its config.json has no vision_config)")

    def build(self, reference: TensorSource, dtype: torch.dtype, device: str) -> torch.nn.Module:
        from transformers import AutoModelForImageTextToText

        self.check_reference(reference)
        model = AutoModelForImageTextToText.from_pretrained(
            reference.folder, dtype=dtype, trust_remote_code=self.trust_remote_code)
        return model.to(device).eval()

    def empty_model(self, config_folder: Path) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForImageTextToText

        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(config_folder))
