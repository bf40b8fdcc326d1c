"""mergekit 0.1.5 YAML in and out.

:func:`from_mergekit` reads a mergekit configuration into an evomerge recipe mapping. Every key
of mergekit's schema (``MergeConfiguration``, ``InputModelDefinition``, ``InputSliceDefinition``,
``OutputSliceDefinition``, ``ConditionalParameter``, ``TokenizerConfig``, model references) is
either honoured with mergekit's meaning or refused with one line naming the key and what to do;
keys mergekit does not know (typos such as ``dtyp``) are refused too, where mergekit would
ignore them. :func:`to_mergekit` writes a recipe (and a run's chosen values) back as a YAML
mergekit runs to the same tensors, or refuses naming what mergekit cannot express.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import EvomergeError

# How mergekit treats ``base_model`` per method (its InputContract): "input" methods take the
# base as one more input (appended to `models` when not listed); "pair" methods go from the
# base (t=0) to the one other model, which evomerge writes as the first of two models;
# every other method merges task vectors against a separate base.
BASE_AS_INPUT = {"linear", "karcher", "passthrough"}
BASE_FIRST_OF_PAIR = {"slerp"}

# -- mergekit's schema, strict ------------------------------------------------------------------

Setting = Any  # validated by the recipe schema (numbers, lists, filters)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MKInputModel(_Strict):
    model: Any
    parameters: dict[str, Setting] | None = None


class MKInputSlice(_Strict):
    model: Any
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None


class MKOutputSlice(_Strict):
    sources: list[MKInputSlice]
    base_model: Any = None
    residual_weight: float | None = None  # declared by mergekit 0.1.5 and read nowhere: no effect
    parameters: dict[str, Setting] | None = None


class MKTokenSource(_Strict):
    kind: str
    model: Any = None
    token_id: int | None = None
    token: str | None = None


class MKTokenEmbedding(_Strict):
    source: Any = None
    force: bool = False


class MKTokenizer(_Strict):
    source: Any = "union"
    tokens: dict[str, MKTokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


class MKConfig(_Strict):
    modules: Any = None
    slices: list[MKOutputSlice] | None = None
    models: list[MKInputModel] | None = None
    merge_method: str
    base_model: Any = None
    dtype: str | None = None
    tokenizer_source: Any = None
    tokenizer: MKTokenizer | None = None
    chat_template: str | None = None
    out_dtype: str | None = None
    parameters: dict[str, Setting] | None = None
    # evomerge extensions
    name: str | None = None
    tie_order: str | None = Field(None, description="how TIES breaks magnitude ties: index | mergekit")
    seed: int | None = Field(None, description="seed of evomerge's random drops (mergekit ignores the key)")


# -- model references ------------------------------------------------------------------------------


class ModelRef(BaseModel):
    """``path[@revision][+lora[@revision]]`` or mergekit's ``{model: {path, revision}, lora: ...}``."""

    model_config = ConfigDict(frozen=True)
    path: str
    revision: str | None = None
    lora: str | None = None
    lora_revision: str | None = None

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        if self.lora:
            text += f"+{self.lora}" + (f"@{self.lora_revision}" if self.lora_revision else "")
        return text


def _split_revision(text: str, where: str) -> tuple[str, str | None]:
    if text.count("@") > 1:
        raise EvomergeError(f"{where}: {text!r} has more than one '@'; write path@revision")
    path, _, rev = text.partition("@")
    return path, rev or None


def _model_path(value: Any, where: str) -> tuple[str, str | None]:
    if isinstance(value, str):
        return _split_revision(value, where)
    if isinstance(value, dict):
        unknown = set(value) - {"path", "revision"}
        if unknown or "path" not in value:
            raise EvomergeError(f"{where}: a model path is a string or {{path, revision}} (got keys {sorted(value)})")
        return str(value["path"]), value.get("revision")
    raise EvomergeError(f"{where}: expected a model path, got {value!r}")


def parse_ref(value: Any, where: str) -> ModelRef:
    """One mergekit model reference."""
    if isinstance(value, str):
        parts = value.split("+")
        if len(parts) > 2:
            raise EvomergeError(f"{where}: {value!r} has more than one '+'; write model+lora")
        path, rev = _model_path(parts[0], where)
        lora, lora_rev = _model_path(parts[1], where) if len(parts) == 2 else (None, None)
        return ModelRef(path=path, revision=rev, lora=lora, lora_revision=lora_rev)
    if isinstance(value, dict):
        if "override_architecture" in value:
            raise EvomergeError(f"{where}.override_architecture: not supported; evomerge reads the "
                                "architecture from config.json (remove the key)")
        unknown = set(value) - {"model", "lora"}
        if unknown:
            raise EvomergeError(f"{where}: unknown key {sorted(unknown)[0]!r} in a model reference "
                                "(it takes model, lora)")
        if "model" not in value:
            raise EvomergeError(f"{where}: a model reference needs `model`")
        path, rev = _model_path(value["model"], f"{where}.model")
        lora, lora_rev = (_model_path(value["lora"], f"{where}.lora") if value.get("lora") else (None, None))
        return ModelRef(path=path, revision=rev, lora=lora, lora_revision=lora_rev)
    raise EvomergeError(f"{where}: expected a model reference, got {value!r}")


# -- reading -------------------------------------------------------------------------------------


def _format_error(source: str, e: ValidationError) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        known = _known_keys(err["loc"][:-1])
        guess = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {guess[0]!r}?" if guess else f"known keys: {', '.join(sorted(known))}"
        return f"{source}: unknown key {where!r} in a mergekit config; {hint}"
    return f"{source}: field {where}: {err['msg']}"


def _known_keys(loc: tuple) -> list[str]:
    """Keys allowed at a location of the config (for did-you-mean hints)."""
    model: type[BaseModel] = MKConfig
    fields_path = [p for p in loc if isinstance(p, str)]
    for name in fields_path:
        nested = {"slices": MKOutputSlice, "models": MKInputModel, "sources": MKInputSlice,
                  "tokenizer": MKTokenizer, "tokens": MKTokenEmbedding}.get(name)
        if nested is None:
            break
        model = nested
    return list(model.model_fields)


class _Labels:
    """Distinct model references in first-seen order, each with a unique short label."""

    def __init__(self):
        self.refs: dict[ModelRef, str] = {}

    def label(self, ref: ModelRef) -> str:
        if ref not in self.refs:
            stem = Path(ref.path.rstrip("/")).name or "model"
            if ref.lora:
                stem += "+" + (Path(ref.lora.rstrip("/")).name or "lora")
            taken = set(self.refs.values())
            label, i = stem, 2
            while label in taken:
                label, i = f"{stem}-{i}", i + 1
            self.refs[ref] = label
        return self.refs[ref]

    def specs(self, parameters: dict[str, dict] | None = None) -> list[dict]:
        out = []
        for ref, label in self.refs.items():
            spec: dict[str, Any] = {"model": ref.path, "name": label}
            if ref.revision:
                spec["revision"] = ref.revision
            if ref.lora:
                spec["lora"] = ref.lora if not ref.lora_revision else f"{ref.lora}@{ref.lora_revision}"
            if parameters and parameters.get(label):
                spec["parameters"] = parameters[label]
            out.append(spec)
        return out


def _tokenizer(cfg: MKConfig, labels: _Labels) -> dict | None:
    """The recipe's tokenizer block from `tokenizer_source` or `tokenizer:`."""
    if cfg.tokenizer_source is not None and cfg.tokenizer is not None:
        raise EvomergeError("tokenizer_source and tokenizer: give one of them (tokenizer.source "
                            "takes the same values)")
    if cfg.tokenizer is None and cfg.tokenizer_source is None:
        return None
    block = cfg.tokenizer or MKTokenizer(source=cfg.tokenizer_source)

    def source_label(value: Any, where: str) -> str:
        if value in ("base", "union"):
            return value
        return _known_label(parse_ref(value, where), labels, where)

    out: dict[str, Any] = {"source": source_label(block.source, "tokenizer.source")}
    if block.pad_to_multiple_of:
        out["pad_to_multiple_of"] = block.pad_to_multiple_of
    tokens = {}
    for token, emb in (block.tokens or {}).items():
        where = f"tokenizer.tokens.{token}"
        entry: dict[str, Any] = {"force": emb.force}
        src = emb.source
        if isinstance(src, dict) and "kind" in src:
            kind = MKTokenSource.model_validate(src)
            if kind.kind == "zero":
                entry["source"] = "zero"
            elif kind.kind == "model_token":
                if (kind.token is None) == (kind.token_id is None):
                    raise EvomergeError(f"{where}.source: give exactly one of token or token_id")
                entry["source"] = _known_label(parse_ref(kind.model, f"{where}.source.model"), labels, where)
                entry["token"], entry["token_id"] = kind.token, kind.token_id
            else:
                raise EvomergeError(f"{where}.source.kind {kind.kind!r}: use zero or model_token")
        elif src is not None:
            entry["source"] = _known_label(parse_ref(src, f"{where}.source"), labels, where)
        tokens[token] = entry
    if tokens:
        out["tokens"] = tokens
    return out


def _known_label(ref: ModelRef, labels: _Labels, where: str) -> str:
    if ref not in labels.refs:
        raise EvomergeError(f"{where}: {ref} is not one of the merged models; name one of them")
    return labels.refs[ref]


def from_mergekit(data: dict, source: str = "config") -> dict:
    """Translate a mergekit YAML mapping into an evomerge recipe mapping (refusing what it can't)."""
    try:
        cfg = MKConfig.model_validate(data)
    except ValidationError as e:
        raise EvomergeError(_format_error(source, e)) from None
    if cfg.modules is not None:
        raise EvomergeError(f"{source}: `modules` (per-module merges of multi-module models) is not "
                            "supported; use `models` or `slices`")
    if bool(cfg.models) == bool(cfg.slices):
        raise EvomergeError(f"{source}: give exactly one of `models` or `slices` (non-empty)")
    method = cfg.merge_method
    labels = _Labels()
    base = parse_ref(cfg.base_model, "base_model") if cfg.base_model is not None else None
    recipe: dict[str, Any] = {"name": cfg.name or "mergekit-merge", "dtype": cfg.dtype}
    merge: dict[str, Any] = {"method": method, "parameters": dict(cfg.parameters or {})}
    if method in ("dare_ties", "dare_linear", "della", "della_linear"):
        # mergekit's random drops rescale to preserve the L1 norm (its `rescale`, default on)
        merge["rescale"] = "l1" if merge["parameters"].pop("rescale", True) else "none"
    if cfg.tie_order is not None:
        merge["tie_order"] = cfg.tie_order
    if cfg.seed is not None:
        recipe["seed"] = cfg.seed
    recipe["merge"] = merge

    if cfg.models:
        _models_form(cfg, base, labels, recipe)
    else:
        _slices_form(cfg, base, labels, recipe)
    tokenizer = _tokenizer(cfg, labels)
    if tokenizer:
        recipe["tokenizer"] = tokenizer
    for key in ("chat_template", "out_dtype"):
        if getattr(cfg, key) is not None:
            recipe[key] = getattr(cfg, key)
    return recipe


def _models_form(cfg: MKConfig, base: ModelRef | None, labels: _Labels, recipe: dict) -> None:
    method = cfg.merge_method
    entries = [(parse_ref(m.model, f"models[{i}].model"), m.parameters or {}) for i, m in enumerate(cfg.models)]
    refs = [r for r, _ in entries]
    if len(set(refs)) != len(refs):
        raise EvomergeError("models: a model is listed twice; list each once")
    if base is not None and base not in refs and method in BASE_AS_INPUT | BASE_FIRST_OF_PAIR:
        entries.append((base, {}))  # mergekit appends the base to the inputs
    if method in BASE_FIRST_OF_PAIR and base is not None:
        entries.sort(key=lambda e: e[0] != base)  # stable: the base first
    params = {}
    for ref, p in entries:
        if method in BASE_AS_INPUT | BASE_FIRST_OF_PAIR or ref != base:
            params[labels.label(ref)] = p
    recipe["models"] = labels.specs(params)
    recipe["slices"] = [{"sources": [{"model": label} for label in params]}]
    if base is not None and method not in BASE_AS_INPUT | BASE_FIRST_OF_PAIR:
        base_labels = _Labels()
        base_labels.label(base)
        spec = base_labels.specs()[0]
        if base.lora or base.revision:
            raise EvomergeError("base_model: a revision or LoRA on the base model is not supported yet; "
                                "merge the LoRA into a folder first")
        recipe["base"] = spec["model"]
        labels.refs[base] = "base"
    elif base is not None:
        recipe["reference"] = labels.refs[base]  # config and tokenizer come from the base


def _slices_form(cfg: MKConfig, base: ModelRef | None, labels: _Labels, recipe: dict) -> None:
    method = cfg.merge_method
    slices = []
    for i, out_slice in enumerate(cfg.slices):
        where = f"slices[{i}]"
        if not out_slice.sources:
            raise EvomergeError(f"{where}.sources: empty; name at least one model and layer_range")
        slice_base = (parse_ref(out_slice.base_model, f"{where}.base_model")
                      if out_slice.base_model is not None else base)
        sources, seen = [], set()
        for j, src in enumerate(out_slice.sources):
            ref = parse_ref(src.model, f"{where}.sources[{j}].model")
            if ref in seen:
                raise EvomergeError(f"{where}.sources: {ref} is listed twice; list each model once per slice")
            seen.add(ref)
            start, end = src.layer_range
            if not 0 <= start < end:
                raise EvomergeError(f"{where}.sources[{j}].layer_range [{start}, {end}]: need 0 <= start < end")
            sources.append({"model": labels.label(ref), "layer_range": [start, end],
                            "parameters": dict(src.parameters or {})})
        lengths = {s["layer_range"][1] - s["layer_range"][0] for s in sources}
        if len(lengths) > 1:
            raise EvomergeError(f"{where}: every source of a slice needs the same number of layers "
                                f"(got {sorted(lengths)})")
        spec: dict[str, Any] = {"sources": sources, "parameters": dict(out_slice.parameters or {})}
        if slice_base is not None and method not in BASE_AS_INPUT:
            if slice_base not in seen:
                raise EvomergeError(f"{where}: the base model {slice_base} is not among the slice's "
                                    "sources; add it with the same layer_range")
            if method in BASE_FIRST_OF_PAIR:  # evomerge's slerp goes from its first model
                sources.sort(key=lambda s: s["model"] != labels.refs[slice_base])
            else:
                spec["base"] = labels.refs[slice_base]
        slices.append(spec)
    recipe["models"] = labels.specs()
    recipe["slices"] = slices
    if base is not None and base in labels.refs:
        recipe["reference"] = labels.refs[base]


# -- writing -------------------------------------------------------------------------------------


def to_mergekit(recipe, values: dict[str, float] | None = None, groups: dict[str, list[str]] | None = None) -> dict:
    """The mergekit YAML mapping of a recipe, a run's chosen ``values`` written in (per-group
    values need ``groups``: group -> tensor names); refuses what mergekit cannot express."""
    from evomerge.mergekit_export import export_recipe, fill_values

    return export_recipe(fill_values(recipe, values or {}, groups))
