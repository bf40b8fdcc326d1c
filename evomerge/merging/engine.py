"""The merge engine: for every tensor, look up its group and values, call the method, write.

Two targets share one loop. The *trial* path writes merged tensors straight into a resident
model's parameters: sources are read once, task vectors (``source - base``) computed once and
kept on the merge device, and each trial only does the method's arithmetic and a copy into the
live parameter. The *export* path streams: read a tensor from each source, merge, write it to
its place in the safetensors shards, forget it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from evomerge.checkpoint import read_tensor
from evomerge.errors import EvomergeError
from evomerge.merging import fused, kernels
from evomerge.merging.registry import MergeMethod
from evomerge.merging.space import ValueTable
from evomerge.merging.sparsify import rng_for
from evomerge.merging.threads import chunk_threads, for_chunks, parallel_map
from evomerge.modalities.base import Adapter, TensorSource


def subtract_base(stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """In place, ``stacked[i] -= base`` for every source: the task vectors, column chunks on
    threads (a fused kernel measured only 1.1x over this)."""
    if not stacked.is_contiguous() or stacked.device.type != "cpu":
        return stacked.sub_(base)
    rows, base_flat = stacked.view(len(stacked), -1), base.reshape(-1)
    for_chunks(rows.shape[1], lambda start, end, _: rows[:, start:end].sub_(base_flat[start:end]))
    return stacked


@dataclass(frozen=True)
class Job:
    """One output tensor: merged across the inputs, or kept from the reference."""

    name: str
    group: str
    depth: float  # 0..1, for values interpolated over depth
    merge: bool
    rows: int | None  # vocab tensors of different sizes: the shared leading rows that merge


PARALLEL_READ_BYTES = 1 << 20  # smaller reads cost less than handing them to a thread


class BufferPool:
    """Named buffers reused from tensor to tensor while exporting.

    Each buffer is sized for the largest tensor once: fresh allocations of this size are
    served by new pages, and faulting them in costs more than the merge arithmetic itself.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        flat = self._flat.get((name, dtype))
        if flat is None or flat.numel() < n:
            flat = self._flat[(name, dtype)] = torch.empty(max(n, self.capacity), dtype=dtype)
        return flat[:n].view(shape)


class MergeEngine:
    """Merges one set of models with one method; reusable across many sets of values."""

    def __init__(self, adapter: Adapter, reference: TensorSource, base: TensorSource | None,
                 sources: list[TensorSource], method: MergeMethod, *, dtype: torch.dtype,
                 device: str = "cpu", seed: int = 0, options: Mapping[str, str] | None = None,
                 allow_nonfinite: bool = False):
        method.check_inputs(base is not None, len(sources))
        self.adapter, self.reference, self.base, self.sources = adapter, reference, base, sources
        self.method, self.dtype, self.device, self.seed = method, dtype, device, seed
        self.options = method.bind_options(options or {})  # e.g. tie_order, rescale
        self.allow_nonfinite = allow_nonfinite
        if torch.device(device).type == "cpu":
            kernels.warn_if_missing()
        self.jobs = self._plan()
        # trial path: name -> (base, deltas or models, what fused.prepare made of them)
        self._cache: dict[str, tuple[torch.Tensor | None, torch.Tensor, object]] = {}

    # -- planning and validation (before any work is written) ---------------------------------

    @property
    def inputs(self) -> list[TensorSource]:
        return ([self.base] if self.reads_base else []) + self.sources

    @property
    def reads_base(self) -> bool:
        """Whether the method reads the base (task-vector origin, or a tensor it uses)."""
        return self.base is not None and self.method.takes_base(True)

    def _plan(self) -> list[Job]:
        jobs = []
        for name in self.reference.names():
            group = self.adapter.group(name)
            depth = self.adapter.layer_fraction(name, self.reference)
            role = self.adapter.merge_role(name, self.reference)
            if role == "skip":
                continue
            merge = role == "merge" and self.reference.dtype(name).is_floating_point
            rows = None
            if merge:
                ref_shape = self.reference.shape(name)
                shapes = []
                for src in self.inputs:
                    if name not in src:
                        raise EvomergeError(
                            f"model {src.label}: tensor {name} is missing (present in {self.reference.label}); "
                            "merge models of the same architecture")
                    shapes.append(src.shape(name))
                if any(s != ref_shape for s in shapes):
                    same_but_rows = all(s[1:] == ref_shape[1:] for s in shapes)
                    if not (self.adapter.is_vocab(name) and same_but_rows):
                        bad = next(src for src, s in zip(self.inputs, shapes, strict=True) if s != ref_shape)
                        raise EvomergeError(
                            f"model {bad.label}: tensor {name} has shape {list(bad.shape(name))}, "
                            f"{self.reference.label} has {list(ref_shape)}; merge models of the same architecture")
                    rows = min([s[0] for s in shapes] + [ref_shape[0]])
            jobs.append(Job(name, group, depth, merge, rows))
        order = {g: i for i, g in enumerate(self.adapter.groups([j.name for j in jobs]))}
        return sorted(jobs, key=lambda j: order[j.group])  # stable: one pass per group

    def check_values(self, table: ValueTable) -> None:
        """Raise on missing or out-of-range values, before any output exists."""
        for job in self.jobs:
            if job.merge:
                table.check_ranges(job.name, job.group, job.depth)

    # -- the math for one tensor --------------------------------------------------------------

    def _shape(self, job: Job) -> tuple[int, ...]:
        shape = self.reference.shape(job.name)
        return shape if job.rows is None else (job.rows, *shape[1:])

    def _read_inputs(self, job: Job, pool: BufferPool | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(base, stacked deltas) for task-vector methods, (None, stacked models) otherwise.

        On the CPU each tensor is read straight into its slot of the stacked tensor (no
        torch.stack copy), into ``pool``'s reused buffers when given.
        """
        if torch.device(self.device).type != "cpu":
            return self._read_inputs_to_device(job)
        n, shape = len(self.sources), self._shape(job)
        if pool is not None:
            stacked = pool.get("stacked", (n, *shape), self.dtype)
        else:
            stacked = torch.empty((n, *shape), dtype=self.dtype)
        reads = [(src, stacked[i]) for i, src in enumerate(self.sources)]
        base = None
        if self.reads_base:
            base = pool.get("base", shape, self.dtype) if pool is not None else torch.empty(shape, dtype=self.dtype)
            reads.append((self.base, base))
        # one thread per file read: copying out of the page cache is most of a read's cost
        parallel_map(lambda read: self._read_into(read[0], job, read[1]), reads,
                     parallel=stacked.nbytes >= PARALLEL_READ_BYTES)
        self._check_finite(job, [(src, t) for src, t in reads])
        if base is not None and self.method.on_deltas:
            subtract_base(stacked, base)
        return base, stacked

    def _read_into(self, src: TensorSource, job: Job, dest: torch.Tensor) -> None:
        entry = src.entries.get(job.name)
        if (entry is not None and job.name not in src.loaded and job.rows is None
                and entry.dtype == dest.dtype):
            read_tensor(entry, out=dest)  # one positioned read, no intermediate tensor
        else:
            t = src.read(job.name, self.dtype)
            dest.copy_(t[: job.rows] if job.rows is not None else t)

    def _read_inputs_to_device(self, job: Job) -> tuple[torch.Tensor | None, torch.Tensor]:
        def read(src: TensorSource) -> torch.Tensor:
            t = src.read(job.name, self.dtype)
            return (t[: job.rows] if job.rows is not None else t).to(self.device)

        stacked = torch.stack([read(s) for s in self.sources])
        base = read(self.base) if self.reads_base else None
        self._check_finite(job, list(zip(self.sources, stacked, strict=True))
                           + ([(self.base, base)] if base is not None else []))
        if base is None:
            return None, stacked
        if self.method.on_deltas:
            stacked -= base
        return base, stacked

    def _check_finite(self, job: Job, read: list[tuple[TensorSource, torch.Tensor]]) -> None:
        """Refuse NaN/inf in a source (it would spread through the merge into the output).
        One summing pass per tensor; only a non-finite sum (or an overflow) looks closer."""
        if self.allow_nonfinite or all(math.isfinite(t.sum(dtype=torch.float32)) for _, t in read):
            return
        for src, t in read:
            if not torch.isfinite(t).all():
                raise EvomergeError(f"model {src.label}: tensor {job.name} holds NaN or inf values; "
                                    "fix the checkpoint, or pass --allow-nonfinite to merge it anyway")

    def _merge(self, job: Job, base: torch.Tensor | None, stacked: torch.Tensor,
               table: ValueTable, prepared: object = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged tensor; written into ``out`` (same shape, engine dtype) when given."""
        per_source, shared = table.for_tensor(job.name, job.group, job.depth)
        values = {**per_source, **shared, **self.options}
        if self.method.needs_rng:
            values["rng"] = [rng_for(self.seed, job.name, i, stacked.device) for i in range(len(self.sources))]
        merged = fused.merge(self.method, stacked, values, base=base, out=out, prepared=prepared)
        if merged is not None:  # the kernels took it (base added, written into ``out``)
            return merged
        if self.method.on_deltas:
            result = base + self.method(stacked, **values)
        elif base is not None:  # a method on the models that also reads the base
            result = self.method(stacked, base=base, **values)
        else:
            result = self.method(stacked, **values)
        result = result.to(self.dtype)
        return result if out is None else out.copy_(result)

    # -- the two targets ----------------------------------------------------------------------

    def merge_into(self, params: dict[str, torch.Tensor], table: ValueTable,
                   progress: Callable[[Job], None] | None = None) -> None:
        """Trial path: write merged values into a resident model's tensors, in place."""
        with torch.no_grad(), chunk_threads():
            for job in self.jobs:
                if not job.merge:
                    continue
                if job.name not in self._cache:
                    base, stacked = self._read_inputs(job)
                    prepared = fused.prepare(self.method, stacked)
                    self._cache[job.name] = (base, stacked, prepared)
                base, stacked, prepared = self._cache[job.name]
                target = params[job.name]
                target = target[: job.rows] if job.rows is not None else target
                self._merge(job, base, stacked, table, prepared, out=target)
                if progress:
                    progress(job)

    def iter_merged(self, table: ValueTable, reuse_buffers: int = 0
                    ) -> Iterator[tuple[Job, torch.Tensor]]:
        """Export path: each output tensor in turn, merged (or kept), full shape.

        With ``reuse_buffers=K`` merged tensors are written into K buffers in turn, so a
        yielded tensor stays valid only until K more have been asked for (write it out first).
        """
        pool = None
        if reuse_buffers and torch.device(self.device).type == "cpu":
            sizes = [math.prod(self._shape(j)) for j in self.jobs if j.merge]
            pool = BufferPool(max(sizes, default=0))
        with torch.no_grad(), chunk_threads():
            for i, job in enumerate(self.jobs):
                if not job.merge:
                    yield job, self.reference.read(job.name)
                    continue
                base, stacked = self._read_inputs(job, pool)
                out = None
                if pool is not None:
                    out = pool.get(f"out{i % reuse_buffers}", self._shape(job), self.dtype)
                merged = self._merge(job, base, stacked, table, out=out)
                if job.rows is not None:
                    full = self.reference.read(job.name, self.dtype)
                    full[: job.rows] = merged.cpu()
                    merged = full
                yield job, merged

    def output_dtype(self, job: Job) -> torch.dtype:
        return self.dtype if job.merge else self.reference.dtype(job.name)
