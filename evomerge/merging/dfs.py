"""Data-flow-space (DFS) merging, its math: the search space and the folding of the scales.

DFS evolves the path a token's hidden state takes through the layers of two models A and B, with
a learned scale at each hand-over (Akiba et al. 2024, section 3.2). The path model that runs a
path lives next to the causal-LM adapter (``modalities/dfs_path.py``); the candidates backend,
PS+DFS chaining, plan and report in ``pipelines/dfs.py`` and ``pipelines/dfs_plan.py``.

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

Folding. The export materialises the path as a stock checkpoint with ``num_hidden_layers`` =
path length. For pre-norm RMSNorm decoders (Llama, Mistral, Qwen2/3) the
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

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from evomerge.errors import EvomergeError

# Families whose decoder layer is  x + o_proj(attn(RMSNorm(x))), then + down_proj(mlp(RMSNorm(.))):
# the only tensors writing to the residual stream are o_proj and down_proj, so folding is exact.
FOLDABLE = {"llama", "mistral", "qwen2", "qwen3"}
FOLD_TENSORS = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


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


def cumulative_scales(path: LayerPath) -> list[float]:
    """P_k: the product of the input scales up to and including position k."""
    out, p = [], 1.0
    for s in path.scales:
        p *= s
        out.append(p)
    return out


def fold_problem(model_type: str | None, path: LayerPath, layer_tensors: Iterable[str]) -> str | None:
    """Why the path's scales cannot be folded exactly into this architecture (None: they can);
    ``layer_tensors``: the names of one decoder layer's parameters."""
    if all(s == 1.0 for s in path.scales):
        return None
    if model_type not in FOLDABLE:
        return (f"model_type {model_type!r} is not a known pre-norm RMSNorm decoder whose only writes "
                f"to the residual stream are o_proj and down_proj ({', '.join(sorted(FOLDABLE))})")
    names = set(layer_tensors)
    if "self_attn.o_proj.weight" not in names or "mlp.down_proj.weight" not in names:
        return "the decoder layer has no self_attn.o_proj / mlp.down_proj"
    if any(s <= 0 for s in path.scales):
        return "a scale is <= 0 and RMSNorm is only invariant to positive scaling"
    return None


def fold_tensor(name: str, tensor: torch.Tensor, total: float) -> torch.Tensor:
    """One layer tensor of the export with its position's cumulative scale ``total`` folded in:
    o_proj and down_proj (weights and biases) divided by it, every other tensor unchanged."""
    if total == 1.0 or name not in FOLD_TENSORS:
        return tensor
    return (tensor.float() / total).to(tensor.dtype)
