"""An evomerge recipe (and a run's chosen values) as a mergekit 0.1.5 YAML giving the same tensors.

Per-source values become model ``parameters``; per-group values become ``filter`` entries, one per
layer (``model.layers.3.``, ``transformer.h.3.``) and one per tensor outside the layers, so every tensor reads exactly
the value the run chose (a per-layer list would interpolate). Settings mergekit has no key for
but does not need (``seed``, ``tie_order``) are written as evomerge keys that mergekit ignores;
anything mergekit would merge differently is refused with one line naming it.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import EvomergeError
from evomerge.mergekit_yaml import BASE_AS_INPUT, BASE_FIRST_OF_PAIR
from evomerge.merging.methods import get_method
from evomerge.recipe import Conditional, Recipe

# evomerge's random drops: "l1" is mergekit's `rescale: true`, "none" its `rescale: false`
RANDOM_DROP = ("dare_ties", "dare_linear", "della", "della_linear")


def _ref(spec) -> str:
    text = spec.model + (f"@{spec.revision}" if spec.revision else "")
    return text + (f"+{spec.lora}" if spec.lora else "")


def _dump(value: Any) -> Any:
    """A recipe value as plain YAML data (filters as mappings)."""
    if isinstance(value, Conditional):
        return {k: _dump(v) for k, v in value.model_dump(exclude_none=True).items()}
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def group_filters(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Filter strings that select exactly one group's tensors: the layer's name prefix for a
    layer (``model.layers.3.``, ``transformer.h.3.``), each tensor's full name otherwise."""
    out = {}
    for group, names in groups.items():
        if group.startswith("layers."):
            parts = names[0].split(".")  # the layout's layer prefix ends at the layer index
            out[group] = [".".join(parts[: parts.index(group.split(".")[1]) + 1]) + "."]
        else:
            out[group] = sorted(names)
    return out


def _parse(values: dict[str, float], labels: list[str]) -> dict[tuple[str | None, str | None, str], float]:
    """Value names (``param``, ``src/param``, ``group/param``, ``group/src/param``) as
    (group, source, param) keys."""
    out = {}
    for name, v in values.items():
        parts = name.split("/")
        if len(parts) == 3:
            out[(parts[0], parts[1], parts[2])] = v
        elif len(parts) == 2:
            key = (None, parts[0], parts[1]) if parts[0] in labels else (parts[0], None, parts[1])
            out[key] = v
        else:
            out[(None, None, parts[0])] = v
    return out


def _chosen(parsed: dict, source: str | None, param: str, filters: dict[str, list[str]]) -> Any:
    """The run's value of ``param`` for ``source`` (None: shared): a number, a filter list
    (per-group values), or None when the run has none."""
    if (None, source, param) in parsed:
        return parsed[(None, source, param)]
    if not any(g is not None and s == source and p == param for g, s, p in parsed):
        return None
    missing = [g for g in filters if (g, source, param) not in parsed]
    if missing or not filters:
        raise EvomergeError(f"values: {param} has no value for group {missing[0] if missing else '?'}; "
                            "export a finished run of this recipe")
    return [Conditional(filter=f, value=parsed[(g, source, param)]) for g, strings in filters.items()
            for f in strings]


def fill_values(recipe: Recipe, values: dict[str, float], groups: dict[str, list[str]] | None = None) -> Recipe:
    """The recipe with a run's chosen values written in as fixed values (nothing searched);
    ``groups`` (group -> its tensor names) is needed for per-group values."""
    if recipe.merge is None or not values:
        return recipe
    filters = group_filters(groups or {})
    parsed = _parse(values, [m.label for m in recipe.models])
    per_source = {p.name for p in get_method(recipe.merge.method).params if p.per_source}

    def chosen(source: str | None) -> dict:
        out = {}
        for param in {p for _, _, p in parsed if (p in per_source) == (source is not None)}:
            value = _chosen(parsed, source, param, filters)
            if value is None and source is not None:  # global granularity: one value for all
                value = _chosen(parsed, None, param, filters)
            if value is not None:
                out[param] = value
        return out

    models = [m.model_copy(update={"parameters": {**m.parameters, **chosen(m.label)}}) for m in recipe.models]
    merge = recipe.merge.model_copy(update={"parameters": {**recipe.merge.parameters, **chosen(None)},
                                            "search": {}})
    return recipe.model_copy(update={"models": models, "merge": merge})


def export_recipe(recipe: Recipe) -> dict:
    """The mergekit mapping of a recipe whose values are all fixed (see :func:`fill_values`)."""
    if recipe.merge is None:
        raise EvomergeError(f"recipe {recipe.name}: a dfs recipe has no mergekit form")
    if recipe.modality != "causal_lm":
        raise EvomergeError(f"recipe {recipe.name}: modality {recipe.modality}; mergekit YAML export covers causal_lm")
    if recipe.merge.search:
        raise EvomergeError(f"recipe {recipe.name}: {next(iter(recipe.merge.search))} is searched; "
                            "export the run folder (its best values) instead of the recipe")
    method = recipe.merge.method
    if method in RANDOM_DROP and recipe.merge.rescale == "inverse":
        raise EvomergeError(f"recipe {recipe.name}: merge.rescale inverse (1/density, the DARE paper) has no "
                            "mergekit form (mergekit rescales to the L1 norm); set merge.rescale: l1 or none")
    models = [{"model": _ref(m), **({"parameters": _dump(m.parameters)} if m.parameters else {})}
              for m in recipe.models]
    base = None
    if method in BASE_FIRST_OF_PAIR:
        base = models[0]["model"]
    elif recipe.base and method not in BASE_AS_INPUT:  # evomerge's linear does not use a base
        base = recipe.base
        models.insert(0, {"model": base})
    if recipe.reference:
        ref_model = next((m for m in recipe.models if m.label == recipe.reference), None)
        if ref_model is None or (method not in BASE_AS_INPUT and _ref(ref_model) != base):
            raise EvomergeError(f"recipe {recipe.name}: reference {recipe.reference!r}: mergekit takes the config "
                                "and tokenizer from base_model; drop `reference`")
        base = _ref(ref_model)
    out: dict[str, Any] = {"merge_method": method}
    if recipe.slices:
        out["slices"] = _slices(recipe)
    else:
        out["models"] = models
    if base:
        out["base_model"] = base
    shared = _dump(recipe.merge.parameters)
    if method in RANDOM_DROP:
        shared["rescale"] = recipe.merge.rescale == "l1"
    if shared:
        out["parameters"] = shared
    for key in ("dtype", "out_dtype", "chat_template"):
        if getattr(recipe, key):
            out[key] = getattr(recipe, key)
    if recipe.tokenizer:
        out["tokenizer"] = _tokenizer(recipe)
    if recipe.merge.tie_order != "index":
        out["tie_order"] = recipe.merge.tie_order
    if method in RANDOM_DROP:
        out["seed"] = recipe.seed  # evomerge's masks; mergekit ignores the key (its masks are its own)
    return out


def recipe_groups(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, list[str]]:
    """Group -> tensor names of the recipe's reference model (for per-group values)."""
    from evomerge.modalities import get_adapter
    from evomerge.modalities.base import reference_config
    from evomerge.recipe import ModelSpec
    from evomerge.sources import open_model

    adapter = get_adapter(recipe.modality, grouping=recipe.grouping)
    label = reference_config(adapter, recipe).label  # the reference merge takes
    specs = ([ModelSpec(model=recipe.base, name="base")] if recipe.base else []) + list(recipe.models)
    spec = next(s for s in specs if s.label == label)
    source = open_model(adapter, spec, spec.label, allow_pickle=allow_pickle)
    groups: dict[str, list[str]] = {}
    for name in source.names():
        groups.setdefault(adapter.group(name), []).append(name)
    return {g: groups[g] for g in adapter.groups(source.names())}


def _slices(recipe: Recipe) -> list[dict]:
    refs = {m.label: m for m in recipe.models}
    out = []
    for spec in recipe.slices:
        if any(s.layer_range is None for s in spec.sources):
            raise EvomergeError("slices: every source needs a layer_range in mergekit's form")
        sources = []
        for s in spec.sources:
            params = {**refs[s.model].parameters, **s.parameters}
            sources.append({"model": _ref(refs[s.model]), "layer_range": list(s.layer_range),
                            **({"parameters": _dump(params)} if params else {})})
        entry: dict[str, Any] = {"sources": sources}
        if spec.base:
            entry["base_model"] = _ref(refs[spec.base])
        if spec.parameters:
            entry["parameters"] = _dump(spec.parameters)
        out.append(entry)
    return out


def _tokenizer(recipe: Recipe) -> dict:
    refs = {m.label: _ref(m) for m in recipe.models}
    spec = recipe.tokenizer
    out: dict[str, Any] = {"source": refs.get(spec.source, spec.source)}
    if spec.pad_to_multiple_of:
        out["pad_to_multiple_of"] = spec.pad_to_multiple_of
    tokens = {}
    for token, emb in spec.tokens.items():
        entry: dict[str, Any] = {"force": emb.force}
        if emb.source == "zero":
            entry["source"] = {"kind": "zero"}
        elif emb.token is not None or emb.token_id is not None:
            entry["source"] = {"kind": "model_token", "model": refs[emb.source],
                               **({"token": emb.token} if emb.token is not None else {"token_id": emb.token_id})}
        elif emb.source is not None:
            entry["source"] = refs[emb.source]
        tokens[token] = entry
    if tokens:
        out["tokens"] = tokens
    return out
