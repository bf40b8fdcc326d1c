"""The DFS path model: A's causal LM running a path through A's and B's resident layers, and
its export as a stock checkpoint (the search space and the folding math: ``merging/dfs.py``).

Evaluation (:class:`PathModel`) runs A's model object with its decoder layer list replaced by the
path: shallow copies of the resident layers (parameters shared, nothing copied) whose attention
modules carry their own ``layer_idx`` (the path position), so a repeated layer gets its own KV-cache
entry. Where the export folds the scales, the copies compute the folded form too (hooks divide
o_proj/down_proj outputs by P_k), so the model scored is the model exported, eps included;
elsewhere the scale is a forward pre-hook on the copy's input, as the paper writes it.

Export (:func:`write_path_layers`) writes the path with ``num_hidden_layers`` = path length, the
scales folded where ``merging/dfs.py`` says that is exact, else unscaled with ``dfs_scales.json``
and the documented ``dfs_scaling.py`` that re-applies them after a stock load.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from torch import nn

from evomerge.checkpoint import PlannedTensor, ShardedSafetensorsWriter
from evomerge.errors import EvomergeError
from evomerge.merging.dfs import DFSSpace, LayerPath, cumulative_scales, fold_problem, fold_tensor
from evomerge.modalities.causal_lm import copy_model_files
from evomerge.progress import progress_bar

# Config keys two models must share for B's layers to run inside A's model.
SAME_CONFIG = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
               "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias")


def check_same_family(config_a: dict, config_b: dict) -> None:
    for key in SAME_CONFIG:
        va, vb = config_a.get(key), config_b.get(key)
        if va != vb and not (va is None or vb is None):
            raise EvomergeError(f"dfs: models A and B differ in {key} ({va!r} vs {vb!r}); "
                                "DFS runs B's layers inside A: use two models of one family")
    if config_a.get("model_type") != config_b.get("model_type"):
        raise EvomergeError(f"dfs: model A is {config_a.get('model_type')!r}, B {config_b.get('model_type')!r}")


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def reindexed(module: nn.Module, index: int) -> nn.Module:
    """A copy of ``module`` sharing its parameters and buffers whose submodules carry
    ``layer_idx = index`` (the KV-cache slot). Only module objects are copied, no tensors."""
    clone = copy.copy(module)
    clone.__dict__["_modules"] = {k: None if m is None else reindexed(m, index) for k, m in module._modules.items()}
    for attr in _HOOK_DICTS:  # own hook tables: a hook on one slot must not fire on another
        if attr in module.__dict__:
            clone.__dict__[attr] = OrderedDict(module.__dict__[attr])
    if "layer_idx" in clone.__dict__:
        clone.__dict__["layer_idx"] = index
    return clone


def _scale_input(scale: float, module: nn.Module, args: tuple, kwargs: dict):
    # The decoder layer's hidden state comes first (positional) or as hidden_states=.
    if args:
        return (args[0] * scale, *args[1:]), kwargs
    kwargs["hidden_states"] = kwargs["hidden_states"] * scale
    return args, kwargs


def _scale_output(scale: float, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * scale


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding ``layers`` (``model.model`` for Llama-style causal LMs)."""
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise EvomergeError(f"dfs: {type(model).__name__} has no model.layers; DFS needs a "
                            "Llama-style decoder (Llama, Mistral, Qwen...)")
    return inner


class PathModel:
    """A's causal LM whose layer list is swapped for a path through A's and B's resident layers."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, space: DFSSpace, fold: str = "auto"):
        self.model, self.model_b, self.space, self.fold = model_a, model_b, space, fold
        self.decoder = decoder_of(model_a)
        self.layers: list[nn.Module] = list(self.decoder.layers) + list(decoder_of(model_b).layers)
        config = model_a.config
        types_b = getattr(model_b.config, "layer_types", None)
        types_a = getattr(config, "layer_types", None)
        self.layer_types = (list(types_a) + list(types_b)) if types_a and types_b else None
        self.path: LayerPath | None = None

    @property
    def layer_tensors(self) -> list[str]:
        """The parameter names of one decoder layer (what folding needs to know)."""
        return [n for n, _ in self.layers[0].named_parameters()]

    def folds(self, path: LayerPath) -> bool:
        """Whether the export of ``path`` folds its scales (and so the evaluation does too)."""
        problem = fold_problem(getattr(self.model.config, "model_type", None), path, self.layer_tensors)
        return problem is None and self.fold != "never"

    def set_path(self, path: LayerPath) -> nn.Module:
        slots = []
        folding = self.folds(path)
        for k, (src, scale, total) in enumerate(zip(path.layers, path.scales, cumulative_scales(path),
                                                    strict=True)):
            layer = reindexed(self.layers[src], k)
            if folding and total != 1.0:
                for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    proj.register_forward_hook(partial(_scale_output, 1.0 / total))
            elif not folding and scale != 1.0:
                layer.register_forward_pre_hook(partial(_scale_input, scale), with_kwargs=True)
            slots.append(layer)
        self.decoder.layers = nn.ModuleList(slots)
        for m in (self.model, self.decoder):  # output capture hooks go on the new slots when asked
            m.__dict__.pop("_output_capturing_hooks_installed", None)
        config = self.model.config  # the model, its decoder and attention share this object
        config.num_hidden_layers = len(slots)
        if self.layer_types is not None:
            config.layer_types = [self.layer_types[i] for i in path.layers]
        self.path = path
        return self.model


SCALING_MODULE = '''"""Re-apply the DFS hand-over scales of this checkpoint after a stock load.

This model's layers were written unscaled because its architecture does not allow folding the
scales into its weights exactly. Each entry of dfs_scales.json's ``input_scales`` multiplies the
hidden state entering that decoder layer (1.0: unchanged)::

    from transformers import AutoModelForCausalLM
    from dfs_scaling import apply_dfs_scales
    model = apply_dfs_scales(AutoModelForCausalLM.from_pretrained(folder), folder)
"""

import json
from pathlib import Path


def apply_dfs_scales(model, folder):
    scales = json.loads((Path(folder) / "dfs_scales.json").read_text())["input_scales"]
    layers = model.model.layers
    if len(layers) != len(scales):
        raise ValueError(f"{len(layers)} layers but {len(scales)} scales")
    for layer, s in zip(layers, scales):
        if s != 1.0:
            def scale(module, args, kwargs, s=s):
                if args:
                    return (args[0] * s, *args[1:]), kwargs
                kwargs["hidden_states"] = kwargs["hidden_states"] * s
                return args, kwargs
            layer.register_forward_pre_hook(scale, with_kwargs=True)
    return model
'''


def write_path_layers(paths: PathModel, path: LayerPath, folder_a: Path, dest: Path, *,
                      fold: str = "auto", show_progress: bool = True) -> None:
    """Write ``path`` into the (empty) folder ``dest`` as a stock checkpoint of A's architecture
    with len(path) layers: weights, config, tokenizer files and, where the scales cannot be
    folded, dfs_scales.json with dfs_scaling.py. The caller writes the card and commits ``dest``."""
    model = paths.model
    config = model.config
    problem = fold_problem(getattr(config, "model_type", None), path, paths.layer_tensors)
    if problem and fold == "always":
        raise EvomergeError(f"dfs export: cannot fold the scales exactly: {problem} (set dfs.fold: auto "
                            "to save them in dfs_scales.json with dfs_scaling.py instead)")
    folding = problem is None and fold != "never"
    layers_prefix = next(n for n, m in model.named_modules() if m is paths.decoder) + ".layers"
    # A's non-layer tensors (embeddings, final norm, head); a tied head is stored once, as stock does.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    rest = {n: t for n, t in model.state_dict().items()
            if not n.startswith(layers_prefix + ".") and not (tied and n == "lm_head.weight")}
    by_src = {i: dict(paths.layers[i].state_dict()) for i in set(path.layers)}
    planned = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in rest.items()]
    for k, src in enumerate(path.layers):
        planned += [PlannedTensor(f"{layers_prefix}.{k}.{n}", tuple(t.shape), t.dtype) for n, t in by_src[src].items()]
    totals = cumulative_scales(path)
    writer = ShardedSafetensorsWriter(dest, planned, stem="model")
    for n, t in rest.items():
        writer.write(n, t.detach())
    with progress_bar("writing path", total=len(path), enabled=show_progress) as advance:
        for k, src in enumerate(path.layers):
            advance(f"layer {k}")
            for n, t in by_src[src].items():
                t = t.detach()
                writer.write(f"{layers_prefix}.{k}.{n}", fold_tensor(n, t, totals[k]) if folding else t)
    writer.close()
    dtype = next(iter(rest.values())).dtype
    copy_model_files(folder_a, dest, dtype)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["num_hidden_layers"] = len(path)
    if paths.layer_types is not None:
        cfg["layer_types"] = [paths.layer_types[i] for i in path.layers]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if not folding and any(s != 1.0 for s in path.scales):
        (dest / "dfs_scales.json").write_text(json.dumps({"input_scales": list(path.scales)}, indent=2) + "\n")
        (dest / "dfs_scaling.py").write_text(SCALING_MODULE)
