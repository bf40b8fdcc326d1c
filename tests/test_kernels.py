"""The fused CPU kernels against the torch code they replace: the same bits, every dtype."""

from __future__ import annotations

import pytest
import torch

from evomerge.merging import kernels
from evomerge.merging.methods import get_method, magnitude_histograms, subtract_base_, ties_prepare
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
    ties = get_method("ties")
    cases = [([0.3, -0.2, 0.9], [0.5, 1.0, 0.3]), ([1.0, 1.0, 1.0], [0.0, 0.25, 0.999]),
             ([0.4, 0.4, 0.2], [1.0, 1.0, 1.0])]
    for weight, density in cases:
        with kernels.disabled():
            expected = ties(deltas, weight, density, normalize=normalize, base=base,
                            **{"lambda": lam})
            expected_delta = ties(deltas, weight, density, normalize=normalize, **{"lambda": lam})
        got = ties(deltas, weight, density, normalize=normalize, base=base, **{"lambda": lam})
        assert torch.equal(bits(got), bits(expected)), (weight, density)
        got_delta = ties(deltas, weight, density, normalize=normalize, **{"lambda": lam})
        assert torch.equal(bits(got_delta), bits(expected_delta))
        with chunk_threads():  # chunks on threads, histograms in pieces: still the same bits
            threaded = ties(deltas, weight, density, normalize=normalize, base=base,
                            prepared=ties_prepare(deltas), **{"lambda": lam})
        assert torch.equal(bits(threaded), bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_kernel_on_real_shaped_values(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 700, generator=g).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(300, 700, generator=g)).to(dtype) for _ in range(4)]
    deltas = torch.stack(models) - base
    args = ([0.3, 0.2, 0.4, 0.6], [0.5, 0.7, 0.2, 0.9])
    with kernels.disabled():
        expected = get_method("ties")(deltas, *args, base=base)
    assert torch.equal(bits(get_method("ties")(deltas, *args, base=base)), bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_kernel_equals_torch_bit_for_bit(dtype, normalize):
    g = torch.Generator().manual_seed(2)
    models = torch.randn(3, CHUNK + 333, generator=g).to(dtype)
    weight = [0.3, 0.25, -0.4]
    with kernels.disabled():
        expected = get_method("linear")(models, weight, normalize=normalize)
    got = get_method("linear")(models, weight, normalize=normalize)
    assert torch.equal(bits(got), bits(expected))
    with chunk_threads():
        assert torch.equal(bits(get_method("linear")(models, weight, normalize=normalize)), bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
def test_subtract_kernel_equals_torch(dtype):
    deltas, base = task_vectors(dtype, cols=CHUNK * 2 + 5)
    expected = deltas - base
    with chunk_threads():
        got = subtract_base_(deltas.clone(), base)
    assert torch.equal(bits(got), bits(expected))


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


def test_trial_merge_equals_torch_path(llama_bf16):
    """The engine's in-memory trial path: kernels on or off, the same parameters."""
    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.space import ValueTable
    from evomerge.modalities import get_adapter

    adapter = get_adapter("causal_lm")
    base = adapter.open(str(llama_bf16["base"]), "base")
    sources = [adapter.open(str(llama_bf16[f"m{i}"]), f"m{i}") for i in (1, 2, 3)]
    method = get_method("ties")
    table = ValueTable(method=method, sources=tuple(s.label for s in sources), shared_fixed={},
                       per_source_fixed={s.label: {"weight": w, "density": 0.4}
                                         for s, w in zip(sources, (0.5, 0.3, 0.8), strict=True)},
                       searched={}, granularity="per_source")

    def merged() -> dict[str, torch.Tensor]:
        engine = MergeEngine(adapter, base, base, sources, method, dtype=torch.bfloat16)
        params = {j.name: torch.empty(base.shape(j.name), dtype=torch.bfloat16)
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
