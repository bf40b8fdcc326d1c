"""The adapter protocol: how a modality's checkpoints become named, grouped tensors and back.

An adapter is the only code that knows a modality's parameter names. It

- opens a checkpoint (Hub id or local folder) as a :class:`TensorSource`: a lazily read view whose
  names are the *canonical* names, i.e. the ``state_dict`` names of the runnable model the
  adapter builds (format differences such as LLaVA's legacy prefixes are hidden here);
- names a group for every tensor (``layers.12``, ``IN04``...), the unit of per-group values;
- builds the runnable model once, whose parameters the engine then rewrites in place;
- saves a merged model in the modality's native format.

:class:`Adapter` is the whole contract: every hook the engine and the pipelines call, with a
default where most modalities have nothing to do, so callers never probe an adapter. The
reference model (whose names and files the output takes) is chosen by :func:`pick_reference`
alone, for merge, plan and DFS alike.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch

from evomerge.checkpoint import (
    PICKLE_SUFFIXES,
    TensorEntry,
    index_safetensors,
    inside_folder,
    load_pickle_state_dict,
    read_tensor,
)
from evomerge.errors import EvomergeError, describe
from evomerge.hub import not_cached, use_cache_if_offline
from evomerge.strict_io import read_json

if TYPE_CHECKING:
    from evomerge.recipe import Recipe

# Files worth fetching from the Hub for a model folder (weights come as safetensors).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


def local_or_hub(ref: str, download: Callable[[str], Path]) -> Path:
    """``ref`` as a local path when it exists, else ``download(ref)`` for a Hub id, with one-line
    errors for a missing folder or a failed download."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise EvomergeError(f"model {ref!r}: no such folder, and not a Hub id (owner/name)")
    reason = use_cache_if_offline()
    try:
        return Path(download(ref))
    except EvomergeError:
        raise
    except Exception as e:  # network, auth, missing repo: all the same to the user
        if reason:
            raise not_cached(f"model {ref!r}", reason) from None
        raise EvomergeError(f"model {ref!r}: could not fetch from the Hub ({describe(e)}); "
                            "check the id, your network and HF_TOKEN, or pass a local folder") from None


def resolve_folder(ref: str, *, subfolder: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder for a Hub id or a path. Hub downloads fetch safetensors only unless
    pickle checkpoints are allowed."""

    def download(repo: str) -> Path:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
        if subfolder:
            patterns = [f"{subfolder}/{p}" for p in patterns] + ["model_index.json"]
        return Path(snapshot_download(repo, allow_patterns=patterns))

    root = local_or_hub(ref, download)
    return root / subfolder if subfolder and (root / subfolder).is_dir() else root


def config_folder(ref: str, subfolder: str | None) -> Path:
    """A folder holding config.json for a local path or Hub id (fetches config.json only)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path / subfolder if subfolder and (path / subfolder).is_dir() else path
    reason = use_cache_if_offline()
    try:
        from huggingface_hub import hf_hub_download

        name = f"{subfolder}/config.json" if subfolder else "config.json"
        return Path(hf_hub_download(ref, name)).parent
    except Exception as e:
        if reason:
            raise not_cached(f"model {ref!r}", reason) from None
        raise EvomergeError(f"model {ref!r}: cannot read its config ({describe(e)})") from None


@dataclass
class ConfigOnly:
    """A recipe's model before it is opened: its label, and its config.json fetched on first
    use (a VLM recipe reads configs until it finds the LLaVA model)."""

    label: str
    ref: str
    subfolder: str | None

    @cached_property
    def folder(self) -> Path:
        return config_folder(self.ref, self.subfolder)

    @cached_property
    def config(self) -> dict:
        return read_json(self.folder / "config.json", "config.json")


@dataclass
class TensorSource:
    """One checkpoint, read lazily, under canonical names.

    ``entries`` maps canonical name -> location on disk; ``loaded`` holds tensors that had to be
    read eagerly (pickle checkpoints, single-file conversions).
    """

    label: str
    folder: Path
    entries: dict[str, TensorEntry] = field(default_factory=dict)
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.entries) + [n for n in self.loaded if n not in self.entries]

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.loaded

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.entries:
            return self.entries[name].shape
        return tuple(self.loaded[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype if name in self.entries else self.loaded[name].dtype

    @classmethod
    def from_headers(cls, label: str, folder: Path, stem: str, config: dict) -> TensorSource:
        """A model folder as far as its safetensors headers tell, nothing read (no tensors when
        its weights are elsewhere: a Hub model whose config alone was fetched, pickles)."""
        return cls(label, folder, index_safetensors(folder, stem) if folder.is_dir() else {}, {}, config)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, in ``dtype`` when given."""
        if name in self.loaded:
            t = self.loaded[name]
        elif name in self.entries:
            t = read_tensor(self.entries[name])
        else:
            raise EvomergeError(f"model {self.label}: tensor {name} is missing; is it the same architecture as the others?")
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


def open_checkpoint(label: str, folder: Path, stem: str, rename: Callable[[str], str | None],
                    *, allow_pickle: bool) -> TensorSource:
    """Index a folder's ``stem`` checkpoint under canonical names (``rename`` returns None to drop)."""
    if not folder.is_dir():
        raise EvomergeError(f"model {label}: {folder} is not a folder")
    for p in folder.iterdir():  # any file here may be read or copied into the output
        if p.is_symlink():
            inside_folder(folder, p)
    config_path = folder / "config.json"
    config = read_json(config_path, "config.json") if config_path.exists() else {}
    raw = index_safetensors(folder, stem)
    loaded: dict[str, torch.Tensor] = {}
    if not raw:
        pickles = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise EvomergeError(f"model {label}: no {stem}*.safetensors in {folder}")
        if not allow_pickle:
            raise EvomergeError(
                f"model {label}: only pickle checkpoints ({pickles[0].name}) found; pickles can run "
                "code when loaded. Convert to safetensors, or pass --allow-pickle if you trust them")
        for p in pickles:
            loaded.update(load_pickle_state_dict(inside_folder(folder, p)))
    entries = {new: e for name, e in raw.items() if (new := rename(name)) is not None}
    loaded = {new: t for name, t in loaded.items() if (new := rename(name)) is not None}
    return TensorSource(label, folder, entries, loaded, config)


LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class Described(Protocol):
    """A model as the choice of reference sees it: its label and its config.json."""

    label: str
    config: dict


D = TypeVar("D", bound=Described)


class Adapter(ABC):
    """Every hook the merge engine and the pipelines call on a modality.

    Abstract methods are what each modality must say; the others are defaults for a modality
    that has nothing to do there (no vocabulary rows, no LoRA to re-add, no sampling settings).
    """

    modality: ClassVar[str]
    weights_stem: ClassVar[str]  # file stem of the native checkpoint ("model", "diffusion_pytorch_model")
    library: ClassVar[str] = "transformers"  # the library that loads an output (model card)
    config_subfolder: ClassVar[str | None] = None  # where config.json sits in a model folder (SDXL: unet)

    # -- sources and groups ---------------------------------------------------------------------

    @abstractmethod
    def open(self, ref: str, label: str, *, allow_pickle: bool = False) -> TensorSource:
        """Open a checkpoint (Hub id or path) under canonical names."""

    @abstractmethod
    def group(self, name: str) -> str:
        """The group a tensor belongs to (the unit of per-group merge values)."""

    @abstractmethod
    def groups(self, names: list[str]) -> list[str]:
        """All groups of a model, in model order."""

    @abstractmethod
    def layer_fraction(self, name: str, reference: TensorSource) -> float:
        """Where the tensor sits in depth, 0..1 (for mergekit-style value gradients)."""

    def merge_role(self, name: str, reference: TensorSource) -> str:
        """``merge`` (merged across sources), ``keep`` (taken from the reference as is), or
        ``skip`` (not a tensor of the output: a head tied to the embedding it shares storage with)."""
        return "merge"

    def is_vocab(self, name: str) -> bool:
        """Whether the tensor has one row per token (sources may differ in rows: the shared rows merge)."""
        return False

    def default_reference(self, candidates: Sequence[D]) -> D:
        """The reference when the recipe names none; ``candidates`` are the base (if any), then
        the sources, in recipe order."""
        return candidates[0]

    # -- the runnable ---------------------------------------------------------------------------

    @abstractmethod
    def build(self, reference: TensorSource, dtype: torch.dtype, device: str) -> Any:
        """The runnable model, built once, holding the reference's weights."""

    @abstractmethod
    def parameters(self, runnable: Any) -> dict[str, torch.Tensor]:
        """Canonical name -> the live tensor inside the runnable (written in place each trial)."""

    @abstractmethod
    def empty_model(self, config_folder: Path) -> torch.nn.Module:
        """The model a config describes, on the meta device (names and shapes, no memory)."""

    def after_merge(self, params: dict[str, torch.Tensor]) -> None:
        """Touch the runnable's tensors after every in-place rewrite (e.g. re-add a LoRA)."""
        return None

    def evaluator_settings(self) -> dict[str, Any]:
        """Data the modality hands its evaluator (SDXL: the pipeline's sampling arguments)."""
        return {}

    # -- export ---------------------------------------------------------------------------------

    def finish_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """An exported tensor as it is written (e.g. with a LoRA fused in); the input is left alone."""
        return tensor

    @abstractmethod
    def save_extras(self, reference: TensorSource, out_dir: Path, dtype: torch.dtype) -> None:
        """Write everything but the weights: config, tokenizer/processor files."""


def pick_reference(adapter: Adapter, wanted: str | None, candidates: Sequence[D]) -> D:
    """The model whose names, shapes and files the output takes: the one labelled ``wanted`` (a
    recipe's ``reference:``), else the adapter's default. Merge, plan and DFS all call this."""
    if wanted:
        for c in candidates:
            if c.label == wanted:
                return c
        raise EvomergeError(f"reference: no model labelled {wanted!r} (labels: {[c.label for c in candidates]})")
    return adapter.default_reference(candidates)


def reference_config(adapter: Adapter, recipe: Recipe) -> ConfigOnly:
    """Which of a recipe's models is the reference, from configs alone (nothing else fetched):
    what plan, a DFS plan and a recipe export use where merge has the models open."""
    sub = adapter.config_subfolder
    candidates = ([ConfigOnly("base", recipe.base, sub)] if recipe.base else []) + [
        ConfigOnly(m.label, m.model, sub) for m in recipe.models]
    return pick_reference(adapter, recipe.reference, candidates)
