"""`evomerge recipe export RUN --mergekit`: the YAML, merged by mergekit 0.1.5 and by evomerge,
gives the tensors `evomerge merge RUN` gives (per-group values as filters, per-source values,
global values, tie order and seed carried), or the export is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_corpus import _tensors, _ulps, build_world, run_mergekit

GROUPS = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]


def run_folder(root: Path, recipe: dict, values: dict[str, float]) -> Path:
    """A run folder as `evolve` leaves it: the recipe and the best trial's values."""
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "best.json").write_text(json.dumps({"values": values}))
    return root


def recipes(world) -> dict[str, tuple[dict, dict]]:
    """Recipes with searched values and a run's choice for each, one per granularity."""
    models = [{"model": world["m1"], "name": "alpha"}, {"model": world["m2"], "name": "beta"}]
    per_group_ties = {f"{g}/{s}/{p}": 0.2 + 0.05 * i + (0.3 if s == "beta" else 0) + (0.1 if p == "density" else 0)
                      for i, g in enumerate(GROUPS) for s in ("alpha", "beta") for p in ("weight", "density")}
    return {
        "ties-per-group": ({"name": "pg", "base": world["base"], "models": models, "dtype": "float32",
                            "merge": {"method": "ties", "granularity": "per_group", "tie_order": "mergekit",
                                      "search": {"weight": [0, 1], "density": [0.1, 1]},
                                      "parameters": {"normalize": True}}}, per_group_ties),
        "linear-per-source": ({"name": "ps", "models": models, "dtype": "float32",
                               "merge": {"method": "linear", "search": {"weight": [0, 1]}}},
                              {"alpha/weight": 0.3, "beta/weight": 0.8}),
        "slerp-per-group": ({"name": "sl", "models": models, "merge": {"method": "slerp", "granularity": "per_group",
                                                                      "search": {"t": [0, 1]}}},
                            {f"{g}/t": 0.1 + 0.15 * i for i, g in enumerate(GROUPS)}),
        "task-arithmetic-global": ({"name": "gl", "base": world["base"], "models": models,
                                    "merge": {"method": "task_arithmetic", "granularity": "global",
                                              "search": {"weight": [0, 1]}, "parameters": {"lambda": 0.7}}},
                                   {"weight": 0.45}),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory, evomerge_cli):
    root = tmp_path_factory.mktemp("export")
    world = build_world(root / "world")
    cases, jobs = {}, []
    for name, (recipe, values) in recipes(world).items():
        run = run_folder(root / name / "run", recipe, values)
        code, out, err = evomerge_cli("recipe", "export", run, "--mergekit")
        assert code == 0, err
        cfg = root / name / "exported.yaml"
        cfg.write_text(out)
        cases[name] = (run, cfg, root / name / "mergekit")
        jobs.append((cfg, root / name / "mergekit"))
    status = run_mergekit(jobs, root / "status.json")
    return cases, status


@pytest.mark.parametrize("name", ["ties-per-group", "linear-per-source", "slerp-per-group", "task-arithmetic-global"])
def test_export_round_trip(name, exported, tmp_path, evomerge_cli):
    cases, status = exported
    run, cfg, mk_out = cases[name]
    assert status[str(cfg)] == "ok", status[str(cfg)]
    for target, args in (("run", (run,)), ("yaml", (cfg,))):
        code, _, err = evomerge_cli("merge", *args, "--out", tmp_path / target, "--device", "cpu")
        assert code == 0, err
    from_run, from_yaml, theirs = (_tensors(p) for p in (tmp_path / "run", tmp_path / "yaml", mk_out))
    assert set(from_run) == set(from_yaml) == set(theirs)
    for key, t in from_run.items():
        assert torch.equal(t, from_yaml[key]), key
        assert int(_ulps(t, theirs[key]).max()) <= 1, key
    data = yaml.safe_load(cfg.read_text())
    if "per-group" in name:  # every layer group reads its own value through a filter
        setting = (data["models"][1]["parameters"]["weight"] if name.startswith("ties")
                   else data["parameters"]["t"])
        assert {"filter": "model.layers.3.", "value": pytest.approx(setting[4]["value"])} in setting


def test_evomerge_form_fixes_the_values(tmp_path, evomerge_cli):
    world = build_world(tmp_path / "world")
    recipe, values = recipes(world)["linear-per-source"]
    run = run_folder(tmp_path / "run", recipe, values)
    code, out, err = evomerge_cli("recipe", "export", run, "--no-mergekit")
    assert code == 0, err
    fixed = yaml.safe_load(out)
    assert "search" not in fixed["merge"]
    assert [m["parameters"]["weight"] for m in fixed["models"]] == [0.3, 0.8]


def test_export_refusals(tmp_path, evomerge_cli):
    world = build_world(tmp_path / "world")
    models = [{"model": world["m1"], "name": "a", "parameters": {"weight": 1, "density": 0.5}}]

    def refused(recipe: dict) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        code, _, err = evomerge_cli("recipe", "export", path, "--mergekit")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    assert "rescale inverse" in refused({"base": world["base"], "models": models, "merge": {"method": "dare_ties"}})
    assert "is searched" in refused({"base": world["base"], "models": models,
                                     "merge": {"method": "ties", "search": {"weight": [0, 1]}}})
    assert "reference" in refused({"base": world["base"], "models": models, "reference": "a",
                                   "merge": {"method": "ties"}})
