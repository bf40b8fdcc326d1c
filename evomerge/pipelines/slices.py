"""Merges laid out as slices of layers (mergekit's ``slices:``), with what else a mergekit YAML
asks of a causal LM: the output vocabulary, LoRAs, revisions, ``out_dtype``, a chat template.

    models opened (revision, LoRA) -> each slice's layer ranges seen as short models whose
    layers count from 0 (so per-layer value lists run over the slice, as mergekit's do)
    -> one MergeEngine per slice -> tensors renamed to their output layer, streamed into shards
    -> config (num_hidden_layers, vocab_size, dtype), tokenizer, chat template, card

The embedding (and other tensors before the layers) merges with the first slice's sources and
values, the final norm and head with the last slice's, as in mergekit. :func:`layer_view` and
the layout's ``renumbered`` are the path writer: any layer path (a DFS result too) is a list of
pieces, each a view of a source's layers, written under its output layer numbers. Layer names
come from the models' layout (:mod:`evomerge.modalities.layouts`), so GPT-2, Falcon or GPT-NeoX
slice as Llama does.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from evomerge.atomic import building_folder, check_output
from evomerge.checkpoint import PlannedTensor, ShardedSafetensorsWriter, WriteBehind
from evomerge.dtypes import default_dtype, parse_dtype
from evomerge.errors import EvomergeError
from evomerge.merging.engine import MergeEngine
from evomerge.merging.methods import get_method
from evomerge.merging.space import ValueTable
from evomerge.modalities import get_adapter, layouts
from evomerge.modalities.base import TensorSource
from evomerge.modalities.causal_lm import text_config
from evomerge.pipelines.merge import (
    _family,
    check_no_extra_tensors,
    check_parameter_names,
    method_options,
    model_card,
)
from evomerge.progress import progress_bar
from evomerge.recipe import Conditional, Recipe, SliceSource, SliceSpec, Value, input_paths
from evomerge.sources import open_model


def needs_layout(recipe: Recipe) -> bool:
    """Whether a merge asks for more than the plain engine does (mergekit-YAML features)."""
    return bool(recipe.slices or recipe.tokenizer or recipe.chat_template or recipe.out_dtype)


def layer_view(source: TensorSource, layout: layouts.Layout, start: int, count: int,
               keep_other: set[str]) -> TensorSource:
    """``source``'s layers ``start .. start+count-1`` as a model of ``count`` layers numbered
    from 0, with those of its other tensors named in ``keep_other``."""
    def rename(name: str) -> str | None:
        i = layout.layer_index(name)
        if i is None:
            return name if name in keep_other else None
        return layout.renumbered(name, i - start) if start <= i < start + count else None

    entries = {new: e for n, e in source.entries.items() if (new := rename(n)) is not None}
    loaded = {new: t for n, t in source.loaded.items() if (new := rename(n)) is not None}
    config = copy.deepcopy(source.config)
    text_config(config)[layout.num_layers_key] = count
    return TensorSource(source.label, source.folder, entries, loaded, config)


@dataclass
class Piece:
    """One slice's engine and values; its layer k is written as output layer ``offset + k``."""

    engine: MergeEngine
    table: ValueTable
    offset: int


def _fallback(first: Value, then: Value) -> list[Conditional]:
    """``first``, falling back to ``then`` where ``first``'s filters match nothing (mergekit's
    precedence: a source's setting, the slice's, the merge's)."""
    def conditionals(v: Value) -> list[Conditional]:
        if isinstance(v, Conditional):
            return [v]
        if isinstance(v, list) and v and all(isinstance(c, Conditional) for c in v):
            return list(v)
        return [Conditional(value=v)]

    return conditionals(first) + conditionals(then)


def _chain(*scopes: dict[str, Value]) -> dict[str, Value]:
    """Settings of several scopes, highest precedence first, as one dict."""
    out: dict[str, Value] = {}
    for scope in reversed(scopes):
        for key, value in scope.items():
            out[key] = _fallback(value, out[key]) if key in out else value
    return out


def default_slices(recipe: Recipe) -> list[SliceSpec]:
    """The recipe's slices, or one slice over every layer of every model."""
    if recipe.slices:
        return recipe.slices
    return [SliceSpec(sources=[SliceSource(model=m.label) for m in recipe.models])]


class Layout:
    """A recipe's models opened and its slices planned, ready to write."""

    def __init__(self, recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False,
                 trust_remote_code: bool = False, allow_nonfinite: bool = False):
        if recipe.modality != "causal_lm":
            raise EvomergeError(f"modality {recipe.modality}: slices, tokenizer, LoRA, revision, out_dtype "
                                "chat_template, output shard size and tokenizer copying apply to causal_lm merges only")
        self.recipe = recipe
        self.allow_nonfinite = allow_nonfinite
        self.adapter = get_adapter("causal_lm", trust_remote_code=trust_remote_code)
        self.method = get_method(recipe.merge.method)
        check_parameter_names(recipe, self.method)
        for i, s in enumerate(recipe.slices or []):
            check_slice_parameters(s, self.method, i)
        self.models = {m.label: open_model(self.adapter, m, m.label, allow_pickle=allow_pickle)
                       for m in recipe.models}
        self.base = open_model(self.adapter, _base_spec(recipe), "base", allow_pickle=allow_pickle) \
            if recipe.base else None
        opened = ([self.base] if self.base else []) + list(self.models.values())
        families = {s.label: _family(s) for s in opened}
        if len(set(families.values())) > 1:
            raise EvomergeError(f"models of different architectures: {families}; merge models of one family")
        self.reference = self._reference()
        check_no_extra_tensors(self.adapter, self.reference, opened)
        self.layout: layouts.Layout = self.adapter.layout  # bound by opening the models
        if not any(self.layout.layer_index(n) is not None for n in self.reference.names()):
            raise EvomergeError(f"model {self.reference.label}: no layer tensors ({self.layout.layer_prefix(0)}...); "
                                "slices need a model with layers")
        # tied embeddings: a head no model stores is not written (as mergekit, and transformers)
        self.tied_heads = {head for head, _ in self.layout.tied}
        self.untied = {head for head in self.tied_heads if any(_stores(s, head, self.layout) for s in opened)}
        self.dtype = default_dtype(recipe.dtype, self.reference)
        self.out_dtype = parse_dtype(recipe.out_dtype) if recipe.out_dtype else None
        self.vocab = None
        if recipe.tokenizer is not None:
            from evomerge.vocab import build_vocabulary

            self.vocab = build_vocabulary(recipe, self.models, self.base, self.reference, self.layout.vocab,
                                          trust_remote_code=trust_remote_code)
        self.pieces = self._plan(device)
        self._check_per_layer_config()

    def _reference(self) -> TensorSource:
        """Whose config, tokenizer and files the output takes: the base, else the first model."""
        if self.recipe.reference:
            if self.recipe.reference not in self.models:
                raise EvomergeError(f"reference: no model labelled {self.recipe.reference!r}")
            return self.models[self.recipe.reference]
        return self.base or self.models[default_slices(self.recipe)[0].sources[0].model]

    def _plan(self, device: str) -> list[Piece]:
        slices = default_slices(self.recipe)
        if len(slices) > 1 and len(slices[-1].sources) != len(slices[0].sources):
            raise EvomergeError("slices: the first and last slices need as many sources each (mergekit "
                                "merges the head with the last slice's models, in the first slice's count)")
        pieces, offset = [], 0
        for i, spec in enumerate(slices):
            keep = self._other_tensors(first=i == 0, last=i == len(slices) - 1)
            piece = self._piece(spec, i, offset, keep, device)
            pieces.append(piece)
            offset += self.num_layers(piece.engine.reference)
        return pieces

    def _other_tensors(self, *, first: bool, last: bool) -> set[str]:
        """Tensors outside the layers that a slice writes: those before the layers (the
        embedding) with the first slice, the rest (final norm, head) with the last."""
        names = [n for n in self.reference.names() if self.layout.layer_index(n) is None
                 and (n not in self.tied_heads or n in self.untied)]
        return {n for n in names if (self.adapter.group(n) == "embed" and first)
                or (self.adapter.group(n) != "embed" and last)}

    def _view(self, label: str, source: TensorSource, layer_range, keep: set[str], where: str) -> TensorSource:
        total = self.num_layers(source)
        start, end = layer_range or (0, total)
        if end > total:
            raise EvomergeError(f"{where}: layer_range [{start}, {end}] of {label}, which has {total} layers")
        return layer_view(source, self.layout, start, end - start, keep)

    def _piece(self, spec: SliceSpec, index: int, offset: int, keep: set[str], device: str) -> Piece:
        where = f"slices[{index}]" if self.recipe.slices else "models"
        for src in spec.sources:
            if src.model not in self.models:
                raise EvomergeError(f"{where}: no model labelled {src.model!r} (labels: {', '.join(self.models)})")
        views = {s.model: self._view(s.model, self.models[s.model], s.layer_range, keep, where)
                 for s in spec.sources}
        lengths = {self.num_layers(v) for v in views.values()}
        if len(lengths) > 1:
            raise EvomergeError(f"{where}: its sources have different numbers of layers {sorted(lengths)}")
        base = None
        inputs = list(spec.sources)
        if spec.base:
            base = views[spec.base]
            inputs = [s for s in spec.sources if s.model != spec.base]
        elif self.base is not None:  # the engine reads it where the method takes a base
            base = self._view("base", self.base, spec.sources[0].layer_range, keep, where)
        if self.vocab is not None:
            self.vocab.align([views[s.model] for s in inputs] + ([base] if base else []), self.dtype)
        per_model = {m.label: m.parameters for m in self.recipe.models}
        engine = MergeEngine(self.adapter, base or views[inputs[0].model], base,
                             [views[s.model] for s in inputs], self.method, dtype=self.dtype,
                             device=device, seed=self.recipe.seed + index, options=method_options(self.recipe),
                             allow_nonfinite=self.allow_nonfinite)
        shared = _chain(spec.parameters, self.recipe.merge.parameters)
        table = ValueTable(method=self.method, sources=tuple(s.model for s in inputs), shared_fixed=shared,
                           per_source_fixed={s.model: _chain(s.parameters, per_model[s.model]) for s in inputs},
                           searched={}, granularity=self.recipe.merge.granularity)
        engine.check_values(table)
        uneven = next((j.name for j in engine.jobs if j.rows is not None), None)
        if uneven is not None:
            raise EvomergeError(f"{where}: tensor {uneven} has a different number of rows (vocabulary size) "
                                "across the models; add tokenizer_source: union (or base) to lay them out")
        return Piece(engine, table, offset)

    def _check_per_layer_config(self) -> None:
        """A config list with one entry per layer (``layer_types``...) would not fit another count."""
        text = text_config(self.reference.config)
        n = self.num_layers(self.reference)
        per_layer = [k for k, v in text.items() if isinstance(v, list) and len(v) == n and n > 1]
        if self.layers != n and per_layer:
            raise EvomergeError(f"model {self.reference.label}: config.json {per_layer[0]} has one entry per layer; "
                                f"slices giving {self.layers} layers instead of {n} are not supported for it")

    def num_layers(self, source: TensorSource) -> int:
        return self.layout.num_layers(text_config(source.config))

    @property
    def layers(self) -> int:
        return sum(self.num_layers(p.engine.reference) for p in self.pieces)

    def output_name(self, piece: Piece, name: str) -> str:
        i = self.layout.layer_index(name)
        return name if i is None else self.layout.renumbered(name, piece.offset + i)

    def write(self, out_dir: Path, *, force: bool = False, shard_bytes: int = 5 * 10**9,
              copy_tokenizer: bool = True, show_progress: bool = True) -> Path:
        check_output(out_dir, force=force, inputs=input_paths(self.recipe))
        with building_folder(out_dir) as tmp:
            planned = [PlannedTensor(self.output_name(p, j.name), p.engine.reference.shape(j.name),
                                     self.out_dtype or p.engine.output_dtype(j))
                       for p in self.pieces for j in p.engine.jobs]
            writer = ShardedSafetensorsWriter(tmp, planned, stem="model", max_shard_bytes=shard_bytes)
            total = sum(len(p.engine.jobs) for p in self.pieces)
            with progress_bar("merging", total=total, enabled=show_progress) as advance, \
                    WriteBehind(writer) as out:
                for piece in self.pieces:
                    for job, tensor in piece.engine.iter_merged(piece.table, reuse_buffers=WriteBehind.BUFFERS):
                        name = self.output_name(piece, job.name)
                        advance(name)
                        out.write(name, tensor.to(self.out_dtype) if self.out_dtype else tensor)
            self._write_extras(tmp, copy_tokenizer)
            (tmp / "README.md").write_text(model_card(self.recipe, self.adapter.library, {}))
        return Path(out_dir)

    def _write_extras(self, tmp: Path, copy_tokenizer: bool) -> None:
        from evomerge.modalities.causal_lm import copy_model_files

        copy_model_files(self.reference.folder, tmp, self.out_dtype or self.dtype)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        text = text_config(config)
        text[self.layout.num_layers_key] = self.layers
        if self.vocab is not None:
            text["vocab_size"] = self.vocab.rows
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        from evomerge.vocab import write_tokenizer

        write_tokenizer(tmp, self.recipe, self.reference, self.models, self.vocab, copy_tokenizer)


def _stores(source: TensorSource, head: str, layout: layouts.Layout) -> bool:
    """Whether a checkpoint has its own ``head`` (not one read from its tied embedding)."""
    embed = dict(layout.tied)[head]
    for table in (source.entries, source.loaded):
        if head in table:
            return table.get(embed) is not table[head]
    return False


def _base_spec(recipe: Recipe):
    from evomerge.recipe import ModelSpec

    return ModelSpec(model=recipe.base, name="base")


def check_slice_parameters(spec: SliceSpec, method, index: int) -> None:
    """A misspelt value name in a slice would silently merge with defaults: refuse it."""
    known = {p.name for p in method.params} | {"int8_mask"}
    for where, params in [(f"slices[{index}].parameters", spec.parameters)] + [
            (f"slices[{index}].sources[{s.model}].parameters", s.parameters) for s in spec.sources]:
        for key in params:
            if key not in known:
                raise EvomergeError(f"{where}: {key!r} is not a value of method {method.name!r} "
                                    f"(it takes: {', '.join(sorted(known - {'int8_mask'}))})")


def merge_layout(recipe: Recipe, out_dir: Path, *, device: str = "cpu", allow_pickle: bool = False,
                 trust_remote_code: bool = False, force: bool = False, shard_bytes: int = 5 * 10**9,
                 copy_tokenizer: bool = True, show_progress: bool = True, allow_nonfinite: bool = False) -> Path:
    """Merge a recipe with slices or mergekit-YAML features into a model folder."""
    layout = Layout(recipe, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                    allow_nonfinite=allow_nonfinite)
    return layout.write(out_dir, force=force, shard_bytes=shard_bytes, copy_tokenizer=copy_tokenizer,
                        show_progress=show_progress)

