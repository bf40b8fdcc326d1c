"""The searchable merge values: their names, bounds and granularity, and how a flat set of
values turns into the numbers one tensor's merge takes.

Value names are stable and readable. For a per-source value (weight, density) they read
``{source}/{param}`` (per source), ``{group}/{source}/{param}`` (per group) or ``{param}``
(global: one value for every source); a shared value (slerp's ``t``, ``lambda``) reads
``{param}`` or ``{group}/{param}``. Example: ``layers.12/shisa/weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.errors import EvomergeError
from evomerge.merging.registry import MergeMethod
from evomerge.recipe import Conditional, MergeSpec, Value


def value_name(param: str, *, group: str | None = None, source: str | None = None) -> str:
    return "/".join(p for p in (group, source, param) if p is not None)


@dataclass(frozen=True)
class SearchSpace:
    """Which values a study searches. ``names`` is the order of the flat vector."""

    method: MergeMethod
    sources: tuple[str, ...]
    groups: tuple[str, ...]
    bounds_by_param: dict[str, tuple[float, float]]
    granularity: str

    @classmethod
    def from_spec(cls, spec: MergeSpec, method: MergeMethod, sources: list[str],
                  groups: list[str]) -> SearchSpace:
        for param, (lo, hi) in spec.search.items():
            p = method.param(param)
            if p.bounds is None or lo > hi or lo < p.bounds[0] or hi > p.bounds[1]:
                allowed = f"within {list(p.bounds)}" if p.bounds else "not searchable"
                raise EvomergeError(f"merge.search.{param}: bounds [{lo}, {hi}] invalid ({allowed})")
        return cls(method, tuple(sources), tuple(groups), dict(spec.search), spec.granularity)

    def _slots(self, param: str) -> list[tuple[str | None, str | None]]:
        per_source = self.method.param(param).per_source
        sources = self.sources if per_source and self.granularity != "global" else (None,)
        groups = self.groups if self.granularity == "per_group" else (None,)
        return [(g, s) for g in groups for s in sources]

    @property
    def names(self) -> list[str]:
        return [value_name(p, group=g, source=s) for p in self.bounds_by_param for g, s in self._slots(p)]

    def bounds(self, name: str) -> tuple[float, float]:
        return self.bounds_by_param[name.rsplit("/", 1)[-1]]

    def __len__(self) -> int:
        return len(self.names)


def evaluate_value(value: Value, tensor_name: str, depth: float) -> float | bool | None:
    """A fixed value for one tensor: lists interpolate over depth (0..1), filters match names."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Conditional):
        value = [value]
    if value and all(isinstance(v, Conditional) for v in value):
        for cond in value:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_value(cond.value, tensor_name, depth)
        return None
    scaled = depth * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


@dataclass
class ValueTable:
    """Everything one merge needs to pick its numbers: fixed recipe values + searched values."""

    method: MergeMethod
    sources: tuple[str, ...]
    shared_fixed: dict[str, Value]
    per_source_fixed: dict[str, dict[str, Value]]
    searched: dict[str, float]
    granularity: str = "per_source"

    def _searched(self, param: str, group: str, source: str | None) -> float | None:
        for name in (value_name(param, group=group, source=source), value_name(param, source=source),
                     value_name(param, group=group), param):
            if name in self.searched:
                return self.searched[name]
        return None

    def for_tensor(self, tensor_name: str, group: str, depth: float) -> tuple[dict, dict]:
        """(per-source lists, shared values) for one tensor, e.g. ({'weight': [..]}, {'t': .3})."""
        per_source: dict[str, list] = {}
        shared: dict = {}
        for p in self.method.params:
            if p.per_source:
                values = [self._one(p.name, p.default, tensor_name, group, depth, s) for s in self.sources]
                per_source[p.name] = values
            else:
                shared[p.name] = self._one(p.name, p.default, tensor_name, group, depth, None)
        return per_source, shared

    def _one(self, param, default, tensor_name, group, depth, source):
        v = self._searched(param, group, source)
        if v is not None:
            return v
        for fixed in (self.per_source_fixed.get(source, {}) if source else {}, self.shared_fixed):
            if param in fixed:
                got = evaluate_value(fixed[param], tensor_name, depth)
                if got is not None:
                    return got
        if default is None:
            who = f"model {source}" if source else "merge.parameters"
            raise EvomergeError(f"{who}: no value for {param!r} of method {self.method.name!r}; set it or search it")
        return default

    def check_ranges(self, tensor_name: str, group: str, depth: float) -> None:
        per_source, shared = self.for_tensor(tensor_name, group, depth)
        for p in self.method.params:
            if p.bounds is None:
                continue
            values = per_source[p.name] if p.per_source else [shared[p.name]]
            owners = [f"model {s}" for s in self.sources] if p.per_source else ["merge.parameters"]
            for v, who in zip(values, owners, strict=True):
                if not p.bounds[0] <= float(v) <= p.bounds[1]:
                    raise EvomergeError(
                        f"{who}: {p.name}={v} for tensor {tensor_name} is outside {list(p.bounds)}; fix the recipe")
