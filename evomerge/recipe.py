"""Recipes: what to merge, how, what to search and how to score it. YAML in, validated models out.

An evomerge recipe names its models, a merge method with fixed and searched values, and (for
``evomerge evolve``) an evaluator and a search budget. A mergekit YAML is read into the same
model by :mod:`evomerge.mergekit_yaml`, so ``evomerge merge`` takes either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import EvomergeError
from evomerge.evaluator_spec import EVALUATOR_SPECS
from evomerge.recipe_paths import resolve_recipe_paths, template_fields
from evomerge.strict_io import parse_yaml, read_text

Scalar = bool | float | int
Floats = Annotated[list[float], Field(min_length=1)]


class Conditional(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (mergekit's syntax)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | Floats


# A fixed value: a number, a list interpolated over depth (mergekit "gradient"), or filters
# (a list of them, or one alone as mergekit also allows).
Value = Scalar | Floats | Annotated[list[Conditional], Field(min_length=1)] | Conditional


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="Hub id or local folder")
    name: str | None = Field(None, description="short label used in value names; default: folder name")
    parameters: dict[str, Value] = Field(default_factory=dict)
    revision: str | None = Field(None, description="Hub branch, tag or commit (Hub ids only)")
    lora: str | None = Field(None, description="PEFT LoRA adapter folder applied to the model before merging")

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


class SliceSource(BaseModel):
    """Layers ``layer_range[0]`` up to (not including) ``layer_range[1]`` of one model (all
    of them when omitted); its parameters come first, then the model's, the slice's, the merge's."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="label of a model in `models`")
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Value] = Field(default_factory=dict)


class SliceSpec(BaseModel):
    """A run of output layers merged from equally long layer ranges of its sources."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base: str | None = Field(None, description="label of the source that is the slice's base model")
    parameters: dict[str, Value] = Field(default_factory=dict)


class TokenEmbedding(BaseModel):
    """Where a token's embedding and head rows come from (mergekit's `tokenizer.tokens`)."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = Field(None, description="a model label, or 'zero'")
    token: str | None = Field(None, description="with a model source: take this token's row of that model")
    token_id: int | None = Field(None, description="with a model source: take this row of that model")
    force: bool = False


class TokenizerSpec(BaseModel):
    """The output vocabulary: 'base', 'union' or a model label, plus tokens to add or override."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, ge=1)


class FitnessSpec(BaseModel):
    """How each trial is scored (evomerge.pipelines.fitness): every item, raced, or estimated."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["full", "racing", "estimated"] = "full"
    chunk: int | None = Field(None, ge=1, description="racing: items per step (default a tenth of the items)")
    anchors: int = Field(100, ge=1, description="estimated: items each trial scores")
    rescore: int = Field(5, ge=1, description="estimated: best trials re-scored on every item at the end")
    p_threshold: float = Field(0.05, gt=0, lt=1, description="racing: level of the paired test")


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sampler: Literal["cmaes", "random", "tpe"] = "cmaes"
    trials: int = Field(100, ge=1)
    popsize: int | None = Field(None, ge=2)
    separable: bool = False
    fitness: FitnessSpec = FitnessSpec()
    max_consecutive_failures: int = Field(
        5, ge=0, description="stop when this many trials in a row fail the same way (0: never stop)")


class PSRef(BaseModel):
    """A DFS model that is the exported best of a parameter-space study (PS+DFS)."""

    model_config = ConfigDict(extra="forbid")
    ps_run: str | None = Field(None, description="run folder of a PS study (its best is exported if needed)")
    ps_recipe: str | None = Field(None, description="PS recipe, evolved first when its run has no export")
    run_dir: str | None = Field(None, description="with ps_recipe: its run folder (default runs/<its name>)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.ps_run is None) == (self.ps_recipe is None):
            raise ValueError("give exactly one of ps_run or ps_recipe")
        if self.run_dir and self.ps_run:
            raise ValueError("run_dir goes with ps_recipe; ps_run already names the run folder")
        return self


class DFSSpec(BaseModel):
    """Data-flow-space merge: a path through the layers of A and B (evomerge.merging.dfs)."""

    model_config = ConfigDict(extra="forbid")
    model_a: str | PSRef = Field(description="gives the embeddings, head, tokenizer, first and last layers")
    model_b: str | PSRef
    repeats: int = Field(3, ge=1, description="r: the A-then-B layer sequence is repeated r times")
    scales: Literal["per_target", "full", "none"] = Field(
        "per_target", description="searched hand-over scales: one per target layer, the paper's full "
        "W (every non-natural pair), or none")
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    indicator_margin: float = Field(
        0.5, ge=0, lt=1, description="box-centre offset of the indicators: the CMA-ES mean keeps A's layers")
    fold: Literal["auto", "always", "never"] = Field(
        "auto", description="fold scales into o_proj/down_proj on export (auto: when exact for the architecture)")

    @field_validator("scale_bounds")
    @classmethod
    def _positive_scales(cls, v):
        if not 0 < v[0] < v[1]:
            raise ValueError(f"scale_bounds {list(v)}: need 0 < low < high")
        return v


class LoraSpec(BaseModel):
    """A LoRA fused into the UNet (e.g. SDXL-Lightning's 4-step LoRA)."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="LoRA file, folder or Hub id (diffusers/kohya/peft formats)")
    weight_name: str | None = Field(None, description="file inside a folder or Hub repo")
    scale: float = 1.0
    into: str = Field("merged", description="'merged' (added after every merge) or a model label")


class SDXLSpec(BaseModel):
    """SDXL only: how the merged UNet becomes a pipeline to sample from and to export."""

    model_config = ConfigDict(extra="forbid")
    pipeline: str | None = Field(
        None, description="pipeline folder or Hub id giving text encoders, tokenizers, VAE, scheduler")
    components: dict[str, str] = Field(
        default_factory=dict, description="pipeline components taken from another pipeline, "
        "e.g. text_encoder: stabilityai/japanese-stable-diffusion-xl")
    lora: LoraSpec | None = None
    scheduler: str | None = Field("EulerDiscreteScheduler", description="diffusers scheduler class")
    scheduler_options: dict[str, Any] = Field(default_factory=lambda: {"timestep_spacing": "trailing"})
    steps: int = Field(4, ge=1)
    guidance_scale: float = 0.0
    height: int = Field(1024, ge=8)
    width: int = Field(1024, ge=8)
    search_height: int | None = Field(None, ge=8, description="smaller size for trials (default: height)")
    search_width: int | None = Field(None, ge=8)
    variant: str | None = Field(None, description="Hub weight variant to prefer, e.g. fp16")
    export: Literal["auto", "unet", "pipeline"] = Field(
        "auto", description="auto: a full pipeline folder when `pipeline` is set, else a UNet folder")


class Baseline(BaseModel):
    """A model scored beside the trials: a source as it is, a fixed merge of the sources, or
    (dfs recipes) a fixed layer path."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    source: str | None = Field(None, description="a model label (or base; a or b in a dfs recipe)")
    method: str | None = Field(None, description="a merge method applied with fixed parameters")
    parameters: dict[str, Value] = Field(default_factory=dict)
    values: dict[str, float] | None = Field(None, description="dfs: searched values fixed")
    layers: list[str] | None = Field(None, description="dfs: a layer path, e.g. [a00, a01, b00]")
    scales: list[float] | None = Field(None, description="dfs: with layers, one scale per layer")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("source", "method", "values", "layers") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of source, method (a fixed merge), values or layers (dfs)")
        if self.parameters and self.method is None:
            raise ValueError("parameters go with method")
        if self.scales is not None and self.layers is None:
            raise ValueError("scales go with layers")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "merge"
    modality: Literal["causal_lm", "vlm", "sdxl"] = "causal_lm"
    base: str | None = Field(None, description="base model for task vectors (Hub id or folder)")
    models: list[ModelSpec] = Field(default_factory=list)
    merge: MergeSpec | None = None
    dfs: DFSSpec | None = Field(None, description="a data-flow-space merge instead of models + merge")
    reference: str | None = Field(
        None, description="label of the model whose architecture, config and tokenizer the output takes")
    dtype: str | None = Field(None, description="merge and output dtype; default: the reference's")
    seed: int = 0
    slices: list[SliceSpec] | None = Field(None, description="output layers as slices of the models (frankenmerges)")
    tokenizer: TokenizerSpec | None = Field(None, description="causal_lm: build the output vocabulary")
    chat_template: str | None = Field(None, description="a named template (chatml, llama3...), 'auto' or Jinja text")
    out_dtype: str | None = Field(None, description="dtype of the written tensors (default: dtype)")
    grouping: Literal["blocks", "attn_other", "blocks_attn_other"] = Field(
        "blocks", description="sdxl only: how UNet tensors form groups")
    sdxl: SDXLSpec | None = Field(None, description="sdxl only: pipeline, LoRA and sampling")
    evaluator: dict[str, Any] | None = None
    baselines: list[dict[str, Any]] = Field(default_factory=list)
    search: SearchSpec = Field(default_factory=SearchSpec)
    root: str | None = Field(
        None, description="folder that relative paths resolve against (default: the recipe file's)")

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_specs(cls, v):
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("evaluator", mode="before")
    @classmethod
    def _evaluator_typed(cls, v):
        """Checked against its kind's schema; kept as the dict the evaluators read."""
        if not isinstance(v, dict):
            return v
        kind = v.get("kind")
        if kind not in EVALUATOR_SPECS:
            raise ValueError(f"kind {kind!r} is not an evaluator kind (use one of: {', '.join(EVALUATOR_SPECS)})")
        return EVALUATOR_SPECS[kind].model_validate(v).model_dump(exclude_unset=True, by_alias=True)

    @field_validator("baselines", mode="before")
    @classmethod
    def _baselines_typed(cls, v):
        if not isinstance(v, list):
            return v
        specs = TypeAdapter(list[Baseline]).validate_python(v)  # errors keep the item's index
        names = [b.name for b in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"two baselines share a name {names}: give each a distinct name")
        return [b.model_dump(exclude_defaults=True) | {"name": b.name} for b in specs]

    @model_validator(mode="after")
    def _labels_unique(self):
        if self.dfs is not None:  # a DFS recipe names its two models in dfs:
            if self.models or self.merge or self.base:
                raise ValueError("a dfs recipe takes its models from dfs.model_a/model_b: drop models, merge and base")
            if self.modality != "causal_lm":
                raise ValueError("dfs merges need modality causal_lm")
            if any("method" in b for b in self.baselines):
                raise ValueError("a dfs recipe's baselines take source, values or layers, not method")
            return self
        if any("values" in b or "layers" in b for b in self.baselines):
            raise ValueError("baselines with values or layers are for dfs recipes; use source or method")
        labels = [m.label for m in self.models]
        if "grouping" in self.model_fields_set and self.modality != "sdxl":
            raise ValueError("grouping applies to sdxl recipes only; remove it")
        if self.sdxl is not None and self.modality != "sdxl":
            raise ValueError("an sdxl: block needs modality: sdxl")
        if self.sdxl is not None and self.sdxl.lora is not None:
            into = self.sdxl.lora.into
            if into not in ["merged", *labels] + (["base"] if self.base else []):
                raise ValueError(f"sdxl.lora.into {into!r}: use 'merged' or a model label ({', '.join(labels)})")
        if len(set(labels)) != len(labels):
            raise ValueError(f"two models share the label {labels}: give each a distinct `name`")
        if not self.models:
            raise ValueError("`models` is empty: name at least one model to merge")
        if self.merge is None:
            raise ValueError("`merge` is missing: give a merge method (or a dfs: block)")
        return self


def input_paths(recipe: Recipe) -> list[str]:
    """Every model, pipeline or LoRA the recipe reads (paths or Hub ids): an output must not overlap one."""
    refs = [recipe.base] + [m.model for m in recipe.models] + [m.lora for m in recipe.models]
    if recipe.dfs is not None:
        refs += [r for r in (recipe.dfs.model_a, recipe.dfs.model_b) if isinstance(r, str)]
    if recipe.sdxl is not None:
        refs += [recipe.sdxl.pipeline, *recipe.sdxl.components.values()]
        refs += [recipe.sdxl.lora.path] if recipe.sdxl.lora else []
    return [r for r in refs if r]


def _format_validation_error(path: Path, data: Any, e: ValidationError) -> str:
    """One line for the most telling error. pydantic's locations also name the union members
    it tried (``weight.bool``): those are skipped, and a value no member takes is reported
    with the members as what was expected."""
    errors = e.errors()
    # an error inside a member that took the value's type says more than "not a bool"
    err = min(errors, key=lambda x: (x["type"] != "extra_forbidden", x["type"].endswith("_type"), -len(x["loc"])))
    where, tags, node = [], [], data
    for i, part in enumerate(err["loc"]):
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                and part < len(node):
            where.append(str(part))
            node = node[part]
        elif err["type"] == "missing" and i == len(err["loc"]) - 1:
            where.append(str(part))
        else:
            tags.append(str(part))
    field = ".".join(where) or "(top level)"
    msg = err["msg"].splitlines()[0].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (a typo?); remove it or check the documented keys"
    elif tags and err["type"].endswith("_type"):
        tried = dict.fromkeys(re.sub(r"^function-\w+\[.*, (\w+)\]$", r"\1", str(x["loc"][len(where)]))
                              for x in errors if len(x["loc"]) > len(where))
        shown = repr(node) if len(repr(node)) <= 40 else type(node).__name__
        msg = f"{shown} does not fit (expected one of: {', '.join(tried)})"
    return f"{path}: field {field}: {msg}"


def load_recipe(path: str | Path) -> Recipe:
    """Read an evomerge recipe or a mergekit YAML, with one-line errors naming the field."""
    path = Path(path)
    text = read_text(path, "YAML recipe")
    if fields := template_fields(text):
        raise EvomergeError(f"{path}: a template: set {', '.join(fields)} (evomerge demo fills it in)")
    return recipe_from_data(parse_yaml(text, path, "YAML recipe"), path, path.parent)


def recipe_from_data(data: object, where: str | Path, folder: Path) -> Recipe:
    """A recipe from parsed YAML (an evomerge recipe or a mergekit config), its relative paths
    resolved from ``folder``; ``where`` names it in errors."""
    if not isinstance(data, dict):
        raise EvomergeError(f"{where}: expected a mapping at the top level")
    mergekit = "merge_method" in data
    if mergekit:
        from evomerge.mergekit_yaml import from_mergekit

        data = from_mergekit(data, str(where))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise EvomergeError(_format_validation_error(Path(where), data, e)) from None
    # mergekit reads a relative model path from the working directory, as mergekit-yaml does
    return resolve_recipe_paths(recipe, Path.cwd() if mergekit else folder)
