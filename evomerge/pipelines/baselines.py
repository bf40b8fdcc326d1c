"""Baselines scored beside the trials: each source alone, and fixed merges (plain average,
TIES with its defaults...), so a report can show "evolved vs sources".

A baseline spec is ``{name: NAME, source: LABEL}`` (a source model as it is; ``base`` for the
base) or ``{name: NAME, method: METHOD, parameters: {...}}`` (a fixed merge of the recipe's
models with another method).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from evomerge.errors import EvomergeError
from evomerge.merging.engine import MergeEngine
from evomerge.merging.registry import get_method
from evomerge.merging.space import ValueTable


def baseline_tensors(session, spec: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) for every merged tensor of a baseline, ready to copy in place."""
    engine = session.engine
    if "source" in spec:
        by_label = {s.label: s for s in session.sources + ([session.base] if session.base else [])}
        if spec["source"] not in by_label:
            raise EvomergeError(f"baselines: {spec['name']}: no model labelled {spec['source']!r} "
                                f"(labels: {sorted(by_label)})")
        src = by_label[spec["source"]]
        for job in engine.jobs:
            if job.merge:
                t = src.read(job.name, engine.dtype)
                yield job.name, (t[: job.rows] if job.rows is not None else t)
        return
    if "method" not in spec:
        raise EvomergeError(f"baselines: {spec.get('name')}: give `source:` or `method:`")
    method = get_method(spec["method"])
    fixed = MergeEngine(session.adapter, engine.reference, session.base, session.sources, method,
                        dtype=engine.dtype, device=engine.device, seed=engine.seed)
    table = ValueTable(method, tuple(session.labels), dict(spec.get("parameters", {})),
                       {}, {})
    fixed.check_values(table)
    for job, tensor in fixed.iter_merged(table):
        if job.merge:
            yield job.name, (tensor[: job.rows] if job.rows is not None else tensor)
