"""One merge from a recipe and chosen values to a model folder with its card.

    recipe -> adapter opens base and sources -> engine checks shapes and values
           -> every tensor merged and streamed into safetensors shards in a temporary folder
           -> config, tokenizer/processor and model card written -> folder renamed into place
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge import __version__
from evomerge.atomic import building_folder, check_output
from evomerge.checkpoint import PlannedTensor, ShardedSafetensorsWriter, WriteBehind
from evomerge.dtypes import default_dtype
from evomerge.errors import EvomergeError
from evomerge.merging.engine import MergeEngine
from evomerge.merging.registry import get_method
from evomerge.merging.space import SearchSpace, ValueTable
from evomerge.modalities import get_adapter
from evomerge.modalities.base import Adapter, TensorSource, pick_reference
from evomerge.progress import progress_bar
from evomerge.recipe import Recipe, input_paths
from evomerge.sources import open_model


def _family(source: TensorSource) -> str | None:
    config = source.config.get("text_config", source.config)
    return config.get("model_type") or source.config.get("_class_name")


@dataclass
class MergeSession:
    """A recipe's models opened once, with the engine and search space built on them."""

    recipe: Recipe
    adapter: Adapter
    reference: TensorSource
    base: TensorSource | None
    sources: list[TensorSource]
    engine: MergeEngine
    space: SearchSpace

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]

    def table(self, searched: dict[str, float] | None = None) -> ValueTable:
        m = self.recipe.merge
        return ValueTable(
            method=self.engine.method, sources=tuple(self.labels), shared_fixed=dict(m.parameters),
            per_source_fixed={spec.label: dict(spec.parameters) for spec in self.recipe.models},
            searched=dict(searched or {}), granularity=m.granularity)


def open_session(recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False,
                 trust_remote_code: bool = False, allow_nonfinite: bool = False) -> MergeSession:
    """Open every model of the recipe lazily and validate the merge (no weights read yet)."""
    if recipe.merge is None:
        raise EvomergeError(f"recipe {recipe.name}: a dfs recipe has no parameter-space merge; use evolve")
    if recipe.slices or recipe.tokenizer or recipe.chat_template or recipe.out_dtype:
        raise EvomergeError(f"recipe {recipe.name}: slices, tokenizer, chat_template and out_dtype are "
                            "written by `evomerge merge`; a search merges whole models (drop them)")
    adapter = get_adapter(recipe.modality, grouping=recipe.grouping, trust_remote_code=trust_remote_code,
                          sdxl=recipe.sdxl)
    method = get_method(recipe.merge.method)
    check_parameter_names(recipe, method)
    base = adapter.open(recipe.base, "base", allow_pickle=allow_pickle) if recipe.base else None
    sources = [open_model(adapter, m, m.label, allow_pickle=allow_pickle) for m in recipe.models]
    families = {s.label: _family(s) for s in ([base] if base else []) + sources}
    if len(set(families.values())) > 1:
        raise EvomergeError(f"models of different architectures: {families}; merge models of one family")
    reference = pick_reference(adapter, recipe.reference, ([base] if base else []) + sources)
    check_no_extra_tensors(adapter, reference, ([base] if base else []) + sources)
    dtype = default_dtype(recipe.dtype, reference)
    engine = MergeEngine(adapter, reference, base, sources, method, dtype=dtype, device=device,
                         seed=recipe.seed, options=method_options(recipe), allow_nonfinite=allow_nonfinite)
    groups = adapter.groups([j.name for j in engine.jobs if j.merge])
    space = SearchSpace.from_spec(recipe.merge, method, [s.label for s in sources], groups)
    return MergeSession(recipe, adapter, reference, base, sources, engine, space)


def method_options(recipe: Recipe) -> dict[str, str]:
    """The method options the recipe sets (a method refuses one it does not take)."""
    return {k: getattr(recipe.merge, k) for k in ("tie_order", "rescale")
            if k in recipe.merge.model_fields_set}


def check_no_extra_tensors(adapter: Adapter, reference: TensorSource, sources: list[TensorSource]) -> None:
    """A tensor the reference lacks would vanish from the output: refuse it (a head the
    reference ties to its embedding is not one: the merged embedding is that head)."""
    for s in sources:
        extra = next((n for n in s.names()
                      if n not in reference and adapter.merge_role(n, reference) != "skip"), None)
        if extra is not None:
            raise EvomergeError(f"model {reference.label}: tensor {extra} is missing (present in "
                                f"{s.label}); merge models of the same architecture")


# mergekit options with no effect on the result here (int8_mask only saves memory there).
IGNORED_MERGEKIT_KEYS = {"int8_mask"}


def check_parameter_names(recipe: Recipe, method) -> None:
    """A misspelt value name would silently merge with defaults: refuse it."""
    known = {p.name: p for p in method.params}
    places = [("merge.parameters", recipe.merge.parameters)] + [
        (f"models[{m.label}].parameters", m.parameters) for m in recipe.models]
    for where, params in places:
        for key, value in params.items():
            if key not in known and key not in IGNORED_MERGEKIT_KEYS:
                raise EvomergeError(f"{where}: {key!r} is not a value of method {method.name!r} "
                                    f"(it takes: {', '.join(sorted(known))})")
            if key in known and not isinstance(known[key].default, bool) and _has_bool(value):
                raise EvomergeError(f"{where}.{key}: true/false is not a number; write the number")


def _has_bool(value) -> bool:
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    return isinstance(getattr(value, "value", value), bool)


def merge_to_folder(session: MergeSession, out_dir: Path, values: dict[str, float] | None = None,
                    *, force: bool = False, show_progress: bool = True,
                    extra_card: str = "") -> Path:
    """Merge with fixed recipe values (+ ``values`` for searched ones) and save a model folder."""
    out_dir = Path(out_dir)
    table = session.table(values)
    missing = [n for n in session.space.names if n not in (values or {})]
    if missing:
        raise EvomergeError(f"no value for searched {missing[0]!r}: give values, or merge a finished run")
    engine = session.engine
    engine.check_values(table)
    check_output(out_dir, force=force, inputs=input_paths(session.recipe))
    with building_folder(out_dir) as tmp:
        planned = [PlannedTensor(j.name, engine.reference.shape(j.name), engine.output_dtype(j))
                   for j in engine.jobs]
        writer = ShardedSafetensorsWriter(tmp, planned, stem=session.adapter.weights_stem)
        groups = session.adapter.groups([j.name for j in engine.jobs])
        with progress_bar("merging", total=len(groups), enabled=show_progress) as advance, \
                WriteBehind(writer) as out:
            current = None
            for job, tensor in engine.iter_merged(table, reuse_buffers=WriteBehind.BUFFERS):
                if job.group != current:
                    current = job.group
                    advance(job.group)
                out.write(job.name, session.adapter.finish_tensor(job.name, tensor))
        session.adapter.save_extras(engine.reference, tmp, engine.dtype)
        (tmp / "README.md").write_text(model_card(session.recipe, session.adapter.library, values or {}, extra_card))
    return out_dir


def model_card(r: Recipe, library: str, values: dict[str, float], extra: str = "") -> str:
    """A Hugging Face model card recording the sources, the method and every value (``library``
    loads the output: transformers, diffusers)."""
    base_models = ([r.base] if r.base else []) + [m.model for m in r.models]
    front = {"base_model": base_models, "library_name": library,
             "tags": ["merge", "evomerge", r.merge.method]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {r.name}", "",
             f"Merged with [evomerge](https://github.com/evomerge/evomerge) {__version__} "
             f"using **{r.merge.method}**.", "", "## Sources", ""]
    if r.base:
        lines.append(f"- base: `{r.base}`")
    lines += [f"- `{m.label}`: `{m.model}`" for m in r.models]
    if values:
        lines += ["", "## Chosen values", "", "| value | chosen |", "|---|---|"]
        lines += [f"| `{k}` | {v:.6g} |" for k, v in values.items()]
    recipe_yaml = yaml.safe_dump(r.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True)
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```"]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"


def merge_recipe(recipe: Recipe, out_dir: str | Path, values: dict[str, float] | None = None, *,
                 device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False,
                 allow_nonfinite: bool = False, force: bool = False, show_progress: bool = True,
                 shard_bytes: int | None = None, copy_tokenizer: bool = True) -> Path:
    """One merge of a recipe into ``out_dir``, whatever it asks for: a DFS path (``values`` from
    its run's best.json), a mergekit-style layout (slices, tokenizer, out_dtype..., or the output
    options ``shard_bytes`` and ``copy_tokenizer`` only it writes), or the engine's merge with the
    recipe's fixed values and ``values`` for the searched ones."""
    out_dir = Path(out_dir)
    opts = dict(device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if recipe.dfs is not None:
        from evomerge.pipelines.dfs import DFSCandidates

        if not values:
            raise EvomergeError(f"recipe {recipe.name}: a dfs recipe fixes no path; merge the run folder evolve wrote")
        return DFSCandidates(recipe, **opts).export(values, out_dir, force=force, show_progress=show_progress)
    from evomerge.pipelines.slices import merge_layout, needs_layout

    output_options = shard_bytes is not None or not copy_tokenizer
    if needs_layout(recipe) or (output_options and not values):
        return merge_layout(recipe, out_dir, force=force, show_progress=show_progress,
                            allow_nonfinite=allow_nonfinite, shard_bytes=shard_bytes or 5 * 10**9,
                            copy_tokenizer=copy_tokenizer, **opts)
    if output_options:
        raise EvomergeError("--out-shard-size and --no-copy-tokenizer apply to merges of fixed values, "
                            "not to a run's best values")
    session = open_session(recipe, allow_nonfinite=allow_nonfinite, **opts)
    return merge_to_folder(session, out_dir, values, force=force, show_progress=show_progress)
