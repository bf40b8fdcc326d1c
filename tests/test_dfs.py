"""Data-flow-space merging on tiny Llama/Mistral pairs: the path model, its stock export, the KV
cache on repeated layers, DFS and PS+DFS evolve runs, and `evomerge plan` on both recipes."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import llama_config, perturbed, tiny_tokenizer
from transformers import AutoModelForCausalLM

from evomerge.errors import EvomergeError
from evomerge.merging.dfs import DFSSpace, fold_problem
from evomerge.pipelines.dfs import DFSCandidates
from evomerge.pipelines.evolve import Evolution
from evomerge.recipe import Recipe, load_recipe

TESTS = Path(__file__).parent
PY_EVAL = {"kind": "python", "callable": "scoring:likelihood"}
IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 30, 11, 4], [1, 8, 8, 2, 40, 41, 6, 12, 19, 33]])


def make_pair(root: Path, arch: str, *, layers_a: int = 3, layers_b: int = 2, seed: int = 0) -> dict[str, Path]:
    """Two models of one family (B with its own depth), default init: small residual streams,
    where the RMSNorm eps weighs most. The path model evaluates the folded form, so the export
    matches it whatever eps weighs."""
    torch.manual_seed(seed)
    out = {}
    for name, n, s in (("a", layers_a, seed + 1), ("b", layers_b, seed + 2)):
        model = AutoModelForCausalLM.from_config(llama_config(arch, layers=n))
        perturbed(model, s)
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, tmp_path_factory) -> dict[str, Path]:
    return make_pair(tmp_path_factory.mktemp(f"dfs_{request.param}"), request.param)


def dfs_recipe(pair: dict[str, Path], **dfs) -> Recipe:
    return Recipe.model_validate({"name": "dfs", "dfs": {"model_a": str(pair["a"]), "model_b": str(pair["b"]), **dfs}})


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def test_space_names_bounds_and_initial_point():
    space = DFSSpace(3, 2, repeats=2)
    assert len(space) == 10 + 5 and space.names[0] == "slot.000" and space.names[-1] == "scale.b01"
    assert space.layer_names == ["a00", "a01", "a02", "b00", "b01"]
    assert space.bounds("slot.001") == (-0.5, 1.5) and space.bounds("slot.000") == (-1.5, 0.5)
    path = space.decode(space.initial())  # the CMA-ES mean is A itself, unscaled
    assert path.layers == (0, 1, 2) and path.scales == (1.0, 1.0, 1.0)
    values = {**space.initial(), "slot.004": 1.0, "slot.006": 1.0, "scale.b01": 0.7, "scale.a01": 1.3}
    path = space.decode(values)  # a00 | a01 b01 a01 | a02: a01->b01 and b01->a01 are hand-overs
    assert space.describe(path) == ["a00", "a01", "b01", "a01", "a02"]
    assert path.scales == (1.0, 1.0, 0.7, 1.3, 1.0)
    full = DFSSpace(3, 2, repeats=1, scales="full")
    assert len(full.scale_names) == 5 * 5 - 2 - 1 and "scale.a02.b00" in full.names
    assert "scale.a00.a01" not in full.names  # natural hand-overs are never scaled
    assert len(DFSSpace(3, 2, scales="none")) == 15


def test_path_of_a_alone_reproduces_a_exactly(pair):
    c = DFSCandidates(dfs_recipe(pair))
    expected = logits(AutoModelForCausalLM.from_pretrained(pair["a"]).eval())
    assert torch.equal(logits(c.apply(c.space.initial())), expected)
    assert torch.equal(logits(c.apply_baseline({"name": "a", "source": "a"})), expected)


def test_exported_checkpoints_match_the_path_model(pair, tmp_path):
    c = DFSCandidates(dfs_recipe(pair, repeats=2))
    rng = random.Random(7)
    lengths = set()
    for i in range(4):  # held-back random paths (not the ones the search would pick)
        values = {n: rng.uniform(*c.space.bounds(n)) for n in c.space.names}
        expected = logits(c.apply(values))
        path = c.paths.path
        out = c.export(values, tmp_path / f"p{i}", show_progress=False)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert model.config.num_hidden_layers == len(path)
        assert rel_err(logits(model), expected) <= 1e-4
        assert not (out / "dfs_scales.json").exists()
        card = (out / "README.md").read_text()
        assert all(f"`{n}`" in card for n in c.space.describe(path))
        lengths.add(len(path))
    assert len(lengths) > 1
    full = DFSCandidates(dfs_recipe(pair, repeats=2, scales="full"))  # the paper's W
    values = {n: rng.uniform(*full.space.bounds(n)) for n in full.space.names}
    expected = logits(full.apply(values))
    assert any(s != 1.0 for s in full.paths.path.scales)
    out = full.export(values, tmp_path / "full", show_progress=False)
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(out).eval()), expected) <= 1e-4


def test_unfoldable_scales_go_to_a_documented_module(pair, tmp_path, monkeypatch):
    c = DFSCandidates(dfs_recipe(pair, fold="never"))
    values = {**c.space.initial(), "slot.004": 1.0, f"scale.{c.space.layer_names[4]}": 1.4}
    expected = logits(c.apply(values))
    out = c.export(values, tmp_path / "never", show_progress=False)
    assert json.loads((out / "dfs_scales.json").read_text())["input_scales"][2] == pytest.approx(1.4)
    monkeypatch.syspath_prepend(str(out))
    from dfs_scaling import apply_dfs_scales

    model = apply_dfs_scales(AutoModelForCausalLM.from_pretrained(out).eval(), out)
    assert rel_err(logits(model), expected) <= 1e-6
    assert "not a known pre-norm" in fold_problem("gemma2", c.paths.path, c.paths.layer_tensors)
    c.spec.fold = "always"
    monkeypatch.setattr("evomerge.merging.dfs.FOLDABLE", set())
    with pytest.raises(EvomergeError, match="cannot fold"):
        c.export(values, tmp_path / "always", show_progress=False)


def test_kv_cache_generation_on_a_path_that_repeats_layers(pair):
    c = DFSCandidates(dfs_recipe(pair))
    layers = ["a00", "a01", "a01", "b00", "a01", "b01", "b01", "a02"]
    model = c.apply_baseline({"name": "loop", "layers": layers, "scales": [1, 1, 0.8, 1.2, 0.9, 1.1, 1, 1.05]})
    assert model.config.num_hidden_layers == len(layers)
    attn = [m.self_attn.layer_idx for m in model.model.layers]
    assert attn == list(range(len(layers)))  # repeated layers get their own cache entries

    def gen(use_cache: bool):
        with torch.no_grad():
            return model.generate(IDS[:1], max_new_tokens=8, do_sample=False, use_cache=use_cache,
                                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)

    cached, uncached = gen(True), gen(False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-5) for x, y in zip(cached.logits, uncached.logits, strict=True))
    # The resident layers themselves were never copied or altered.
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(
        model.model.layers[1].parameters(), c.paths.layers[1].parameters(), strict=True))
    assert c.paths.layers[1].self_attn.layer_idx == 1
    for path in (layers, ["a00", "b01", "a02"]):  # hidden-state capture follows path changes
        with torch.no_grad():
            out = c.apply_baseline({"name": "p", "layers": path})(IDS, output_hidden_states=True)
        assert len(out.hidden_states) == len(path) + 1


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_dfs_evolve_runs_end_to_end(tmp_path, monkeypatch, evomerge_cli):
    monkeypatch.syspath_prepend(str(TESTS))
    pair = make_pair(tmp_path / "m", "mistral")
    recipe = write(tmp_path / "dfs.yaml", {
        "name": "tiny-dfs", "seed": 1, "evaluator": PY_EVAL, "search": {"trials": 4, "popsize": 4},
        "dfs": {"model_a": str(pair["a"]), "model_b": str(pair["b"]), "repeats": 2},
        "baselines": [{"name": "A", "source": "a"}, {"name": "B", "source": "b"},
                      {"name": "franken", "layers": ["a00", "a01", "b00", "b01", "a02"]}]})
    evo = Evolution(recipe, run_dir=tmp_path / "run")
    outcome = evo.run(show_progress=False, export_best=True)
    assert len(list((tmp_path / "run" / "trials").glob("*.json"))) == 4
    baselines = json.loads((tmp_path / "run" / "baselines.json").read_text())
    assert set(baselines) == {"A", "B", "franken"}
    import scoring

    a = AutoModelForCausalLM.from_pretrained(pair["a"]).eval()
    assert baselines["A"]["score"] == pytest.approx(scoring.likelihood(a), abs=1e-6)
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best").eval()
    path = evo.candidates.space.decode(outcome.best_values)
    assert best.config.num_hidden_layers == len(path)
    assert scoring.likelihood(best) == pytest.approx(outcome.best_value, abs=1e-3)
    from evomerge.pipelines.report import write_report

    files = write_report(tmp_path / "run")
    assert files["values"].exists() and "`a`" in files["summary"].read_text()
    code, _, err = evomerge_cli("merge", tmp_path / "run", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(merged), logits(best))


def ps_recipe(path: Path, family: dict) -> Path:
    return write(path, {
        "name": "tiny-ps", "base": str(family["base"]), "seed": 2,
        "models": [{"model": str(family[k]), "name": k} for k in ("m1", "m2")],
        "merge": {"method": "dare_ties", "search": {"weight": [0, 1], "density": [0.1, 1]}},
        "evaluator": PY_EVAL, "search": {"trials": 2}})


def test_ps_then_dfs_chain_runs_end_to_end(llama_fp32, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    ps = ps_recipe(tmp_path / "ps.yaml", llama_fp32)
    recipe = write(tmp_path / "psdfs.yaml", {
        "name": "tiny-ps-dfs", "evaluator": PY_EVAL, "search": {"trials": 3},
        "dfs": {"model_a": {"ps_recipe": str(ps), "run_dir": str(tmp_path / "ps_run")},
                "model_b": str(llama_fp32["m3"]), "repeats": 2}})
    outcome = Evolution(recipe, run_dir=tmp_path / "run").run(show_progress=False, export_best=True)
    assert (tmp_path / "ps_run" / "best" / "config.json").exists()  # the PS study ran and exported first
    assert len(list((tmp_path / "ps_run" / "trials").glob("*.json"))) == 2
    assert outcome.best_value is not None
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best").config.num_hidden_layers >= 2
    # A second DFS study on the same PS run reuses its export ({ps_run: DIR}).
    again = load_recipe(write(tmp_path / "again.yaml", {
        "name": "again", "dfs": {"model_a": {"ps_run": str(tmp_path / "ps_run")}, "model_b": str(llama_fp32["m3"])}}))
    assert DFSCandidates(again).folder_a == tmp_path / "ps_run" / "best"


def test_recipe_validation():
    with pytest.raises(ValueError, match="exactly one"):
        Recipe.model_validate({"dfs": {"model_a": {}, "model_b": "x"}})
    with pytest.raises(ValueError, match="drop models"):
        Recipe.model_validate({"models": ["x"], "dfs": {"model_a": "x", "model_b": "y"}})
    with pytest.raises(ValueError, match="0 < low < high"):
        Recipe.model_validate({"dfs": {"model_a": "x", "model_b": "y", "scale_bounds": [0, 2]}})
    with pytest.raises(ValueError, match="merge"):
        Recipe.model_validate({"models": ["x"]})


def test_plan_validates_dfs_and_ps_dfs_twins(llama_fp32, tmp_path):
    ps = ps_recipe(tmp_path / "ps.yaml", llama_fp32)
    dfs = write(tmp_path / "dfs.yaml", {"name": "d", "dfs": {
        "model_a": str(llama_fp32["m1"]), "model_b": str(llama_fp32["m2"]), "repeats": 3},
        "search": {"popsize": 8, "trials": 80}})
    chain = write(tmp_path / "chain.yaml", {"name": "c", "dfs": {
        "model_a": {"ps_recipe": str(ps), "run_dir": str(tmp_path / "nowhere")},
        "model_b": str(llama_fp32["m3"]), "scales": "full"}})
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-m", "evomerge.cli", "plan", str(r), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (dfs, chain)]
    plans = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        plans.append(json.loads(out))
    assert plans[0]["slots"] == 12 and plans[0]["searched_values"] == 12 + 4
    assert plans[0]["popsize"] == 8 and plans[0]["generations"] == 10 and plans[0]["method"] == "dfs"
    assert plans[1]["scale_values"] == 4 * 4 - 2 and plans[1]["slots"] == 12
    assert not (tmp_path / "nowhere").exists()  # plan reads configs only; it runs nothing


def test_incompatible_models_are_refused(tmp_path):
    a = make_pair(tmp_path / "x", "llama")["a"]
    cfg = copy.deepcopy(llama_config("llama", layers=2, hidden=16))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "narrow")
    with pytest.raises(EvomergeError, match="hidden_size"):
        DFSCandidates(dfs_recipe({"a": a, "b": tmp_path / "narrow"}))


def test_pickle_checkpoints_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file

    pair = make_pair(tmp_path, "llama")
    weights = pair["b"] / "model.safetensors"
    torch.save(load_file(weights), pair["b"] / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(EvomergeError, match="--allow-pickle"):
        DFSCandidates(dfs_recipe(pair))
    assert len(DFSCandidates(dfs_recipe(pair), allow_pickle=True).space) > 0


def test_nothing_below_pipelines_imports_pipelines_or_cli():
    """The layers of the package: merging/, modalities/ and evaluators/ never import upward
    (not even lazily inside a function), so there is no import cycle to keep alive."""
    import ast

    package = TESTS.parent / "evomerge"
    offenders = []
    for layer in ("merging", "modalities", "evaluators"):
        for path in sorted((package / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                offenders += [f"{path.name}: {n}" for n in names
                              if n.startswith(("evomerge.pipelines", "evomerge.cli"))]
    assert offenders == []
