"""Each merge method against an independent computation on small random tensors."""

from __future__ import annotations

import pytest
import reference as ref
import torch

from evomerge.errors import EvomergeError
from evomerge.merging.registry import get_method, method_names
from evomerge.merging.sparsify import (
    dare_drop,
    kth_largest_magnitude,
    magnitude_trim,
    rng_for,
    topk_mask,
)

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def test_registry_has_mergekits_methods():
    assert set(method_names()) == {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "passthrough",
        "model_stock", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
        "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion"}


def test_signatures_declare_values_and_options():
    ties = get_method("ties")
    density = ties.param("density")
    assert (density.default, density.per_source, density.bounds) == (1.0, True, (0.0, 1.0))
    assert ties.param("lambda").per_source is False  # the Python argument is lambda_
    assert ties.options == {"tie_order": (("index", "mergekit"), "index")}
    assert get_method("dare_ties").needs_rng and not ties.needs_rng
    assert get_method("model_stock").base == "required" and get_method("nuslerp").base == "optional"


def test_a_method_refuses_options_it_does_not_take():
    with pytest.raises(EvomergeError, match="merge.tie_order: method 'linear' has no option"):
        get_method("linear").bind_options({"tie_order": "index"})
    with pytest.raises(EvomergeError, match="merge.rescale: 'l2'; use one of inverse, l1, none"):
        get_method("dare_ties").bind_options({"rescale": "l2"})
    assert get_method("dare_ties").bind_options({"rescale": "l1"}) == {"rescale": "l1"}


def test_inputs_a_method_cannot_take_are_refused():
    with pytest.raises(EvomergeError, match="'ties' merges task vectors: set `base`"):
        get_method("ties").check_inputs(has_base=False, n_sources=2)
    with pytest.raises(EvomergeError, match="'nearswap' reads the base model"):
        get_method("nearswap").check_inputs(has_base=False, n_sources=1)
    with pytest.raises(EvomergeError, match="'slerp' takes exactly 2 models"):
        get_method("slerp").check_inputs(has_base=False, n_sources=3)
    with pytest.raises(EvomergeError, match="'model_stock' takes at least 2 models"):
        get_method("model_stock").check_inputs(has_base=True, n_sources=1)


def test_unknown_method_names_the_choices():
    with pytest.raises(Exception, match="unknown merge method 'nope'.*linear"):
        get_method("nope")


# --- selection --------------------------------------------------------------------------------


def with_ties(dtype, n=999, seed=1):
    """Random values with many exact magnitude ties (coarse grid, both signs, zeros)."""
    x = torch.round(rand(n, seed=seed) * 4) / 4
    return x.to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2, 137, 500, 998, 999])
def test_kth_largest_magnitude_matches_a_sort(dtype, k):
    for x in (with_ties(dtype), rand(999, seed=3, dtype=dtype)):
        mag = x.abs().double()
        expected = torch.sort(mag, descending=True).values[k - 1]
        value, n_above = kth_largest_magnitude(x, k)
        assert value.dtype == dtype
        assert float(value) == float(expected)
        assert n_above == int((mag > expected).sum())


@pytest.mark.parametrize("dtype", FLOATS)
def test_kth_largest_magnitude_2d_and_large_float32_values(dtype):
    x = (rand(17, 23, seed=5) * 1000).to(dtype)
    for k in (1, 50, 391):
        expected = torch.sort(x.abs().reshape(-1).double(), descending=True).values[k - 1]
        assert float(kth_largest_magnitude(x, k)[0]) == float(expected)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("density", [0.0001, 0.1, 0.5, 0.77, 0.999])
def test_topk_mask_matches_a_stable_sort(dtype, density):
    x = with_ties(dtype)
    mask = topk_mask(x, density)
    expected = ref.topk_keep(x, density)
    assert int(mask.sum()) == max(1, int(density * x.numel()))
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_mask_mergekit_order_is_argsort_order(dtype):
    x = with_ties(dtype)
    k = int(0.4 * x.numel())
    expected = torch.zeros(x.numel(), dtype=torch.bool)
    expected[torch.argsort(x.abs().float(), descending=True)[:k]] = True
    mask = topk_mask(x, 0.4, tie_order="mergekit")
    assert torch.equal(mask, expected)
    # both orders keep the same count and agree everywhere except among threshold ties
    index_mask = topk_mask(x, 0.4)
    threshold = kth_largest_magnitude(x, k)[0]
    differ = mask != index_mask
    assert int(index_mask.sum()) == k
    assert bool((x.abs()[differ] == threshold).all())


def test_magnitude_trim_edges():
    x = rand(10, 10)
    assert torch.equal(magnitude_trim(x, 1.0), x)
    assert torch.equal(magnitude_trim(x, 0.0), torch.zeros_like(x))
    one = magnitude_trim(x, 0.001)  # k = max(1, 0) = 1: only the largest survives
    assert int((one != 0).sum()) == 1
    assert float(one.abs().max()) == float(x.abs().max())


# --- methods ------------------------------------------------------------------------------------


def test_linear_matches_weighted_average():
    xs = torch.stack([rand(6, 5, seed=s) for s in range(3)])
    w = [0.2, 0.5, 1.3]
    got = get_method("linear")(xs, weight=w)
    assert torch.allclose(got.double(), ref.linear(list(xs), w), rtol=1e-6, atol=1e-7)
    got = get_method("linear")(xs, weight=w, normalize=False)
    assert torch.allclose(got.double(), ref.linear(list(xs), w, normalize=False), rtol=1e-6, atol=1e-7)


def test_linear_bf16_accumulates_in_float32():
    xs = torch.stack([rand(64, seed=s, dtype=torch.bfloat16) for s in range(3)])
    w = [0.3, 0.3, 0.4]
    got = get_method("linear")(xs, weight=w)
    expected = (sum(wi * x.float() for x, wi in zip(xs, w, strict=True)) / sum(w)).to(torch.bfloat16)
    diff = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    assert got.dtype == torch.bfloat16 and int(diff.max()) <= 1


def test_task_arithmetic_matches_weighted_sum_of_deltas():
    base = rand(8, 8, seed=10)
    models = [base + 0.1 * rand(8, 8, seed=s) for s in range(3)]
    deltas = torch.stack([m - base for m in models])
    w = [0.5, -0.25, 1.0]
    got = base + get_method("task_arithmetic")(deltas, weight=w, **{"lambda": 0.7})
    expected = ref.task_arithmetic(base, models, w, lam=0.7)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
    got = base + get_method("task_arithmetic")(deltas, weight=w, normalize=True)
    assert torch.allclose(got.double(), ref.task_arithmetic(base, models, w, normalize=True),
                          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(normalize):
    base = rand(16, 12, seed=20)
    models = [base + 0.1 * rand(16, 12, seed=s) for s in (21, 22, 23)]
    deltas = torch.stack([m - base for m in models])
    w, d = [0.6, 0.3, 1.1], [0.3, 0.5, 0.9]
    got = base + get_method("ties")(deltas, weight=w, density=d, normalize=normalize,
                                    **{"lambda": 1.5})
    expected = ref.ties(base, models, w, d, normalize=normalize, lam=1.5)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_ties_example_by_hand():
    # deltas: source 0 = [3, -1, 0.5], source 1 = [-1, -2, 0.4]; density 1 (no trim)
    deltas = torch.tensor([[3.0, -1.0, 0.5], [-1.0, -2.0, 0.4]])
    got = get_method("ties")(deltas, weight=[1.0, 1.0], density=[1.0, 1.0])
    # element 0: sign +, only source 0 agrees -> 3; element 1: both agree -> -1.5; element 2: 0.45
    assert torch.allclose(got, torch.tensor([3.0, -1.5, 0.45]))
    # weights before the sign election: with weight 4 on source 1, element 0 flips to -1
    got = get_method("ties")(deltas, weight=[1.0, 4.0], density=[1.0, 1.0])
    assert torch.allclose(got[0], torch.tensor(-1.0))


# --- DARE ---------------------------------------------------------------------------------------


def test_dare_keeps_density_fraction_and_rescales_by_inverse_density():
    delta = rand(1_000_000, seed=30) + 3.0  # no zeros: a kept entry is never 0
    out = dare_drop(delta, 0.3, rng_for(0, "x", 0))
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.003
    assert torch.allclose(out[kept], delta[kept] / 0.3)


def test_dare_l1_rescale_preserves_the_l1_norm():
    delta = rand(1_000_000, seed=31)
    out = dare_drop(delta, 0.2, rng_for(0, "x", 0), rescale="l1")
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.2) < 0.003
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
    ratio = out[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)  # one common scale
    plain = dare_drop(delta, 0.2, rng_for(0, "x", 0), rescale=None)
    assert torch.equal(plain[kept], delta[kept])


def test_dare_masks_are_deterministic_per_seed_and_name():
    delta = rand(10_000, seed=32) + 3.0
    def mask(seed, name, i):
        return dare_drop(delta, 0.5, rng_for(seed, name, i)) != 0
    assert torch.equal(mask(7, "a.weight", 0), mask(7, "a.weight", 0))
    assert not torch.equal(mask(7, "a.weight", 0), mask(7, "b.weight", 0))
    assert not torch.equal(mask(7, "a.weight", 0), mask(8, "a.weight", 0))
    assert not torch.equal(mask(7, "a.weight", 0), mask(7, "a.weight", 1))


def dropped(deltas, density, seed, name, rescale="inverse"):
    return [dare_drop(d, p, rng_for(seed, name, i), rescale)
            for i, (d, p) in enumerate(zip(deltas, density, strict=True))]


def test_dare_linear_is_weighted_sum_of_dropped_deltas():
    base = rand(40, 40, seed=40)
    models = [base + 0.1 * rand(40, 40, seed=s) for s in (41, 42)]
    deltas = torch.stack([m - base for m in models])
    w, d = [0.7, 0.4], [0.5, 0.8]
    rngs = [rng_for(3, "t", i) for i in range(2)]
    got = get_method("dare_linear")(deltas, weight=w, density=d, rng=rngs)
    sparse = dropped(deltas, d, 3, "t")
    expected = sum(wi * s.double() for wi, s in zip(w, sparse, strict=True))
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-7)
    changed = (got != 0).float().mean()
    assert 0.85 < float(changed) < 0.95  # 1 - 0.5 * 0.2 = 0.9 of entries survive somewhere


def test_dare_ties_is_ties_consensus_on_dropped_deltas():
    base = rand(40, 40, seed=50)
    models = [base + 0.1 * rand(40, 40, seed=s) for s in (51, 52, 53)]
    deltas = torch.stack([m - base for m in models])
    w, d = [0.7, 0.4, 1.0], [0.5, 0.8, 0.3]
    for normalize in (False, True):
        rngs = [rng_for(5, "t", i) for i in range(3)]
        got = base + get_method("dare_ties")(deltas, weight=w, density=d, rng=rngs,
                                             normalize=normalize)
        sparse = [base + s for s in dropped(deltas, d, 5, "t")]
        expected = ref.ties(base, sparse, w, [1.0] * 3, normalize=normalize)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)


# --- slerp --------------------------------------------------------------------------------------


def test_slerp_endpoints_and_reference():
    a, b = rand(7, 9, seed=60), rand(7, 9, seed=61)
    fn = get_method("slerp")
    assert torch.allclose(fn(torch.stack([a, b]), t=0.0), a, atol=1e-6)
    assert torch.allclose(fn(torch.stack([a, b]), t=1.0), b, atol=1e-6)
    for t in (0.25, 0.6):
        got = fn(torch.stack([a, b]), t=t)
        assert torch.allclose(got.double(), ref.slerp(a, b, t), rtol=1e-5, atol=1e-6)
        # a true slerp differs from the straight line between orthogonal-ish tensors
        assert not torch.allclose(got, (1 - t) * a + t * b, atol=1e-3)


def test_slerp_collinear_falls_back_to_linear():
    a = rand(5, 5, seed=62)
    fn = get_method("slerp")
    for b in (2.5 * a, -0.5 * a):
        got = fn(torch.stack([a, b]), t=0.3)
        assert torch.allclose(got, 0.7 * a + 0.3 * b, atol=1e-6)
        assert torch.isfinite(got).all()


def test_slerp_takes_exactly_two_models():
    assert get_method("slerp").exact_sources == 2
