"""Recipes: what to merge, how, what to search and how to score it. YAML in, validated models out.

An evomerge recipe names its models, a merge method with fixed and searched values, and (for
``evomerge evolve``) an evaluator and a search budget. A mergekit YAML (``models``,
``merge_method``, ``base_model``, ``parameters``, ``dtype``) is read into the same model, so
``evomerge merge`` takes either; :func:`to_mergekit` writes the mergekit form back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError

Scalar = Union[bool, float, int]


class Conditional(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (mergekit's syntax)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


# A fixed value: a number, a list interpolated over depth (mergekit "gradient"), or filters.
Value = Union[Scalar, list[float], list[Conditional]]


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Hub id or local folder")
    name: str | None = Field(None, description="short label used in value names; default: folder name")
    parameters: dict[str, Value] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or Path(self.model.rstrip("/")).name


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, Value] = Field(default_factory=dict)
    search: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="searched values and their bounds, e.g. weight: [0, 1]")
    granularity: Literal["global", "per_source", "per_group"] = "per_source"
    tie_order: Literal["index", "mergekit"] = "index"
    rescale: Literal["inverse", "l1", "none"] = "inverse"


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sampler: Literal["cmaes", "random", "tpe"] = "cmaes"
    trials: int = 100
    popsize: int | None = None
    sigma: float = 1 / 6
    separable: bool = False


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "merge"
    modality: Literal["causal_lm", "vlm", "sdxl"] = "causal_lm"
    base: str | None = Field(None, description="base model for task vectors (Hub id or folder)")
    models: list[ModelSpec]
    merge: MergeSpec
    reference: str | None = Field(
        None, description="label of the model whose architecture, config and tokenizer the output takes")
    dtype: str | None = Field(None, description="merge and output dtype; default: the reference's")
    seed: int = 0
    grouping: str = Field("blocks", description="sdxl only: blocks | attn_other | blocks_attn_other")
    evaluator: dict[str, Any] | None = None
    baselines: list[dict[str, Any]] = Field(default_factory=list)
    search: SearchSpec = Field(default_factory=SearchSpec)

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_specs(cls, v):
        return [{"model": m} if isinstance(m, str) else m for m in v]

    @model_validator(mode="after")
    def _labels_unique(self):
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two models share the label {labels}: give each a distinct `name`")
        if not self.models:
            raise ValueError("`models` is empty: name at least one model to merge")
        return self


def _format_validation_error(path: Path, e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{path}: field {where}: {err['msg']}"


def from_mergekit(data: dict) -> dict:
    """Translate a mergekit YAML mapping into an evomerge recipe mapping."""
    base = data.get("base_model")
    models = []
    entries = data.get("models") or []
    if not entries and len(data.get("slices") or []) == 1:  # one slice over all layers
        entries = data["slices"][0].get("sources", [])
    for entry in entries:
        ref = entry["model"] if isinstance(entry, dict) else entry
        if isinstance(ref, dict):  # mergekit's {model: {path: ...}} form
            ref = ref.get("path") or ref.get("model")
        if ref == base:
            continue
        models.append({"model": ref, "parameters": (entry.get("parameters") or {}) if isinstance(entry, dict) else {}})
    method = data["merge_method"]
    if method == "slerp" and base:
        models.insert(0, {"model": base})  # slerp goes from the base (t=0) to the other model
        base = None
    return {
        "name": data.get("name", "mergekit-merge"),
        "base": base,
        "models": models,
        "merge": {"method": method, "parameters": data.get("parameters") or {}},
        "dtype": data.get("dtype"),
    }


def to_mergekit(recipe: Recipe, values: dict[str, Value] | None = None) -> dict:
    """The mergekit YAML mapping of a parameter-space recipe (with ``values`` filling searched ones).

    ``values`` maps ``{source}/{param}`` or ``{param}`` to numbers; per-group values become
    per-layer lists (mergekit's gradients).
    """
    values = values or {}
    if recipe.merge.method == "slerp":
        first, other = recipe.models[0], recipe.models[1]
        out: dict[str, Any] = {"merge_method": "slerp", "base_model": first.model,
                               "models": [{"model": first.model}, {"model": other.model}]}
    else:
        models = []
        if recipe.base:
            models.append({"model": recipe.base})
        for m in recipe.models:
            params = dict(m.parameters)
            params.update({k.split("/", 1)[1]: v for k, v in values.items()
                           if k.startswith(m.label + "/")})
            models.append({"model": m.model, "parameters": params} if params else {"model": m.model})
        out = {"merge_method": recipe.merge.method, "models": models}
        if recipe.base:
            out["base_model"] = recipe.base
    shared = dict(recipe.merge.parameters)
    shared.update({k: v for k, v in values.items() if "/" not in k})
    if shared:
        out["parameters"] = shared
    if recipe.dtype:
        out["dtype"] = recipe.dtype
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read an evomerge recipe or a mergekit YAML, with one-line errors naming the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise EvomergeError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise EvomergeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{path}: expected a mapping at the top level")
    if "merge_method" in data:
        data = from_mergekit(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise EvomergeError(_format_validation_error(path, e)) from None
