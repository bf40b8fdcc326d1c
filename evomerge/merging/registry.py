"""The merge-method registry: a method is a plain function, and its signature says what it takes.

A method's first argument is the stacked inputs (``inputs="deltas"``: task vectors against a
base, the engine adds the base back; ``"models"``: the models themselves). Every other argument
is declared once, in the signature, by its annotation:

- a **value** (:class:`Value`): a number or flag a recipe fixes or a study searches, per source
  (a list with one entry per model) or shared, with its bounds (``None``: fixed only);
- an **option** (:class:`Option`): one of a few named choices set for the whole merge
  (``tie_order``, ``rescale``), not searched;
- ``rng`` (:data:`Generators`): one generator per source, seeded per tensor by the engine;
- ``base`` (:data:`Base`, or :data:`OptionalBase` defaulting to None): the base model's tensor
  itself, for methods on models whose math also reads the base (model_stock, nearswap).

The default in the signature is the value's default (per-source defaults apply to each source);
no default means the recipe must give it. A trailing underscore is dropped from the name
(``lambda_`` is the value ``lambda``). Example::

    >>> from evomerge.merging.registry import merge_method, Weights, get_method
    >>> @merge_method("halfway", inputs="models")
    ... def halfway(models, weight: Weights):
    ...     "Weighted sum, halved."
    ...     return sum(w * x for w, x in zip(weight, models)) / 2
    >>> [(p.name, p.per_source, p.bounds) for p in get_method("halfway").params]
    [('weight', True, (-10.0, 10.0))]
    >>> del REGISTRY["halfway"]
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Value:
    """Annotation marker: a recipe value, per source or shared, searchable within ``bounds``."""

    per_source: bool = False
    bounds: tuple[float, float] | None = None


@dataclass(frozen=True)
class Option:
    """Annotation marker: a named choice for the whole merge."""

    choices: tuple[str, ...]


@dataclass(frozen=True)
class _Rng:
    """Annotation marker: per-source generators, seeded per tensor by the engine."""


@dataclass(frozen=True)
class _Base:
    """Annotation marker: the base model's tensor (``required``: the recipe must name a base)."""

    required: bool


Floats = Sequence[float]
Weights = Annotated[Floats, Value(per_source=True, bounds=(-10.0, 10.0))]
Densities = Annotated[Floats, Value(per_source=True, bounds=(0.0, 1.0))]
Scale = Annotated[float, Value(bounds=(-10.0, 10.0))]
Fraction = Annotated[float, Value(bounds=(0.0, 1.0))]
Flag = Annotated[bool, Value()]
Setting = Annotated[float, Value()]  # a fixed number, not searched (iterations, tolerances)
Generators = Annotated[Sequence[torch.Generator], _Rng()]
Base = Annotated[torch.Tensor, _Base(required=True)]
OptionalBase = Annotated[torch.Tensor | None, _Base(required=False)]


@dataclass(frozen=True)
class ParamSpec:
    """One value a method takes, read from its signature."""

    name: str
    default: float | bool | None
    per_source: bool
    bounds: tuple[float, float] | None = None  # allowed range for searched/fixed values


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    inputs: Literal["deltas", "models"]
    params: tuple[ParamSpec, ...]
    options: dict[str, tuple[tuple[str, ...], str]]  # name -> (choices, default)
    needs_rng: bool
    base: Literal["none", "optional", "required"]  # models methods: whether they read the base
    sources: int | None  # exactly this many models (slerp: 2), or any number
    min_sources: int
    doc: str
    _arg_names: dict[str, str]  # value name -> Python argument name (lambda -> lambda_)

    @property
    def on_deltas(self) -> bool:
        return self.inputs == "deltas"

    @property
    def exact_sources(self) -> int | None:
        return self.sources

    def takes_base(self, has_base: bool) -> bool:
        """Whether the method reads the base model (as task-vector origin or as a tensor)."""
        return self.on_deltas or self.base == "required" or (self.base == "optional" and has_base)

    def check_inputs(self, has_base: bool, n_sources: int) -> None:
        """Refuse a merge the method cannot do: no base where it needs one, a wrong model count."""
        if (self.on_deltas or self.base == "required") and not has_base:
            what = "merges task vectors" if self.on_deltas else "reads the base model"
            raise EvomergeError(f"method {self.name!r} {what}: set `base` (the common ancestor)")
        if self.sources and n_sources != self.sources:
            raise EvomergeError(f"method {self.name!r} takes exactly {self.sources} model"
                                f"{'s' if self.sources > 1 else ''} besides the base, got {n_sources}")
        if n_sources < self.min_sources:
            raise EvomergeError(f"method {self.name!r} takes at least {self.min_sources} models "
                                f"besides the base, got {n_sources}")

    def __call__(self, stacked: torch.Tensor, *args, **values) -> torch.Tensor:
        return self.fn(stacked, *args, **{self._arg_names.get(k, k): v for k, v in values.items()})

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params)
        raise EvomergeError(f"method {self.name!r} has no parameter {name!r} (it takes: {known})")

    def bind_options(self, options: Mapping[str, str]) -> dict[str, str]:
        """The options this method takes, checked; an option it does not take is refused."""
        for key, value in options.items():
            if key not in self.options:
                takes = ", ".join(self.options) or "none"
                raise EvomergeError(f"merge.{key}: method {self.name!r} has no option {key!r} "
                                    f"(its options: {takes}); remove it")
            choices = self.options[key][0]
            if value not in choices:
                raise EvomergeError(f"merge.{key}: {value!r}; use one of {', '.join(choices)}")
        return dict(options)


REGISTRY: dict[str, MergeMethod] = {}


def merge_method(name: str, *, inputs: Literal["deltas", "models"], sources: int | None = None,
                 min_sources: int = 1):
    """Register ``fn`` under ``name``; its values, options and needs come from its signature."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        hints = typing.get_type_hints(fn, include_extras=True)
        params, options, arg_names, needs_rng, base = [], {}, {}, False, "none"
        for arg in list(inspect.signature(fn).parameters.values())[1:]:
            marker = next(iter(getattr(hints.get(arg.name), "__metadata__", ())), None)
            default = None if arg.default is inspect.Parameter.empty else arg.default
            public = arg.name.rstrip("_")
            if isinstance(marker, Value):
                params.append(ParamSpec(public, default, marker.per_source, marker.bounds))
                arg_names[public] = arg.name
            elif isinstance(marker, Option):
                options[public] = (marker.choices, default)
            elif isinstance(marker, _Rng):
                needs_rng = True
            elif isinstance(marker, _Base) and inputs == "models":
                base = "required" if marker.required else "optional"
            else:
                raise TypeError(f"merge method {name}: argument {arg.name} needs a Value, Option, "
                                "Generators or (models methods) Base annotation")
        REGISTRY[name] = MergeMethod(name, fn, inputs, tuple(params), options, needs_rng, base,
                                     sources, min_sources, (fn.__doc__ or "").strip(), arg_names)
        return fn

    return register


def each(values: Floats | float, stacked: torch.Tensor) -> list[float]:
    """A per-source value as one number per source (a bare default applies to every source)."""
    return list(values) if isinstance(values, Sequence) else [values] * len(stacked)


def method_names() -> list[str]:
    """Every registered method's name, the built-in ones included."""
    import evomerge.merging.geometry  # noqa: F401  (registers the built-in methods)
    import evomerge.merging.methods  # noqa: F401

    return sorted(REGISTRY)


def get_method(name: str) -> MergeMethod:
    if name not in method_names():
        raise EvomergeError(
            f"unknown merge method {name!r}: use one of {', '.join(method_names())}"
        )
    return REGISTRY[name]
