"""SDXL UNets (diffusers ``UNet2DConditionModel``), merged block by block, sampled as a pipeline.

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

Sources are diffusers UNet folders, pipeline folders or Hub ids (their ``unet/``), or single-file
SDXL checkpoints (``.safetensors``; converted by diffusers, with the UNet config taken from the
recipe's ``sdxl.pipeline``). The recipe's ``sdxl:`` block (:class:`evomerge.recipe.SDXLSpec`) adds:

- ``lora``: a LoRA (e.g. SDXL-Lightning 4-step) fused into one source (``into: <label>``) or into
  the merged UNet (``into: merged``). For the latter the LoRA's weight deltas are computed once
  (by peft, exactly as diffusers' ``fuse_lora`` computes them) and added after every in-place
  merge and to every exported tensor they touch;
- ``pipeline`` (+ ``components``): the rest of the pipeline. The runnable is then a
  ``StableDiffusionXLPipeline`` built once whose UNet the engine rewrites in place each trial,
  with the recipe's scheduler; the sampling settings (steps, guidance, search and full size) go
  to the evaluator as data (:meth:`SDXLAdapter.evaluator_settings`). The export is a full
  pipeline folder that stock ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.checkpoint import read_safetensors_header
from evomerge.errors import EvomergeError, describe
from evomerge.modalities.base import Adapter, TensorSource, open_checkpoint, resolve_folder
from evomerge.modalities.sdxl_parts import (
    fetch,
    folder_variant,
    load_component,
    lora_deltas,
    quiet_loading,
)

if TYPE_CHECKING:
    from evomerge.recipe import SDXLSpec

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


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET_STEM = "diffusion_pytorch_model"


def is_single_file(ref: str) -> bool:
    path = Path(ref).expanduser()
    return path.suffix in SINGLE_FILE_SUFFIXES and (path.is_file() or not path.exists())


class SDXLAdapter(Adapter):
    modality = "sdxl"
    weights_stem = UNET_STEM
    library = "diffusers"
    config_subfolder = "unet"

    def __init__(self, grouping: str = "blocks", spec: SDXLSpec | None = None):
        if grouping not in GROUPINGS:
            raise EvomergeError(f"sdxl grouping {grouping!r}: use one of {', '.join(GROUPINGS)}")
        self.grouping = grouping
        if spec is None:
            from evomerge.recipe import SDXLSpec

            spec = SDXLSpec()
        self.spec = spec
        self._config: dict = {}
        self._merged_lora: dict[str, torch.Tensor] | None = None  # LoRA into the merge: deltas
        self.allow_pickle = False

    # -- opening sources ------------------------------------------------------------------------

    def open(self, ref: str, label: str, *, allow_pickle: bool = False) -> TensorSource:
        if is_single_file(ref):
            source = self._open_single_file(ref, label, allow_pickle=allow_pickle)
        else:
            path = Path(ref).expanduser()
            if path.exists():
                folder = resolve_folder(ref, subfolder="unet", allow_pickle=allow_pickle)
            else:  # a Hub pipeline (its unet/, one weight variant), or a bare UNet repo
                folder = fetch(ref, ["unet"], self.spec.variant) / "unet"
                if not folder.is_dir():
                    folder = resolve_folder(ref, allow_pickle=allow_pickle)
            source = open_checkpoint(label, folder, self.weights_stem, lambda n: n, allow_pickle=allow_pickle)
            if source.config.get("_class_name") not in (None, "UNet2DConditionModel"):
                raise EvomergeError(f"model {label}: {folder} holds a {source.config['_class_name']}, not a UNet")
        self._config = source.config
        self.allow_pickle = allow_pickle  # for the LoRA and pipeline parts loaded later
        lora = self.spec.lora
        if lora is not None and lora.into == label:
            self._fuse_into_source(source)
        return source

    def _open_single_file(self, ref: str, label: str, *, allow_pickle: bool) -> TensorSource:
        """A single-file SDXL checkpoint, converted by diffusers (read eagerly)."""
        from diffusers import UNet2DConditionModel

        path = Path(ref).expanduser()
        if not path.is_file():
            raise EvomergeError(f"model {label}: {ref} does not exist")
        if path.suffix != ".safetensors" and not allow_pickle:
            raise EvomergeError(f"model {label}: {path.name} is a pickle checkpoint; pickles can run code when "
                                "loaded. Convert to safetensors, or pass --allow-pickle if you trust it")
        if not self.spec.pipeline:
            raise EvomergeError(f"model {label}: a single-file checkpoint needs sdxl.pipeline (a pipeline folder "
                                "or Hub id whose unet/config.json describes it)")
        config_root = fetch(self.spec.pipeline, ["unet"], self.spec.variant)
        dtype = None
        if path.suffix == ".safetensors":
            dtype = next((e.dtype for e in read_safetensors_header(path).values() if e.dtype.is_floating_point), None)
        try:
            unet = UNet2DConditionModel.from_single_file(str(path), config=str(config_root), subfolder="unet",
                                                         dtype=dtype)
        except Exception as e:
            raise EvomergeError(f"model {label}: cannot read {path.name} as an SDXL checkpoint "
                                f"({describe(e)})") from None
        state = {n: t.detach() for n, t in unet.state_dict().items()}
        config = json.loads((config_root / "unet" / "config.json").read_text())
        return TensorSource(label, config_root / "unet", {}, state, config)

    def _fuse_into_source(self, source: TensorSource) -> None:
        deltas = lora_deltas(self.spec.lora, source.config, torch.float32, allow_pickle=self.allow_pickle)
        for name, delta in deltas.items():
            if name not in source:
                raise EvomergeError(f"sdxl.lora: {name} is not a tensor of {source.label}")
            dtype = source.dtype(name)
            source.loaded[name] = (source.read(name, torch.float32) + delta).to(dtype)

    # -- groups ---------------------------------------------------------------------------------

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

    # -- a LoRA fused into the merged UNet ------------------------------------------------------

    @property
    def lora_into_merged(self) -> bool:
        return self.spec.lora is not None and self.spec.lora.into == "merged"

    def merged_lora(self, dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
        """The deltas of a LoRA fused into the merge, computed once (in the merge's dtype)."""
        if self._merged_lora is None:
            self._merged_lora = (lora_deltas(self.spec.lora, self._config, dtype, device, allow_pickle=self.allow_pickle)
                                 if self.lora_into_merged else {})
        return self._merged_lora

    def after_merge(self, params: dict[str, torch.Tensor]) -> None:
        """Re-add the LoRA after the engine rewrote the merged tensors in place."""
        if not self.lora_into_merged:
            return
        first = next(iter(params.values()))
        with torch.no_grad():
            for name, delta in self.merged_lora(first.dtype, first.device).items():
                params[name].add_(delta)

    def finish_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """An exported tensor with the LoRA fused in (a new tensor; the input is left alone)."""
        if not self.lora_into_merged:
            return tensor
        delta = self.merged_lora(tensor.dtype, tensor.device).get(name)
        return tensor if delta is None else tensor + delta.to(tensor.device, tensor.dtype)

    # -- the runnable: a pipeline around the resident UNet --------------------------------------

    def pipeline_ref(self, reference: TensorSource) -> str | None:
        """What completes the UNet into a pipeline: sdxl.pipeline, or the pipeline folder the
        reference UNet came from."""
        if self.spec.pipeline:
            return self.spec.pipeline
        index = reference.folder.parent / "model_index.json"
        if reference.folder.name == "unet" and index.exists() and "text_encoder_2" in json.loads(index.read_text()):
            return str(reference.folder.parent)
        return None

    def sampling(self, *, search: bool = True) -> dict[str, Any]:
        """pipeline(...) keyword arguments for evaluation (search size, or the full size)."""
        s = self.spec
        height = (s.search_height or s.height) if search else s.height
        width = (s.search_width or s.width) if search else s.width
        return {"num_inference_steps": s.steps, "guidance_scale": s.guidance_scale, "height": height, "width": width}

    def evaluator_settings(self) -> dict[str, Any]:
        """``sampling`` (search size) and ``final_sampling`` (full size): pipeline(...) arguments."""
        return {"sampling": self.sampling(search=True), "final_sampling": self.sampling(search=False)}

    def scheduler(self, current: Any) -> Any:
        """The recipe's scheduler, configured from the pipeline's own scheduler config."""
        if not self.spec.scheduler:
            return current
        import diffusers

        cls = getattr(diffusers, self.spec.scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise EvomergeError(f"sdxl.scheduler {self.spec.scheduler!r}: not a diffusers scheduler class")
        return cls.from_config(current.config, **self.spec.scheduler_options)

    def load_pipeline(self, ref: str, unet: Any, dtype: torch.dtype) -> Any:
        """A StableDiffusionXLPipeline from ``ref`` around ``unet`` (None: no UNet, for export),
        with the recipe's components and scheduler."""
        from diffusers import StableDiffusionXLPipeline

        parts = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"]
        overrides = {name: load_component(src, name, dtype, self.spec.variant, allow_pickle=self.allow_pickle)
                     for name, src in self.spec.components.items()}
        root = fetch(ref, [p for p in parts if p not in overrides], self.spec.variant)
        if not (root / "model_index.json").exists():
            raise EvomergeError(f"sdxl.pipeline {ref}: not a pipeline folder (no model_index.json)")
        kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": None if self.allow_pickle else True}
        if self.spec.variant and folder_variant(root / "text_encoder_2", self.spec.variant):
            kwargs["variant"] = self.spec.variant
        try:
            with quiet_loading():
                pipe = StableDiffusionXLPipeline.from_pretrained(root, unet=unet, **overrides, **kwargs)
        except Exception as e:
            raise EvomergeError(f"sdxl.pipeline {ref}: cannot load ({describe(e)})") from None
        pipe.scheduler = self.scheduler(pipe.scheduler)
        return pipe

    def build_unet(self, reference: TensorSource, dtype: torch.dtype) -> torch.nn.Module:
        """The reference UNet (any source kind) from its config and tensors."""
        from diffusers import UNet2DConditionModel

        config = {k: v for k, v in reference.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        state = {n: reference.read(n, dtype if reference.dtype(n).is_floating_point else None)
                 for n in reference.names()}
        unet.load_state_dict(state, strict=True, assign=True)
        return unet.eval()

    def build(self, reference: TensorSource, dtype: torch.dtype, device: str) -> Any:
        unet = self.build_unet(reference, dtype)
        if torch.device(device).type != "cpu":
            unet.to(device)
        self.after_merge(dict(unet.state_dict(keep_vars=True)))
        ref = self.pipeline_ref(reference)
        if ref is None:
            return unet
        pipe = self.load_pipeline(ref, unet, dtype)
        if torch.device(device).type != "cpu":
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def parameters(self, runnable: Any) -> dict[str, torch.Tensor]:
        unet = runnable if isinstance(runnable, torch.nn.Module) else runnable.unet  # a UNet, or a pipeline
        return dict(unet.state_dict(keep_vars=True))

    def empty_model(self, config_folder: Path) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_folder))

    # -- export ---------------------------------------------------------------------------------

    def export_pipeline(self, reference: TensorSource) -> str | None:
        """The pipeline to complete the saved UNet with, or None for a UNet folder."""
        if self.spec.export == "unet":
            return None
        ref = self.spec.pipeline
        if self.spec.export == "pipeline" and ref is None:
            ref = self.pipeline_ref(reference)
            if ref is None:
                raise EvomergeError("sdxl.export: pipeline needs sdxl.pipeline (what completes the UNet)")
        return ref

    def save_extras(self, reference: TensorSource, out_dir: Path, dtype: torch.dtype) -> None:
        ref = self.export_pipeline(reference)
        config = reference.folder / "config.json"
        if ref is None:
            shutil.copy2(config, out_dir / "config.json")
            return
        unet_dir = out_dir / "unet"
        unet_dir.mkdir()
        for p in list(out_dir.iterdir()):
            if p.is_file() and p.name.startswith(self.weights_stem):
                p.rename(unet_dir / p.name)
        shutil.copy2(config, unet_dir / "config.json")
        pipe = self.load_pipeline(ref, None, dtype)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        index_path = out_dir / "model_index.json"
        index = json.loads(index_path.read_text())
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
