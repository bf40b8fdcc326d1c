"""SDXL UNets (diffusers ``UNet2DConditionModel``), merged block by block.

Canonical names are the diffusers UNet ``state_dict`` names. Groups follow the 20-value
block layout (BASE, IN00-IN08, M00, OUT00-OUT08) with evomerge's fixed mapping from diffusers
blocks to the original SDXL ``input_blocks``/``output_blocks`` (see REFERENCE.md):
``time_embedding`` and ``add_embedding`` are BASE, ``conv_in`` is IN00, ``down_blocks.i.{resnets,
attentions}.j`` is IN(3i+j+1), ``down_blocks.i.downsamplers`` is IN(3i+3), ``mid_block`` is M00,
``up_blocks.i.{resnets,attentions}.j`` is OUT(3i+j), ``up_blocks.i.upsamplers`` is OUT(3i+2),
``conv_norm_out``/``conv_out`` are OUT08. Anything else (text encoders, VAE in a whole-pipeline
merge) is BASE.

``grouping`` picks the unit of per-group values: ``blocks`` (the 20 above), ``attn_other``
(attention projections to_q/to_k/to_v/to_out.0 against everything else, as EvoSDXL-JP's public
loader does) or ``blocks_attn_other`` (each block split in two, e.g. ``IN04.attn``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.modalities.base import TensorSource, open_checkpoint, resolve_folder

BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
GROUPINGS = ("blocks", "attn_other", "blocks_attn_other")
ATTENTION_RE = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)\.")
DOWN_RE = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.")
UP_RE = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.")


def unet_block(name: str) -> str:
    """The SDXL block (BASE, IN00..IN08, M00, OUT00..OUT08) of a diffusers UNet tensor name."""
    if name.startswith("conv_in."):
        return "IN00"
    if name.startswith("mid_block."):
        return "M00"
    if name.startswith(("conv_norm_out.", "conv_out.")):
        return "OUT08"
    if m := DOWN_RE.match(name):
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{3 * i + j + 1:02d}"
    if m := UP_RE.match(name):
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    return "BASE"


def is_attention_projection(name: str) -> bool:
    return ATTENTION_RE.search(name) is not None


class SDXLAdapter:
    modality = "sdxl"
    weights_stem = "diffusion_pytorch_model"

    def __init__(self, grouping: str = "blocks"):
        if grouping not in GROUPINGS:
            raise EvomergeError(f"sdxl grouping {grouping!r}: use one of {', '.join(GROUPINGS)}")
        self.grouping = grouping

    def open(self, ref: str, label: str, *, allow_pickle: bool = False) -> TensorSource:
        folder = resolve_folder(ref, subfolder="unet", allow_pickle=allow_pickle)
        source = open_checkpoint(label, folder, self.weights_stem, lambda n: n, allow_pickle=allow_pickle)
        if source.config.get("_class_name") not in (None, "UNet2DConditionModel"):
            raise EvomergeError(f"model {label}: {folder} holds a {source.config['_class_name']}, not a UNet")
        return source

    def group(self, name: str) -> str:
        part = "attn" if is_attention_projection(name) else "other"
        if self.grouping == "attn_other":
            return part
        block = unet_block(name)
        return block if self.grouping == "blocks" else f"{block}.{part}"

    def groups(self, names: list[str]) -> list[str]:
        present = set(self.group(n) for n in names)
        if self.grouping == "attn_other":
            return [g for g in ("attn", "other") if g in present]
        order = BLOCKS if self.grouping == "blocks" else [
            f"{b}.{p}" for b in BLOCKS for p in ("attn", "other")]
        return [g for g in order if g in present]

    def layer_fraction(self, name: str, reference: TensorSource) -> float:
        return BLOCKS.index(unet_block(name)) / (len(BLOCKS) - 1)

    def is_vocab(self, name: str) -> bool:
        return False

    def merge_role(self, name: str, reference: TensorSource) -> str:
        return "merge"

    def build(self, reference: TensorSource, dtype: torch.dtype, device: str) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(reference.folder, torch_dtype=dtype).to(device).eval()

    def parameters(self, runnable: torch.nn.Module) -> dict[str, torch.Tensor]:
        unet = getattr(runnable, "unet", runnable)
        return dict(unet.state_dict(keep_vars=True))

    def save_extras(self, reference: TensorSource, out_dir: Path, dtype: torch.dtype) -> None:
        shutil.copy2(reference.folder / "config.json", out_dir / "config.json")
