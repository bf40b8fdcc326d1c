"""The fused CPU kernels against the torch code they replace: the same bits, every dtype."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from evomerge.checkpoint import PlannedTensor, ShardedSafetensorsWriter, WriteBehind
from evomerge.errors import EvomergeError
from evomerge.merging import fused, kernels
from evomerge.merging.engine import subtract_base
from evomerge.merging.fused import magnitude_histograms, ties_prepare
from evomerge.merging.methods import get_method
from evomerge.merging.threads import CHUNK, chunk_threads

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(BITS[x.dtype])


def task_vectors(dtype, n=3, cols=CHUNK + 1000, seed=0):
    """Deltas on a coarse grid (many exact magnitude ties, zeros, -0), a base with -0 entries."""
    g = torch.Generator().manual_seed(seed)
    deltas = (torch.round(torch.randn(n, cols, generator=g) * 12) / 256).to(dtype)
    deltas[0, ::13] = -0.0
    base = torch.randn(cols, generator=g).to(dtype)
    base[::17] = -0.0
    return deltas, base


def torch_merge(name, stacked, base=None, **values):
    """What the engine computes when the kernels do not take a merge: the method's torch
    function, plus the base, rounded to the inputs' dtype."""
    result = get_method(name)(stacked, **values)
    return result if base is None else (base + result).to(stacked.dtype)


def fused_merge(name, stacked, base=None, prepared=None, **values):
    """The kernels' run of the same merge; they must take it (else this compares torch with torch)."""
    got = fused.merge(get_method(name), stacked, values, base=base, prepared=prepared)
    assert got is not None, "the kernels did not take this merge"
    return got


def test_the_kernels_are_built():
    # `pip install` compiles them (setup.py); a failed build would leave only the torch code
    assert kernels.available()
    assert all(kernels.supports(torch.empty(1, dtype=d)) for d in DTYPES)
    assert not kernels.supports(torch.empty(1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_ties_kernel_equals_torch_bit_for_bit(dtype, normalize, lam):
    deltas, base = task_vectors(dtype)
    cases = [([0.3, -0.2, 0.9], [0.5, 1.0, 0.3]), ([1.0, 1.0, 1.0], [0.0, 0.25, 0.999]),
             ([0.4, 0.4, 0.2], [1.0, 1.0, 1.0])]
    for weight, density in cases:
        values = {"weight": weight, "density": density, "normalize": normalize, "lambda": lam}
        expected = torch_merge("ties", deltas, base, **values)
        got = fused_merge("ties", deltas, base, **values)
        assert torch.equal(bits(got), bits(expected)), (weight, density)
        got_delta = fused_merge("ties", deltas, **values)
        assert torch.equal(bits(got_delta), bits(torch_merge("ties", deltas, **values)))
        with chunk_threads():  # chunks on threads, histograms in pieces: still the same bits
            threaded = fused_merge("ties", deltas, base, prepared=ties_prepare(deltas), **values)
        assert torch.equal(bits(threaded), bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 4, 5, 9, 20])
def test_ties_kernel_on_real_shaped_values(dtype, n):
    # float32 from five sources on runs torch (it sums more rows in another order): same bits
    g = torch.Generator().manual_seed(n)
    base = torch.randn(300, 701, generator=g).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(300, 701, generator=g)).to(dtype) for _ in range(n)]
    deltas = torch.stack(models) - base
    values = {"weight": torch.rand(n, generator=g).tolist(), "density": torch.rand(n, generator=g).tolist()}
    expected = torch_merge("ties", deltas, base, **values)
    got = fused.merge(get_method("ties"), deltas, values, base=base)
    if got is None:  # float32 beyond four sources: the engine runs torch
        assert dtype == torch.float32 and n > fused.FUSED_FLOAT32_SOURCES
    else:
        assert torch.equal(bits(got), bits(expected))


def same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, except that a NaN need only meet a NaN (torch's own payloads vary)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a)[~nan], bits(b)[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_kernel_with_nan_and_inf(dtype):
    deltas, base = task_vectors(dtype, cols=5000)
    deltas[0, 10:20] = float("nan")
    deltas[1, 15:30] = float("inf")
    deltas[2, 25:27] = -float("inf")
    deltas[0, 40:4000] = 0.0  # a threshold of zero magnitude: its ties sit among the NaNs' rows
    for density in ([0.5, 0.5, 0.5], [1.0, 0.3, 1.0], [0.2, 1.0, 0.6]):
        values = {"weight": [0.5, 0.3, 0.9], "density": density}
        expected = torch_merge("ties", deltas, base, **values)
        got = fused_merge("ties", deltas, base, **values)
        assert same_or_both_nan(got, expected), density


def test_kernels_take_only_what_they_can():
    """Other dtypes, broadcast or strided inputs, wrong weight counts, an option the kernels
    lack: fused.merge declines (None) and the engine runs the torch code."""
    deltas, base = task_vectors(torch.bfloat16, cols=3000)
    values = {"weight": [0.5, 0.3, 0.9], "density": [0.5] * 3}
    expected = torch_merge("ties", deltas, base, **values)
    strided = torch.stack([deltas, deltas], -1)[..., 0]  # columns two apart: copied, then fused
    assert torch.equal(bits(fused_merge("ties", strided, base, **values)), bits(expected))
    ties = get_method("ties")
    assert fused.merge(ties, deltas, values, base=base.float()) is None
    assert fused.merge(ties, deltas.double(), values) is None
    assert fused.merge(ties, deltas, {**values, "tie_order": "mergekit"}, base=base) is None
    short = {**values, "weight": [0.5, 0.3]}
    assert fused.merge(ties, deltas, short, base=base) is None
    with pytest.raises(RuntimeError, match="size"):  # torch's error, not a read past the weights
        torch_merge("ties", deltas, base, **short)
    rows = deltas.clone().reshape(3, 60, 50).transpose(1, 2)  # not contiguous: torch, in place
    transposed_base = base.reshape(60, 50).t()
    expected_rows = rows - transposed_base
    assert subtract_base(rows, transposed_base) is rows
    assert torch.equal(bits(rows), bits(expected_rows))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", ["inverse", "l1"])
def test_dare_ties_kernel_equals_torch(dtype, rescale):
    from evomerge.merging.sparsify import rng_for

    deltas, base = task_vectors(dtype, cols=20_000)

    def values():  # fresh generators: each run draws the same masks
        return {"weight": [0.5, 0.3, 0.9], "density": [0.5, 0.9, 0.2], "rescale": rescale,
                "rng": [rng_for(1, "t", i) for i in range(3)]}

    expected = torch_merge("dare_ties", deltas, base, **values())
    assert torch.equal(bits(fused_merge("dare_ties", deltas, base, **values())), bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_kernel_equals_torch_bit_for_bit(dtype, normalize):
    g = torch.Generator().manual_seed(2)
    models = torch.randn(3, CHUNK + 333, generator=g).to(dtype)
    values = {"weight": [0.3, 0.25, -0.4], "normalize": normalize}
    expected = torch_merge("linear", models, **values)
    assert torch.equal(bits(fused_merge("linear", models, **values)), bits(expected))
    with chunk_threads():
        assert torch.equal(bits(fused_merge("linear", models, **values)), bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_vectors_in_chunks_equal_one_subtraction(dtype):
    deltas, base = task_vectors(dtype, cols=CHUNK * 2 + 5)
    expected = deltas - base
    with chunk_threads():
        got = subtract_base(deltas.clone(), base)
    assert torch.equal(bits(got), bits(expected))


def test_the_build_carries_this_abi_version():
    import ctypes

    lib = ctypes.CDLL(kernels.built_path())
    assert lib.em_abi_version() == kernels.ABI_VERSION


def test_a_stale_kernel_build_is_refused_with_a_warning():
    """A build of another ABI (or one from before ABI versions) is never called: load() warns
    and returns None, and the methods run their torch code."""
    import ctypes.util

    with pytest.warns(UserWarning, match=f"ABI {kernels.ABI_VERSION}, this evomerge needs "
                                         f"{kernels.ABI_VERSION + 1}.*torch code"):
        assert kernels.load(kernels.built_path(), abi_version=kernels.ABI_VERSION + 1) is None
    libm = ctypes.util.find_library("m")  # a real shared library without em_abi_version
    assert libm is not None
    with pytest.warns(UserWarning, match="no ABI version"):
        assert kernels.load(libm) is None
    assert kernels.load(kernels.built_path()) is not None  # this build is current


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_magnitude_histograms_count_every_pattern(dtype):
    deltas, _ = task_vectors(dtype, cols=CHUNK * 3 + 7)
    with chunk_threads():
        counts = magnitude_histograms(deltas)
    for d, c in zip(deltas, counts, strict=True):
        expected = torch.bincount((d.view(torch.int16).int() & 0x7FFF), minlength=1 << 15)
        assert torch.equal(c, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_cut_from_either_end(dtype):
    deltas, _ = task_vectors(dtype, n=1, cols=50_000)
    flat = deltas[0]
    magnitude = bits(flat).int() & (0x7FFF if dtype != torch.float32 else 0x7FFFFFFF)
    pattern = int(torch.mode(magnitude).values)  # the most common magnitude: many ties
    where = (magnitude == pattern).nonzero().reshape(-1)
    total = len(where)
    assert total > 100
    for wanted in (1, 2, total // 2, total // 2 + 1, total - 1, total):
        expected = int(where[wanted - 1]) + 1
        assert kernels.tie_cut(flat, pattern, wanted) == expected  # forward scan
        assert kernels.tie_cut(flat, pattern, wanted, total) == expected  # from the nearer end
    assert kernels.tie_cut(flat, pattern, 0, total) == 0


def ties_engine(family: dict, density: float = 0.4):
    """A TIES engine over a tiny family (base + m1..m3) and its fixed values."""
    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.space import ValueTable
    from evomerge.modalities import get_adapter

    adapter = get_adapter("causal_lm")
    base = adapter.open(str(family["base"]), "base")
    sources = [adapter.open(str(family[f"m{i}"]), f"m{i}") for i in (1, 2, 3)]
    method = get_method("ties")
    table = ValueTable(method=method, sources=tuple(s.label for s in sources), shared_fixed={},
                       per_source_fixed={s.label: {"weight": w, "density": density}
                                         for s, w in zip(sources, (0.5, 0.3, 0.8), strict=True)},
                       searched={}, granularity="per_source")
    return MergeEngine(adapter, base, base, sources, method, dtype=torch.bfloat16), table


def test_trial_merge_equals_torch_path(llama_bf16):
    """The engine's in-memory trial path: kernels on or off, the same parameters."""

    def merged() -> dict[str, torch.Tensor]:
        engine, table = ties_engine(llama_bf16)
        params = {j.name: torch.empty(engine.reference.shape(j.name), dtype=torch.bfloat16)
                  for j in engine.jobs if j.merge}
        engine.merge_into(params, table)
        engine.merge_into(params, table)  # second trial: cached task vectors and histograms
        return params

    fused = merged()
    with kernels.disabled():
        plain = merged()
    assert fused.keys() == plain.keys()
    for name in fused:
        assert torch.equal(bits(fused[name]), bits(plain[name])), name


class SlowWriter(ShardedSafetensorsWriter):
    """A real writer that takes its time, so the merge runs ahead of it."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        time.sleep(0.02)
        super().write(name, tensor)


def test_write_behind_never_writes_a_reused_buffer_early(llama_bf16, tmp_path):
    engine, table = ties_engine(llama_bf16)
    expected = {job.name: t.clone() for job, t in engine.iter_merged(table)}  # fresh tensors
    planned = [PlannedTensor(j.name, engine.reference.shape(j.name), engine.output_dtype(j))
               for j in engine.jobs]
    with WriteBehind(SlowWriter(tmp_path, planned)) as out:
        for job, tensor in engine.iter_merged(table, reuse_buffers=WriteBehind.BUFFERS):
            out.write(job.name, tensor)
    written = load_file(tmp_path / "model.safetensors")
    assert written.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(bits(written[name]), bits(t)), name


def test_write_behind_reports_a_failed_write_and_closes_the_files(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [PlannedTensor("a", (4,), torch.float32),
                                                 PlannedTensor("b", (4,), torch.float32)])
    with pytest.raises(EvomergeError, match="tensor a: 8 bytes to write, 16 planned"):
        with WriteBehind(writer) as out:
            out.write("a", torch.zeros(2))  # the wrong size: fails on the writer's thread
            out.write("b", torch.zeros(4))
    assert writer._fds == []
