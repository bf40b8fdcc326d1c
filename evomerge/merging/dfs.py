"""Data-flow-space (DFS) merging: evolve the path a token's hidden state takes through the layers
of two models A and B, with a learned scale at each hand-over (Akiba et al. 2024, section 3.2).

The search space (:class:`DFSSpace`)::

    layers    a00 .. a{La-1}, b00 .. b{Lb-1}            M = La + Lb, in this order
    slots     T = M x r: that sequence repeated r times; slot t holds layer t mod M
    slot.017  indicator of slot 17: the layer runs when the value is > 0
    scale.*   the scale W applied to the hidden state handed from layer i to layer j when the
              hand-over is not natural (j is not the layer right after i in the same model):
              per_target  ``scale.b03``        one scale per target layer (M values, default)
              full        ``scale.a12.b03``    the paper's W, every non-natural pair (about M*M)
              none        no scales (the paper's ablation: more than 20% worse)

The path is A's first layer, the kept slots in order, then A's last layer (both fixed, as the
paper). A's embeddings, final norm, head and tokenizer are used.

Initial point. Optuna's CMA-ES starts at the box centre with sigma 1/6 of each range, and enqueued
trials whose values are all fixed do not feed its update. So instead of enqueuing the initial path,
the indicator *bounds* are shifted so that the box centre is that path: slots of A's layers 1..La-2
in the first repetition get ``[-1 + m, 1 + m]`` (centre +m, kept), all others ``[-1 - m, 1 - m]``
(centre -m, dropped), with m = ``indicator_margin`` (0.5: a slot flips in about 7% of samples).
The slots of A's first and last layers start dropped because those layers are already fixed at the
ends, so the mean path is A itself. Scale bounds default to [0.5, 1.5]: centre 1, no scaling.

Evaluation (:class:`PathModel`) runs A's model object with its decoder layer list replaced by the
path: shallow copies of the resident layers (parameters shared, nothing copied) whose attention
modules carry their own ``layer_idx`` (the path position), so a repeated layer gets its own KV-cache
entry. Where the export folds the scales (below), the copies compute the folded form too (hooks
divide o_proj/down_proj outputs by P_k), so the model scored is the model exported, eps included;
elsewhere the scale is a forward pre-hook on the copy's input, as the paper writes it.

Export (:func:`write_path_model`) materialises the path as a stock checkpoint with
``num_hidden_layers`` = path length. For pre-norm RMSNorm decoders (Llama, Mistral, Qwen2/3) the
scales are folded away: write P_k for the product of the input scales up to position k and let
the exported residual stream be z_k = x_k / P_k. Then the exported layer k must compute
f_k(P_k z) / P_k = z + a_k(P_k z) / P_k + ..., and since RMSNorm(P z) = RMSNorm(z) for P > 0 (up to
eps), that is the stock layer with o_proj and down_proj (weights and biases) divided by P_k. The
hand-over z_{k+1} = s_{k+1} y_k / P_{k+1} = y_k / P_k needs nothing, and the final norm hides the
last P. The only inexact term is eps: a norm at position k sees ms(x)/P_k^2 + eps instead of
(ms(x) + eps)/P_k^2, a relative error of about eps * |1 - P_k^2| / (2 ms(x_k)): nil for A's first
layers (P = 1) and negligible where the residual stream is large. Architectures outside that set
(post-norms, MoE, LayerNorm) and negative scales cannot be folded: with ``fold: auto`` the layers
are written unscaled with ``dfs_scales.json`` and the documented ``dfs_scaling.py`` that re-applies
them after a stock load; ``fold: always`` raises instead.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from evomerge import __version__
from evomerge.errors import EvomergeError, describe
from evomerge.recipe import DFSSpec, PSRef, Recipe

# Families whose decoder layer is  x + o_proj(attn(RMSNorm(x))), then + down_proj(mlp(RMSNorm(.))):
# the only tensors writing to the residual stream are o_proj and down_proj, so folding is exact.
FOLDABLE = {"llama", "mistral", "qwen2", "qwen3"}
FOLD_TENSORS = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
# Config keys two models must share for B's layers to run inside A's model.
SAME_CONFIG = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
               "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias")


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerPath:
    """A decoded candidate: source layer of each position (0..M-1, A's then B's) and the scale
    applied to the hidden state entering it (1.0 where the hand-over is natural)."""

    layers: tuple[int, ...]
    scales: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.layers)


class DFSSpace:
    """The searched values of a DFS merge and how a set of them decodes into a :class:`LayerPath`."""

    def __init__(self, n_a: int, n_b: int, repeats: int = 3, scales: str = "per_target",
                 scale_bounds: tuple[float, float] = (0.5, 1.5), margin: float = 0.5):
        if n_a < 2 or n_b < 1:
            raise EvomergeError(f"dfs: model A needs at least 2 layers and B at least 1 (got {n_a}, {n_b})")
        self.n_a, self.n_b, self.repeats = n_a, n_b, repeats
        self.mode, self.scale_bounds, self.margin = scales, tuple(scale_bounds), margin
        self.n_layers = n_a + n_b
        self.n_slots = self.n_layers * repeats
        width = max(2, len(str(max(n_a, n_b) - 1)))
        self.layer_names = [f"a{i:0{width}d}" for i in range(n_a)] + [f"b{i:0{width}d}" for i in range(n_b)]
        sw = max(3, len(str(self.n_slots - 1)))
        self.slot_names = [f"slot.{t:0{sw}d}" for t in range(self.n_slots)]
        self.initial_slots = set(range(1, n_a - 1))  # A's inner layers, first repetition
        if scales == "per_target":
            scale_names = [f"scale.{n}" for n in self.layer_names]
        elif scales == "full":
            scale_names = [f"scale.{self.layer_names[i]}.{self.layer_names[j]}"
                           for i in range(self.n_layers) for j in range(self.n_layers) if not self.natural(i, j)]
        elif scales == "none":
            scale_names = []
        else:
            raise EvomergeError(f"dfs.scales: {scales!r}; use per_target, full or none")
        self.scale_names = scale_names
        self.names = self.slot_names + scale_names
        self._index = {n: i for i, n in enumerate(self.layer_names)}

    def natural(self, i: int, j: int) -> bool:
        """Whether layer j is the one right after layer i in the same model (no scale there)."""
        return j == i + 1 and (j < self.n_a) == (i < self.n_a)

    def bounds(self, name: str) -> tuple[float, float]:
        if name.startswith("slot."):
            m = self.margin if int(name[5:]) in self.initial_slots else -self.margin
            return (-1.0 + m, 1.0 + m)
        return self.scale_bounds

    def __len__(self) -> int:
        return len(self.names)

    def initial(self) -> dict[str, float]:
        """The box centre: where CMA-ES starts (A's path, scales 1 with the default bounds)."""
        return {n: sum(self.bounds(n)) / 2 for n in self.names}

    def layer_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise EvomergeError(f"dfs: no layer {name!r} (layers are {self.layer_names[0]}.."
                                f"{self.layer_names[-1]})") from None

    def scale(self, values: dict[str, float], i: int, j: int) -> float:
        if self.natural(i, j) or self.mode == "none":
            return 1.0
        if self.mode == "per_target":
            return float(values[f"scale.{self.layer_names[j]}"])
        return float(values[f"scale.{self.layer_names[i]}.{self.layer_names[j]}"])

    def decode(self, values: dict[str, float]) -> LayerPath:
        missing = next((n for n in self.names if n not in values), None)
        if missing is not None:
            raise EvomergeError(f"dfs: no value for {missing!r}")
        layers = [0] + [t % self.n_layers for t, n in enumerate(self.slot_names) if values[n] > 0] + [self.n_a - 1]
        return self.path(layers, values)

    def path(self, layers: list[int], values: dict[str, float] | None = None,
             scales: list[float] | None = None) -> LayerPath:
        """A path over ``layers``, with scales from ``values``, given outright, or all 1."""
        if scales is None and values is None:
            scales = [1.0] * len(layers)
        elif scales is None:
            scales = [1.0] + [self.scale(values or {}, i, j) for i, j in zip(layers, layers[1:], strict=False)]
        if len(scales) != len(layers):
            raise EvomergeError(f"dfs: {len(layers)} layers but {len(scales)} scales")
        return LayerPath(tuple(layers), tuple(float(s) for s in scales))

    def describe(self, path: LayerPath) -> list[str]:
        return [self.layer_names[i] for i in path.layers]


# --------------------------------------------------------------------------------------------
# The path model: resident layers, shared parameters, own cache indices
# --------------------------------------------------------------------------------------------

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

    def folds(self, path: LayerPath) -> bool:
        """Whether the export of ``path`` folds its scales (and so the evaluation does too)."""
        problem = fold_problem(getattr(self.model.config, "model_type", None), path, self.layers[0])
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


# --------------------------------------------------------------------------------------------
# Export: a stock checkpoint with the scales folded in
# --------------------------------------------------------------------------------------------

def cumulative_scales(path: LayerPath) -> list[float]:
    """P_k: the product of the input scales up to and including position k."""
    out, p = [], 1.0
    for s in path.scales:
        p *= s
        out.append(p)
    return out


def fold_problem(model_type: str | None, path: LayerPath, layer: nn.Module) -> str | None:
    """Why the path's scales cannot be folded exactly into this architecture (None: they can)."""
    if all(s == 1.0 for s in path.scales):
        return None
    if model_type not in FOLDABLE:
        return (f"model_type {model_type!r} is not a known pre-norm RMSNorm decoder whose only writes "
                f"to the residual stream are o_proj and down_proj ({', '.join(sorted(FOLDABLE))})")
    names = dict(layer.named_parameters())
    if "self_attn.o_proj.weight" not in names or "mlp.down_proj.weight" not in names:
        return "the decoder layer has no self_attn.o_proj / mlp.down_proj"
    if any(s <= 0 for s in path.scales):
        return "a scale is <= 0 and RMSNorm is only invariant to positive scaling"
    return None


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


def write_path_model(paths: PathModel, path: LayerPath, folder_a: Path, out_dir: Path, *,
                     fold: str = "auto", card: str = "", force: bool = True,
                     show_progress: bool = True) -> Path:
    """Write ``path`` as a stock checkpoint of A's architecture with len(path) layers."""
    from evomerge.checkpoint import PlannedTensor, ShardedSafetensorsWriter
    from evomerge.modalities.causal_lm import copy_model_files
    from evomerge.pipelines.merge import commit_output, prepare_output
    from evomerge.progress import progress_bar

    model = paths.model
    config = model.config
    problem = fold_problem(getattr(config, "model_type", None), path, paths.layers[0])
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
    tmp = prepare_output(Path(out_dir), force)
    try:
        writer = ShardedSafetensorsWriter(tmp, planned, stem="model")
        for n, t in rest.items():
            writer.write(n, t.detach())
        with progress_bar("writing path", total=len(path), enabled=show_progress) as advance:
            for k, src in enumerate(path.layers):
                advance(f"layer {k}")
                for n, t in by_src[src].items():
                    t = t.detach()
                    if folding and totals[k] != 1.0 and n in FOLD_TENSORS:
                        t = (t.float() / totals[k]).to(t.dtype)
                    writer.write(f"{layers_prefix}.{k}.{n}", t)
        writer.close()
        dtype = next(iter(rest.values())).dtype
        copy_model_files(folder_a, tmp, dtype)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["num_hidden_layers"] = len(path)
        if paths.layer_types is not None:
            cfg["layer_types"] = [paths.layer_types[i] for i in path.layers]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if not folding and any(s != 1.0 for s in path.scales):
            (tmp / "dfs_scales.json").write_text(json.dumps({"input_scales": list(path.scales)}, indent=2) + "\n")
            (tmp / "dfs_scaling.py").write_text(SCALING_MODULE)
        (tmp / "README.md").write_text(card)
        commit_output(tmp, Path(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def path_card(recipe: Recipe, space: DFSSpace, path: LayerPath, values: dict[str, float],
              sources: dict[str, str], *, folded: bool, extra: str = "") -> str:
    names = space.describe(path)
    totals = cumulative_scales(path)
    front = {"base_model": list(sources.values()), "library_name": "transformers",
             "tags": ["merge", "evomerge", "dfs"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {recipe.name}", "",
             f"Data-flow-space merge made with [evomerge](https://github.com/evomerge/evomerge) {__version__}: "
             f"{len(path)} layers taken from two models; A's embeddings, final norm, head and tokenizer.",
             "", "## Sources", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in sources.items()]
    lines += ["", "## Path", "", "| position | layer | input scale | cumulative |", "|---|---|---|---|"]
    lines += [f"| {k} | `{n}` | {s:.6g} | {p:.6g} |" for k, (n, s, p) in enumerate(zip(names, path.scales, totals, strict=True))]
    if folded:
        lines += ["", "The scales are folded into the weights: position k's o_proj and down_proj are divided "
                  "by its cumulative scale, so this loads and runs with stock transformers. The fold is exact "
                  "up to the RMSNorm epsilon."]
    elif any(s != 1.0 for s in path.scales):
        lines += ["", "**The scales are NOT folded** (this architecture does not allow it exactly): the layers "
                  "are stored unscaled; apply `dfs_scales.json` with `dfs_scaling.py` after loading."]
    searched = {k: v for k, v in values.items() if k.startswith("scale.")}
    if searched:
        lines += ["", "## Searched scales", "", "| value | chosen |", "|---|---|"]
        lines += [f"| `{k}` | {v:.6g} |" for k, v in searched.items()]
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False,
                                 allow_unicode=True)
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```"]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Models: plain folders, or the exported best of a PS study (PS+DFS)
# --------------------------------------------------------------------------------------------

def resolve_model(ref: str | PSRef, *, device: str = "cpu", allow_pickle: bool = False,
                  trust_remote_code: bool = False, console: Any = None) -> Path:
    """A local model folder for a DFS model reference, running or exporting a PS study if needed.

    ``{ps_run: DIR}``: DIR/best, exported from DIR's best values when missing.
    ``{ps_recipe: PATH}``: that recipe's run (``run_dir`` or runs/<name>) is evolved, resuming,
    with --export-best when it has no export yet.
    """
    from evomerge.modalities.base import resolve_folder

    if isinstance(ref, str):
        return resolve_folder(ref, allow_pickle=allow_pickle)
    kwargs = dict(device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if ref.ps_run is not None:
        run = Path(ref.ps_run)
        best = run / "best"
        if (best / "config.json").exists():
            return best
        if not (run / "best.json").exists():
            raise EvomergeError(f"dfs: PS run {run} has no best.json; evolve it first (or give "
                                "{ps_recipe: ...} to have it evolved)")
        from evomerge.pipelines.evolve import best_values
        from evomerge.pipelines.merge import merge_to_folder, open_session
        from evomerge.recipe import load_recipe

        session = open_session(load_recipe(run / "recipe.yaml"), **kwargs)
        return merge_to_folder(session, best, best_values(run), force=True, show_progress=False,
                               extra_card=f"## Evolution\n\nBest values of the PS run `{run}`.")
    from evomerge.pipelines.evolve import Evolution
    from evomerge.recipe import load_recipe

    ps_recipe = load_recipe(ref.ps_recipe)
    run = Path(ref.run_dir) if ref.run_dir else Path("runs") / ps_recipe.name
    if (run / "best" / "config.json").exists():
        return run / "best"
    if ps_recipe.dfs is not None:
        raise EvomergeError(f"dfs: {ref.ps_recipe} is itself a DFS recipe; chain a PS recipe")
    if console is not None:
        console.print(f"PS+DFS: evolving the PS study {ref.ps_recipe} in {run} first")
    Evolution(ref.ps_recipe, run_dir=run, console=console, **kwargs).run(export_best=True)
    return run / "best"


def check_same_family(config_a: dict, config_b: dict) -> None:
    for key in SAME_CONFIG:
        va, vb = config_a.get(key), config_b.get(key)
        if va != vb and not (va is None or vb is None):
            raise EvomergeError(f"dfs: models A and B differ in {key} ({va!r} vs {vb!r}); "
                                "DFS runs B's layers inside A: use two models of one family")
    if config_a.get("model_type") != config_b.get("model_type"):
        raise EvomergeError(f"dfs: model A is {config_a.get('model_type')!r}, B {config_b.get('model_type')!r}")


# --------------------------------------------------------------------------------------------
# Candidates for the evolve loop
# --------------------------------------------------------------------------------------------

def _config_dtype(cfg: dict) -> torch.dtype:
    """The dtype a model's config.json records (float32 when it records none)."""
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


class DFSCandidates:
    """Candidates are layer paths through A's and B's resident layers (same interface as
    :class:`evomerge.pipelines.candidates.ParameterSpaceCandidates`)."""

    def __init__(self, recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False,
                 trust_remote_code: bool = False, console: Any = None):
        from transformers import AutoModelForCausalLM

        from evomerge.merging.engine import parse_dtype

        spec: DFSSpec = recipe.dfs  # type: ignore[assignment]
        self.recipe, self.spec, self.device = recipe, spec, device
        opts = dict(device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, console=console)
        self.folder_a = resolve_model(spec.model_a, **opts)
        self.folder_b = resolve_model(spec.model_b, **opts)
        cfg_a, cfg_b = (json.loads((f / "config.json").read_text()) for f in (self.folder_a, self.folder_b))
        check_same_family(cfg_a, cfg_b)
        self.dtype = parse_dtype(recipe.dtype) if recipe.dtype else _config_dtype(cfg_a)

        def load(folder: Path) -> nn.Module:
            try:  # safetensors only, unless the user allowed pickle checkpoints
                m = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=None if allow_pickle else True)
            except OSError as e:
                raise EvomergeError(f"dfs: model {folder}: cannot load ({describe(e)}); convert pickle "
                                    "checkpoints to safetensors, or pass --allow-pickle if you trust them") from None
            return m.to(device).eval()

        model_a, model_b = load(self.folder_a), load(self.folder_b)
        self.space = DFSSpace(len(decoder_of(model_a).layers), len(decoder_of(model_b).layers),
                              spec.repeats, spec.scales, spec.scale_bounds, spec.indicator_margin)
        self.paths = PathModel(model_a, model_b, self.space, fold=spec.fold)
        self.tokenizer_source: Path = self.folder_a
        self.paths.set_path(self.space.path(list(range(self.space.n_a))))

    def runnable(self) -> nn.Module:
        return self.paths.model

    def apply(self, values: dict[str, float]) -> nn.Module:
        bad = next((k for k, v in values.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise FloatingPointError(f"dfs value {bad} is {values[bad]}")
        return self.paths.set_path(self.space.decode(values))

    def path_for(self, spec: dict) -> LayerPath:
        """The path a baseline spec names: ``source: a`` (A itself), ``values: {...}`` or
        ``layers: [a00, a01, b05, ...]`` with optional ``scales`` (e.g. a frankenmerge)."""
        if "values" in spec:
            return self.space.decode({**self.space.initial(), **spec["values"]})
        if "layers" in spec:
            return self.space.path([self.space.layer_index(n) for n in spec["layers"]], scales=spec.get("scales"))
        if spec.get("source") == "a":
            return self.space.path(list(range(self.space.n_a)))
        raise EvomergeError(f"dfs baseline {spec.get('name')!r}: give source: a|b, values: {{...}} or layers: [...]")

    def apply_baseline(self, spec: dict) -> nn.Module:
        if spec.get("source") == "b":
            return self.paths.model_b
        return self.paths.set_path(self.path_for(spec))

    def export(self, values: dict[str, float], out_dir: Path, *, extra_card: str = "",
               show_progress: bool = True, force: bool = True) -> Path:
        path = self.space.decode(values)
        folded = self.paths.folds(path)
        sources = {"a": _ref_label(self.spec.model_a, self.folder_a), "b": _ref_label(self.spec.model_b, self.folder_b)}
        card = path_card(self.recipe, self.space, path, values, sources, folded=folded, extra=extra_card)
        return write_path_model(self.paths, path, self.folder_a, Path(out_dir), fold=self.spec.fold,
                                card=card, force=force, show_progress=show_progress)


def _ref_label(ref: str | PSRef, folder: Path) -> str:
    return ref if isinstance(ref, str) else str(folder)


# --------------------------------------------------------------------------------------------
# Plan: what a DFS recipe costs, from configs alone
# --------------------------------------------------------------------------------------------

@dataclass
class DFSPlan:
    recipe: str
    modality: str
    method: str
    model_a: str
    model_b: str
    layers_a: int
    layers_b: int
    repeats: int
    slots: int
    scales: str
    searched_values: int
    indicator_values: int
    scale_values: int
    sampler: str
    popsize: int
    separable: bool
    trials: int
    generations: int
    dtype: str
    parameters_a: int
    initial_path_layers: int
    max_path_layers: int
    resident_models_gb: float  # A and B, loaded once; paths share their layers
    export_gb_per_layer: float
    export_gb_initial: float
    notes: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def ref_config_folder(ref: str | PSRef) -> Path:
    """A folder with config.json for a DFS model reference, without running anything: a PS
    reference reads its export if there is one, else its recipe's reference model."""
    from evomerge.pipelines.plan import config_folder
    from evomerge.recipe import load_recipe

    if isinstance(ref, str):
        return config_folder(ref, None)
    run = Path(ref.ps_run) if ref.ps_run else (Path(ref.run_dir) if ref.run_dir else None)
    if ref.ps_recipe is not None:
        ps = load_recipe(ref.ps_recipe)
        run = run or Path("runs") / ps.name
    else:
        if not (run / "recipe.yaml").exists() and not (run / "best" / "config.json").exists():
            raise EvomergeError(f"dfs: PS run {run} has no recipe.yaml")
        ps = None
    if (run / "best" / "config.json").exists():
        return run / "best"
    ps = ps or load_recipe(run / "recipe.yaml")
    if ps.dfs is not None or not ps.models:
        raise EvomergeError("dfs: a PS reference must name a parameter-space recipe or run")
    refs = {m.label: m.model for m in ps.models}
    return config_folder(refs.get(ps.reference or "", ps.base or ps.models[0].model), None)


def dfs_value_grid(params: dict[str, float], recipe: Recipe) -> tuple[list[str], list[str], list[list[float]]]:
    """The report's heatmap for a DFS trial: one row per repetition (indicator of each layer's
    slot, > 0 = kept), plus a row of per-target scales; columns are the layers."""
    spec: DFSSpec = recipe.dfs  # type: ignore[assignment]
    n_a, n_b = (int(json.loads((ref_config_folder(r) / "config.json").read_text())["num_hidden_layers"])
                for r in (spec.model_a, spec.model_b))
    space = DFSSpace(n_a, n_b, spec.repeats, spec.scales, spec.scale_bounds, spec.indicator_margin)
    m = space.n_layers
    rows = [f"repeat {i + 1}" for i in range(spec.repeats)]
    grid = [[params.get(space.slot_names[i * m + j], float("nan")) for j in range(m)] for i in range(spec.repeats)]
    if spec.scales == "per_target":
        rows.append("scale")
        grid.append([params.get(f"scale.{n}", float("nan")) for n in space.layer_names])
    return rows, space.layer_names, grid


def make_dfs_plan(recipe: Recipe) -> DFSPlan:
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.merging.engine import parse_dtype
    from evomerge.pipelines.evolve import default_popsize

    spec: DFSSpec = recipe.dfs  # type: ignore[assignment]
    folders = [ref_config_folder(spec.model_a), ref_config_folder(spec.model_b)]
    cfgs = [json.loads((f / "config.json").read_text()) for f in folders]
    check_same_family(*cfgs)
    n_a, n_b = (int(c["num_hidden_layers"]) for c in cfgs)
    space = DFSSpace(n_a, n_b, spec.repeats, spec.scales, spec.scale_bounds, spec.indicator_margin)
    config = AutoConfig.from_pretrained(folders[0])
    config.num_hidden_layers = 1
    with torch.device("meta"):
        one = AutoModelForCausalLM.from_config(config)
    per_layer = sum(p.numel() for p in decoder_of(one).layers[0].parameters())
    outside = sum(p.numel() for p in one.parameters()) - per_layer
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else getattr(
        torch, cfgs[0].get("dtype") or cfgs[0].get("torch_dtype") or "bfloat16")
    size = torch.empty((), dtype=dtype).element_size()
    gb = size / 2**30
    n = len(space)
    search = recipe.search
    popsize = search.popsize or (default_popsize(n) if search.sampler == "cmaes" else 1)
    notes = []
    if search.sampler == "cmaes" and n >= 300 and not search.separable:
        notes.append(f"{n} values: set search.separable: true (full CMA-ES keeps an {n}x{n} covariance)")
    if spec.scales == "full":
        notes.append("scales: full searches the paper's whole W; per_target (one per layer) is far smaller")
    for key, ref, folder in (("model_a", spec.model_a, folders[0]), ("model_b", spec.model_b, folders[1])):
        if isinstance(ref, PSRef) and folder.name != "best":  # not exported yet
            what = ref.ps_recipe or f"the recipe of {ref.ps_run}"
            notes.append(f"{key}: the PS study {what} runs (or is exported) first; plan it on its own")
    return DFSPlan(
        recipe=recipe.name, modality="causal_lm", method="dfs",
        model_a=str(folders[0]) if not isinstance(spec.model_a, str) else spec.model_a,
        model_b=str(folders[1]) if not isinstance(spec.model_b, str) else spec.model_b,
        layers_a=n_a, layers_b=n_b, repeats=spec.repeats, slots=space.n_slots, scales=spec.scales,
        searched_values=n, indicator_values=space.n_slots, scale_values=len(space.scale_names),
        sampler=search.sampler, popsize=popsize, separable=search.separable, trials=search.trials,
        generations=math.ceil(search.trials / popsize), dtype=str(dtype).removeprefix("torch."),
        parameters_a=outside + per_layer * n_a, initial_path_layers=n_a, max_path_layers=space.n_slots + 2,
        resident_models_gb=round((2 * outside + per_layer * (n_a + n_b)) * gb, 3),
        export_gb_per_layer=round(per_layer * gb, 3),
        export_gb_initial=round((outside + per_layer * n_a) * gb, 3),
        notes=notes)
