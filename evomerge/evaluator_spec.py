"""What a recipe's ``evaluator:`` block may say, per kind: every key typed, unknown keys refused.

The evaluators read their spec as a dict (see evomerge/evaluators/); these models only decide
which dicts are valid, so a misspelt option (``max_new_token``) fails at load time instead of
silently running with the default for a thousand trials.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    # strict: "yes" is not a boolean and "5" is not a number; no inf/nan anywhere
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Source(_Strict):
    """Where the items come from (evomerge.evaluators.data.load_rows) and how to slice them."""

    path: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str | None = None
    offset: Count | None = None
    limit: Count | None = None


class _DataKeys(_Source):
    """A source of questions with their answers."""

    question_field: str | None = None
    answer_field: str | None = None


class MathData(_DataKeys):
    pass


class VQAData(_DataKeys):
    image_field: str | None = None
    qas_field: str | None = None


class _TextEvaluator(_DataKeys):
    name: str | None = None
    metric: Literal["robust", "sakana"] | None = None
    prompt: str | None = None
    max_new_tokens: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    require_japanese: bool | None = None
    language_model: str | None = None
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _has_data(self):
        data = getattr(self, "data", None)
        if data is None and self.path is None and self.hub is None:
            raise ValueError("give data: {path: FILE} or data: {hub: ID}")
        return self


class JaMathSpec(_TextEvaluator):
    kind: Literal["ja_math"]
    data: str | MathData | None = None
    chat: bool | None = None
    stop: str | list[str] | None = None


class JaVQASpec(_TextEvaluator):
    kind: Literal["ja_vqa"]
    data: str | VQAData | None = None
    image_field: str | None = None
    qas_field: str | None = None
    system: str | None = None
    model_class: Literal["auto", "llava"] | None = None
    num_beams: PositiveInt | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    processor: str | None = None


class ClipReference(_Strict):
    images: str
    weight: float = 1.0


class ClipScoreSpec(_Strict):
    kind: Literal["clip_score"]
    name: str | None = None
    prompts: str | list[str]
    limit: Count | None = None
    model: str | None = None
    pretrained: str | None = None
    model_config_path: str | None = Field(None, alias="model_config")
    checkpoint: str | None = None
    device: str | None = None
    seed: int | None = None
    batch_size: PositiveInt | None = None
    steps: PositiveInt | None = None
    guidance_scale: float | None = None
    height: Annotated[int, Field(ge=8)] | None = None
    width: Annotated[int, Field(ge=8)] | None = None
    resolution: Literal["search", "full"] | None = None
    weight: float | None = None
    references: list[ClipReference] | None = None
    grid_dir: str | None = None
    save: Literal["best", "all", "none"] | None = None
    grid_cell: PositiveInt | None = None


class LossSpec(_Strict):
    kind: Literal["loss"]
    name: str | None = None
    data: _Source  # texts: no question or answer fields to name
    text_field: str | None = None
    offset: Count | None = None
    limit: Count | None = None
    batch_size: PositiveInt | None = None
    max_length: Annotated[int, Field(ge=2)] | None = None


class PythonSpec(_Strict):
    kind: Literal["python"]
    name: str | None = None
    callable: str = Field(pattern=r"^[\w.]+:[\w.]+$", description="module:function")
    options: dict[str, Any] = Field(default_factory=dict)


EVALUATOR_SPECS: dict[str, type[BaseModel]] = {
    "ja_math": JaMathSpec, "ja_vqa": JaVQASpec, "clip_score": ClipScoreSpec, "loss": LossSpec,
    "python": PythonSpec}
