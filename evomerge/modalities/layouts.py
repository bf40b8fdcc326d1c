"""Tensor layouts of the causal-LM families evomerge merges, written as data.

A :class:`Layout` says where a family keeps its layers (``model.layers.{n}.``,
``transformer.h.{n}.``...), which tensors come before them (embeddings), which after them (final
norm, output head), which head may be tied to an embedding, and which tensors have one row per
token. Groups follow from it: ``embed``, ``layers.0`` ... ``layers.{n-1}``, ``head`` (final norm
and output head). The facts match mergekit's architecture files (``mergekit/_data/architectures``).

A model's layout is chosen by its config.json (``architectures``, then ``model_type``); a model
of another family is accepted when all its tensors fit one of these layouts, and refused
otherwise: a tensor that fits nowhere must never silently merge as one group. To support a new
family, add an entry to :data:`LAYOUTS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Layout:
    """One family's tensor names, as transformers' ``state_dict`` spells them."""

    family: str
    architectures: tuple[str, ...]  # config.json ``architectures`` entries of the family
    model_types: tuple[str, ...]  # config.json ``model_type``
    layers: str  # name prefix of layer n: ``{n}`` stands for the index
    embed: tuple[str, ...]  # tensors before the layers
    final_norm: tuple[str, ...]
    head: tuple[str, ...]  # output projection (absent when tied and saved by transformers)
    vocab: tuple[str, ...]  # tensors with one row per token
    tied: tuple[tuple[str, str], ...] = ()  # (head, embedding it is tied to)
    tied_by_default: bool = False  # when config.json has no tie_word_embeddings
    num_layers_key: str = "num_hidden_layers"
    omitted_prefix: str = ""  # some checkpoints (GPT-2's base model) store names without it
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = "^" + re.escape(self.layers).replace(re.escape("{n}"), r"(\d+)")
        object.__setattr__(self, "_layer_re", re.compile(pattern))

    # -- names ------------------------------------------------------------------------------

    def layer_index(self, name: str) -> int | None:
        m = self._layer_re.match(name)
        return int(m.group(1)) if m else None

    def layer_prefix(self, index: int) -> str:
        return self.layers.replace("{n}", str(index))

    def renumbered(self, name: str, index: int) -> str:
        """A layer tensor's name moved to layer ``index``."""
        return self._layer_re.sub(self.layer_prefix(index), name, count=1)

    def group(self, name: str) -> str | None:
        """``embed``, ``layers.N`` or ``head``; None for a tensor this layout does not have."""
        i = self.layer_index(name)
        if i is not None:
            return f"layers.{i}"
        if name in self.embed:
            return "embed"
        if name in self.final_norm or name in self.head:
            return "head"
        return None

    def canonical(self, name: str) -> str:
        """The name with the prefix some checkpoints omit put back (``wte.weight`` ->
        ``transformer.wte.weight``), as transformers reads them."""
        if self.omitted_prefix and self.group(name) is None and self.group(self.omitted_prefix + name):
            return self.omitted_prefix + name
        return name

    def first_unfit(self, names: Iterable[str]) -> str | None:
        return next((n for n in names if self.group(self.canonical(n)) is None), None)

    def same_names(self, other: Layout) -> bool:
        """Whether two layouts name every tensor alike (Llama and Mistral do)."""
        def names(lay: Layout) -> tuple:
            return lay.layers, lay.embed, lay.final_norm, lay.head

        return names(self) == names(other)

    def moved(self, old: str, new: str, family: str) -> Layout:
        """The same layout with names under ``old`` moved under ``new`` (a language model
        inside a vision-language model)."""
        def move(n: str) -> str:
            return new + n[len(old):] if n.startswith(old) else n

        return replace(self, family=family, layers=move(self.layers), embed=tuple(map(move, self.embed)),
                       final_norm=tuple(map(move, self.final_norm)), head=tuple(map(move, self.head)),
                       vocab=tuple(map(move, self.vocab)), tied=tuple((move(h), move(e)) for h, e in self.tied),
                       omitted_prefix="")

    # -- config ------------------------------------------------------------------------------

    def num_layers(self, config: dict) -> int:
        n = config.get(self.num_layers_key)
        if type(n) is not int or n < 1:
            raise EvomergeError(f"config.json has no {self.num_layers_key} (a positive integer); "
                                f"is this a {self.family} causal LM folder?")
        return n

    def ties(self, config: dict) -> bool:
        return bool(config.get("tie_word_embeddings", self.tied_by_default))


def _llama_style(family: str, architecture: str, *, tied_by_default: bool = False) -> Layout:
    """Llama's names, which Mistral, Qwen2/3, Gemma/Gemma2 and Phi-3 share."""
    return Layout(family, (architecture,), (family,), layers="model.layers.{n}.",
                  embed=("model.embed_tokens.weight",), final_norm=("model.norm.weight",),
                  head=("lm_head.weight",), vocab=("model.embed_tokens.weight", "lm_head.weight"),
                  tied=(("lm_head.weight", "model.embed_tokens.weight"),), tied_by_default=tied_by_default)


LAYOUTS: tuple[Layout, ...] = (
    _llama_style("llama", "LlamaForCausalLM"),
    _llama_style("mistral", "MistralForCausalLM"),
    _llama_style("qwen2", "Qwen2ForCausalLM"),
    _llama_style("qwen3", "Qwen3ForCausalLM"),
    _llama_style("gemma", "GemmaForCausalLM", tied_by_default=True),
    _llama_style("gemma2", "Gemma2ForCausalLM", tied_by_default=True),
    _llama_style("phi3", "Phi3ForCausalLM"),
    Layout("gpt2", ("GPT2LMHeadModel",), ("gpt2",), layers="transformer.h.{n}.",
           embed=("transformer.wte.weight", "transformer.wpe.weight"),
           final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"), head=("lm_head.weight",),
           vocab=("transformer.wte.weight", "lm_head.weight"), tied=(("lm_head.weight", "transformer.wte.weight"),),
           tied_by_default=True, num_layers_key="n_layer", omitted_prefix="transformer."),
    Layout("falcon", ("FalconForCausalLM",), ("falcon",), layers="transformer.h.{n}.",
           embed=("transformer.word_embeddings.weight",),
           final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"), head=("lm_head.weight",),
           vocab=("transformer.word_embeddings.weight", "lm_head.weight"),
           tied=(("lm_head.weight", "transformer.word_embeddings.weight"),), tied_by_default=True),
    Layout("gpt_neox", ("GPTNeoXForCausalLM",), ("gpt_neox",), layers="gpt_neox.layers.{n}.",
           embed=("gpt_neox.embed_in.weight",),
           final_norm=("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"),
           head=("embed_out.weight",), vocab=("gpt_neox.embed_in.weight", "embed_out.weight")),
)

# LLaVA and LLaVA-NeXT: a Llama-style language model under ``model.language_model.`` (the head
# stays ``lm_head.weight``), the vision tower and projector beside it.
VLM_LM_PREFIX = "model.language_model."
VLM_LAYOUTS: tuple[Layout, ...] = tuple(
    lay.moved("model.", VLM_LM_PREFIX, f"llava ({lay.family})") for lay in LAYOUTS if lay.layers == "model.layers.{n}.")

def _architectures(config: dict) -> list[str]:
    archs = config.get("architectures")
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def declared(config: dict, layouts: tuple[Layout, ...] = LAYOUTS) -> Layout | None:
    """The layout config.json names (by ``architectures``, then ``model_type``), if known."""
    archs = _architectures(config)
    for lay in layouts:
        if any(a in lay.architectures for a in archs):
            return lay
    model_type = config.get("model_type")
    return next((lay for lay in layouts if model_type in lay.model_types), None)


def choose(config: dict, names: list[str], label: str, layouts: tuple[Layout, ...] = LAYOUTS,
           ignore: tuple[str, ...] = ()) -> Layout:
    """The layout of a model with this config.json and these tensor names (``ignore``: name
    prefixes another part of the adapter owns, e.g. a vision tower). Refuses a model whose
    tensors do not fit: one line naming the model, the first tensor that does not fit and what
    to do."""
    names = [n for n in names if not n.startswith(ignore)]
    lay = declared(config, layouts)
    # a family not in the table: the layout its tensors fit best (in table order)
    best = lay or min(layouts, key=lambda c: sum(c.group(c.canonical(n)) is None for n in names))
    unfit = best.first_unfit(names)
    if unfit is None and names:
        return best
    arch = (_architectures(config) or [str(config.get("model_type", "unknown"))])[0]
    if not names:
        what = "no tensors of a causal LM"
    elif lay is not None:
        what = f"tensor {unfit} does not fit the {lay.family} layout (architecture {arch})"
    else:
        what = f"architecture {arch} is not in evomerge's layouts and tensor {unfit} fits none of them"
    known = ", ".join(lay.family for lay in layouts)
    raise EvomergeError(f"model {label}: {what}; evomerge knows {known}: describe this family in "
                        "LAYOUTS (evomerge/modalities/layouts.py), or merge a model of a known family")
