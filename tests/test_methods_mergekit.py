"""mergekit 0.1.5's further methods (breadcrumbs, della, sce, model_stock, nuslerp, multislerp,
karcher, nearswap, arcee_fusion, passthrough) against mergekit itself on tiny Llama families:
the same tensors for the deterministic methods, the same statistics for the random ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merging.registry import get_method
from evomerge.merging.space import SearchSpace
from evomerge.recipe import MergeSpec

MK_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out, "--no-copy-tokenizer", "--random-seed", "0"], standalone_mode=False)
"""


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


# (name, method, use the base, {model key: its parameters}, shared parameters, dtype)
CASES = [
    ("breadcrumbs", "breadcrumbs", True, {"m1": {"weight": 0.6, "density": 0.6, "gamma": 0.05},
                                          "m2": {"weight": 0.3, "density": 0.8}},
     {"lambda": 1.2}, "float32"),
    ("breadcrumbs_ties", "breadcrumbs_ties", True,
     {"m1": {"weight": 0.6, "density": 0.5, "gamma": 0.02},
      "m2": {"weight": 0.5, "density": 0.7, "gamma": 0.1}, "m3": {"weight": 0.4, "density": 0.9}},
     {"rescale": True, "normalize": True}, "float32"),
    ("sce", "sce", True, {"m1": {}, "m2": {}, "m3": {}}, {"select_topk": 0.5}, "float32"),
    ("sce-all", "sce", True, {"m1": {}, "m2": {}}, {}, "float32"),
    ("model_stock", "model_stock", True, {"m1": {}, "m2": {}, "m3": {}}, {}, "float32"),
    ("model_stock-filter", "model_stock", True, {"m1": {}, "m2": {}}, {"filter_wise": True},
     "float32"),
    ("model_stock-bf16", "model_stock", True, {"m1": {}, "m2": {}, "m3": {}}, {}, "bfloat16"),
    ("nuslerp", "nuslerp", False, {"m1": {"weight": 0.3}, "m2": {"weight": 0.7}}, {}, "float32"),
    ("nuslerp-base-rows", "nuslerp", True, {"m1": {"weight": 0.6}, "m2": {"weight": 0.4}},
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "float32"),
    ("nuslerp-bf16", "nuslerp", True, {"m1": {"weight": 0.5}, "m2": {"weight": 0.2}}, {},
     "bfloat16"),
    ("multislerp", "multislerp", False, {"m1": {"weight": 0.2}, "m2": {"weight": 0.5},
                                         "m3": {"weight": 0.3}}, {}, "float32"),
    ("multislerp-base", "multislerp", True, {"m1": {"weight": 1.0}, "m2": {"weight": 2.0}}, {},
     "float32"),
    ("karcher", "karcher", False, {"m1": {}, "m2": {}, "m3": {}}, {"max_iter": 20}, "float32"),
    ("nearswap", "nearswap", True, {"m1": {}}, {"t": 0.01}, "float32"),
    ("arcee_fusion", "arcee_fusion", True, {"m1": {}}, {}, "float32"),
    ("passthrough", "passthrough", False, {"m2": {"scale": 0.5}}, {}, "float32"),
    ("della", "della", True, {"m1": {"weight": 0.6, "density": 0.5},
                              "m2": {"weight": 0.5, "density": 0.3, "epsilon": 0.1},
                              "m3": {"weight": 0.3, "density": 0.7, "epsilon": 0.2}}, {}, "float32"),
    ("della_linear", "della_linear", True, {"m1": {"weight": 0.6, "density": 0.4},
                                            "m2": {"weight": 0.5, "density": 0.6}},
     {"lambda": 0.9}, "float32"),
]
RANDOM = {"della", "della_linear"}


def mergekit_config(fam: dict, method: str, with_base: bool, models: dict, shared: dict,
                    dtype: str) -> dict:
    cfg = {"merge_method": method, "dtype": dtype,
           "models": [{"model": str(fam[k]), "parameters": p} if p else {"model": str(fam[k])}
                      for k, p in models.items()]}
    if with_base:
        cfg["base_model"] = str(fam["base"])
    if shared:
        cfg["parameters"] = shared
    return cfg


def evomerge_recipe(fam: dict, method: str, with_base: bool, models: dict, shared: dict,
                    dtype: str, seed: int = 0) -> dict:
    recipe = {"name": method, "dtype": dtype, "seed": seed,
              "models": [{"model": str(fam[k]), "name": k, "parameters": p} for k, p in models.items()],
              "merge": {"method": method, "parameters": shared}}
    if with_base:
        recipe["base"] = str(fam["base"])
    return recipe


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mergekit_runs(llama_fp32, llama_bf16, tmp_path_factory) -> dict[str, Path]:
    """Every case merged by mergekit-yaml's entry point, in one process."""
    root = tmp_path_factory.mktemp("mergekit-more")
    outs, args = {}, []
    for name, method, with_base, models, shared, dtype in CASES:
        fam = llama_bf16 if dtype == "bfloat16" else llama_fp32
        path = write(root / f"{name}.yaml", mergekit_config(fam, method, with_base, models, shared, dtype))
        outs[name] = root / f"out-{name}"
        args += [str(path), str(outs[name])]
    subprocess.run([sys.executable, "-c", MK_DRIVER, *args], check=True, capture_output=True)
    return outs


def evomerge(cli, tmp_path: Path, case: tuple, seed: int = 0, tag: str = "") -> dict[str, torch.Tensor]:
    name, method, with_base, models, shared, dtype = case
    fam = FAMILIES[dtype]
    cfg = write(tmp_path / f"{name}{tag}.yaml", evomerge_recipe(fam, method, with_base, models,
                                                                shared, dtype, seed))
    out = tmp_path / f"out-{name}{tag}"
    code, _, stderr = cli("merge", cfg, "--out", out, "--device", "cpu")
    assert code == 0, stderr
    return tensors(out)


FAMILIES: dict[str, dict] = {}


@pytest.fixture(autouse=True)
def _families(llama_fp32, llama_bf16):
    FAMILIES.update({"float32": llama_fp32, "bfloat16": llama_bf16})


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


@pytest.mark.parametrize("case", [c for c in CASES if c[1] not in RANDOM], ids=lambda c: c[0])
def test_same_tensors_as_mergekit(case, mergekit_runs, tmp_path, evomerge_cli):
    ours, theirs = evomerge(evomerge_cli, tmp_path, case), tensors(mergekit_runs[case[0]])
    assert set(ours) == set(theirs)
    inputs = [tensors(FAMILIES[case[5]][k]) for k in ("base", *case[3])]
    moved = 0
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == getattr(torch, case[5]), name
        if t.dtype == torch.bfloat16:
            assert ulps(t, theirs[name]) <= 1, name
        else:
            assert torch.allclose(t, theirs[name], rtol=1e-5, atol=1e-7), name
        moved += not any(torch.equal(t, x[name]) for x in inputs)
    assert moved > len(ours) // 2  # a merge, not a copy of one input


def stats(merged: dict, base: dict) -> tuple[float, float]:
    """Share of entries that moved off the base, and the L1 norm of the change (2-d tensors)."""
    names = [n for n in base if base[n].dim() == 2]
    changed = sum(int((merged[n] != base[n]).sum()) for n in names)
    size = sum(base[n].numel() for n in names)
    return changed / size, sum(float((merged[n] - base[n]).abs().sum()) for n in names)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in RANDOM], ids=lambda c: c[0])
def test_random_methods_match_mergekit_statistics(case, mergekit_runs, llama_fp32, tmp_path,
                                                  evomerge_cli):
    base = tensors(llama_fp32["base"])
    ours = evomerge(evomerge_cli, tmp_path, case, seed=1)
    (share, l1), (mk_share, mk_l1) = stats(ours, base), stats(tensors(mergekit_runs[case[0]]), base)
    densities = [p.get("density", 1.0) for p in case[3].values()]
    survive = 1 - torch.tensor([1 - d for d in densities]).prod().item()  # some source kept it
    assert share == pytest.approx(survive, abs=0.02)
    assert share == pytest.approx(mk_share, rel=0.02)
    assert l1 == pytest.approx(mk_l1, rel=0.02)
    again = evomerge(evomerge_cli, tmp_path, case, seed=1, tag="-again")
    other = evomerge(evomerge_cli, tmp_path, case, seed=2, tag="-other")
    assert all(torch.equal(ours[n], again[n]) for n in ours)  # the same seed, the same bits
    assert not all(torch.equal(ours[n], other[n]) for n in ours)


SEARCHABLE = {
    "breadcrumbs": {"weight", "density", "gamma", "lambda"},
    "breadcrumbs_ties": {"weight", "density", "gamma", "lambda"},
    "della": {"weight", "density", "epsilon", "lambda"},
    "della_linear": {"weight", "density", "epsilon", "lambda"},
    "sce": {"select_topk"},
    "nuslerp": {"weight"},
    "multislerp": {"weight"},
    "nearswap": {"t"},
    "passthrough": {"scale"},
    "model_stock": set(), "karcher": set(), "arcee_fusion": set(),
}


@pytest.mark.parametrize("method", sorted(SEARCHABLE))
def test_continuous_values_are_searchable(method):
    m = get_method(method)
    assert {p.name for p in m.params if p.bounds is not None} == SEARCHABLE[method]
    for p in m.params:
        spec = MergeSpec(method=method, search={p.name: (0.0, 0.1)})
        if p.bounds is None:
            with pytest.raises(Exception, match="not searchable"):
                SearchSpace.from_spec(spec, m, ["a", "b"], ["layers.0"])
        else:
            assert len(SearchSpace.from_spec(spec, m, ["a", "b"], ["layers.0"])) == (
                2 if p.per_source else 1)


def test_della_refuses_an_epsilon_outside_the_density(llama_fp32, tmp_path, evomerge_cli):
    case = ("della-bad", "della", True, {"m1": {"weight": 1.0, "density": 0.1, "epsilon": 0.2}},
            {}, "float32")
    name, method, with_base, models, shared, dtype = case
    cfg = write(tmp_path / "bad.yaml", evomerge_recipe(llama_fp32, method, with_base, models,
                                                       shared, dtype))
    code, _, stderr = evomerge_cli("merge", cfg, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 2
    assert "density +/- epsilon" in stderr and "Traceback" not in stderr


def test_a_new_method_is_searched_in_evolve(llama_fp32, tmp_path, monkeypatch):
    """della's weight, density and epsilon searched per model: each trial merges its own."""
    import json

    from evomerge.pipelines.evolve import Evolution

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the tests' scoring module
    recipe = {"name": "della-search", "base": str(llama_fp32["base"]), "seed": 1,
              "models": [{"model": str(llama_fp32[k]), "name": k} for k in ("m1", "m2")],
              "merge": {"method": "della", "search": {"weight": [0, 1], "density": [0.3, 0.7],
                                                      "epsilon": [0.05, 0.2]}},
              "evaluator": {"kind": "python", "callable": "scoring:likelihood"},
              "search": {"sampler": "random", "trials": 3}}
    Evolution(write(tmp_path / "r.yaml", recipe), run_dir=tmp_path / "run").run(show_progress=False)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "trials").glob("*.json"))]
    assert len(records) == 3
    assert set(records[0]["values"]) == {f"{k}/{p}" for k in ("m1", "m2")
                                         for p in ("weight", "density", "epsilon")}
    assert len({r["score"] for r in records}) == 3  # different values, different merges
