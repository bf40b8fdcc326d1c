"""Recipes resolve like files: relative paths mean the recipe's folder, wherever evomerge runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.recipe import load_recipe

REPO = Path(__file__).parents[1]


def project(tmp_path: Path, family: dict) -> Path:
    """A project folder: recipe.yaml beside models/ (copied in), naming them relatively."""
    root = tmp_path / "project"
    for key in ("base", "m1", "m2"):
        shutil.copytree(family[key], root / "models" / key)
    return root


def test_relative_paths_resolve_against_the_recipe_folder(llama_fp32, tmp_path, monkeypatch, evomerge_cli):
    root = project(tmp_path, llama_fp32)
    (root / "data").mkdir()
    (root / "data" / "q.jsonl").write_text('{"question": "1+1", "answer": 2}\n')
    recipe = root / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({
        "name": "rel", "base": "../models/base",
        "models": [{"model": "../models/m1", "name": "m1"}, {"model": "../models/m2", "name": "m2"}],
        "merge": {"method": "ties", "parameters": {"weight": 0.5, "density": 0.5}},
        "evaluator": {"kind": "ja_math", "data": {"path": "../data/q.jsonl"}},
        "dtype": "float32"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(Path("..") / "project" / "recipes" / "r.yaml")
    assert r.base == str(root / "models" / "base") and r.models[1].model == str(root / "models" / "m2")
    assert r.evaluator["data"]["path"] == str(root / "data" / "q.jsonl")
    code, _, err = evomerge_cli("merge", "../project/recipes/r.yaml", "--out", "out", "--device", "cpu")
    assert code == 0, err
    merged = load_file(elsewhere / "out" / "model.safetensors")
    assert merged and all(t.isfinite().all() for t in merged.values())


def test_hub_ids_stay_hub_ids_and_missing_local_paths_become_absolute(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": "owner/name", "models": ["gpt2", "./local", "runs/x/best"], "merge": {"method": "linear"}}))
    r = load_recipe(recipe)
    assert r.base == "owner/name" and r.models[0].model == "gpt2"
    assert r.models[1].model == str(tmp_path / "local") and r.models[2].model == str(tmp_path / "runs/x/best")


def test_python_evaluator_beside_its_recipe_and_a_run_folder_keeps_the_paths(llama_fp32, tmp_path, monkeypatch):
    from evomerge.pipelines.evolve import Evolution
    from evomerge.pipelines.report import write_report

    root = project(tmp_path, llama_fp32)
    # a scoring module importable only from the recipe's folder (a name no other test uses)
    (root / "beside_recipe_score.py").write_text(
        "def score(model):\n    return {'score': float(model.model.norm.weight.sum()), 'extra': 1.0}\n")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "beside", "base": "models/base", "seed": 1,
        "models": [{"model": "models/m1", "name": "m1"}, {"model": "models/m2", "name": "m2"}],
        "merge": {"method": "ties", "search": {"weight": [0, 1]}, "parameters": {"density": 0.5}},
        "evaluator": {"kind": "python", "callable": "beside_recipe_score:score"},
        "search": {"trials": 2}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    outcome = Evolution(recipe, run_dir=tmp_path / "run").run(show_progress=False)
    assert outcome.best_value is not None
    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "trials").glob("*.json")]
    assert len(records) == 2 and all(r.get("metrics", {}).get("extra") == 1.0 for r in records)
    # the run folder's copy still means the project's models, read from anywhere
    monkeypatch.chdir(tmp_path / "run")
    copied = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert copied.base == str(root / "models" / "base")
    assert write_report(tmp_path / "run")["summary"].exists()
    # and a rerun of the same recipe resumes into it (the pinned root is not a different recipe)
    assert Evolution(recipe, run_dir=tmp_path / "run").run(show_progress=False).best_value == outcome.best_value


def test_a_template_says_what_to_set():
    with pytest.raises(EvomergeError, match=r"a template: set SEED, WORLD") as e:
        load_recipe(REPO / "recipes" / "miniworld-llm.yaml")
    assert "\n" not in str(e.value)
