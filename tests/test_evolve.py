"""The evolve loop end to end on tiny models: resumable, fault tolerant, reported, planned."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from evomerge.errors import EvomergeError
from evomerge.pipelines.evolve import Evolution

TESTS = Path(__file__).parent
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def write_recipe(path: Path, family: dict, *, name: str, evaluator: dict, trials: int = 4,
                 method: str = "ties", granularity: str = "per_source", baselines=None,
                 sampler: str = "cmaes") -> Path:
    recipe = {
        "name": name, "base": str(family["base"]),
        "models": [{"model": str(family[k]), "name": k} for k in ("m1", "m2")],
        "merge": {"method": method, "search": {"weight": [0, 1], "density": [0.1, 1]},
                  "granularity": granularity},
        "evaluator": evaluator, "search": {"sampler": sampler, "trials": trials}, "seed": 3,
        "baselines": baselines or [],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def completed(db: Path) -> list[tuple[int, float]]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select t.number, v.value from trials t join trial_values v on t.trial_id = v.trial_id "
            "where t.state = 'COMPLETE' order by t.number").fetchall()
    return rows


def trial_params(db: Path) -> dict[int, dict[str, float]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select t.number, p.param_name, p.param_value from trials t join "
                           "trial_params p on t.trial_id = p.trial_id where t.state = 'COMPLETE'").fetchall()
    out: dict[int, dict[str, float]] = {}
    for number, name, value in rows:
        out.setdefault(number, {})[name] = value
    return out


PY_EVAL = {"kind": "python", "callable": "scoring:likelihood"}


def test_evolve_records_trials_baselines_best_and_report(llama_fp32, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = write_recipe(tmp_path / "r.yaml", llama_fp32, name="tiny", evaluator=PY_EVAL, trials=5,
                          baselines=[{"name": "m1", "source": "m1"},
                                     {"name": "average", "method": "linear", "parameters": {"weight": 1.0}}],
                          granularity="per_group")
    evo = Evolution(recipe, run_dir=tmp_path / "run")
    outcome = evo.run(show_progress=False, export_best=True)
    run = tmp_path / "run"
    assert len(completed(run / "study.db")) == 5
    records = sorted((run / "trials").glob("*.json"))
    assert len(records) == 5
    first = json.loads(records[0].read_text())
    assert set(first) >= {"values", "score", "merge_s", "eval_s"}
    assert len(first["values"]) == len(evo.candidates.space)  # 4 groups x 2 sources x 2 values
    assert len(evo.candidates.space) == 4 * 2 * 2
    assert "layers.1/m2/density" in first["values"]
    best = json.loads((run / "best.json").read_text())
    assert best["score"] == pytest.approx(max(v for _, v in completed(run / "study.db")))
    assert best["values"] == outcome.best_values
    baselines = json.loads((run / "baselines.json").read_text())
    assert set(baselines) == {"m1", "average"}
    # The m1 baseline is m1 itself: score equals the evaluator run on the stock model.
    from scoring import likelihood
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(llama_fp32["m1"])
    assert baselines["m1"]["score"] == pytest.approx(likelihood(stock), abs=1e-5)
    # The exported best model reproduces the best trial's score.
    exported = AutoModelForCausalLM.from_pretrained(run / "best")
    assert likelihood(exported) == pytest.approx(best["score"], abs=1e-4)
    assert "Evolution" in (run / "best" / "README.md").read_text()

    out = subprocess.run(EVOMERGE + ["report", str(run)], capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    for png in ("history.png", "values.png"):
        with Image.open(run / "report" / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    summary = (run / "report" / "summary.md").read_text()
    assert "baseline: m1" in summary and "| `layers.0/m1/weight` |" in summary
    assert "optuna-dashboard sqlite:///" in out.stdout


def test_killed_run_resumes_to_exact_total(llama_fp32, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", llama_fp32, name="killme", trials=12,
                          evaluator={**PY_EVAL, "options": {"sleep": 0.4}})
    run = tmp_path / "run"
    cmd = EVOMERGE + ["evolve", str(recipe), "--run-dir", str(run), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    db = run / "study.db"
    deadline = time.time() + 120
    while time.time() < deadline:
        if db.exists():
            try:
                if len(completed(db)) >= 5:
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    time.sleep(0.15)  # land inside the next trial's evaluation
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = completed(db)
    params_before = trial_params(db)
    assert 5 <= len(before) < 12
    with sqlite3.connect(db) as con:
        running = con.execute("select count(*) from trials where state = 'RUNNING'").fetchone()[0]
    assert running == 1, "the kill should land mid-trial"

    out = subprocess.run(cmd, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr[-2000:]
    after = completed(db)
    assert len(after) == 12
    assert after[: len(before)] == before  # finished trials unchanged, none duplicated
    params_after = trial_params(db)
    assert all(params_after[n] == params_before[n] for n, _ in before)
    with sqlite3.connect(db) as con:
        states = dict(con.execute("select state, count(*) from trials group by state").fetchall())
    assert states == {"COMPLETE": 12, "FAIL": 1}  # the interrupted one, retired, not counted
    # Rerunning a finished run does nothing more.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env())
    assert again.returncode == 0 and len(completed(db)) == 12


def test_nan_candidates_and_failing_evaluations_fail_alone(llama_fp32, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    broken = tmp_path / "m2nan"
    broken.mkdir()
    for f in llama_fp32["m2"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(broken / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    family = {**llama_fp32, "m2": broken}
    marker = tmp_path / "fail-next"
    recipe = write_recipe(tmp_path / "r.yaml", family, name="nan", trials=3, method="task_arithmetic",
                          evaluator={**PY_EVAL, "options": {"fail_marker": str(marker)}})
    recipe_data = yaml.safe_load(recipe.read_text())
    recipe_data["merge"]["search"] = {"weight": [0, 1]}
    recipe.write_text(yaml.safe_dump(recipe_data))
    # A source holding NaN fails the preflight (the merge at the box centre): one line naming
    # the tensor, before any trial (not a budget of failed trials).
    evo = Evolution(recipe, run_dir=tmp_path / "run")
    with pytest.raises(EvomergeError, match=r"preflight: the merge at the centre.*model\.layers\.0\.mlp\.up_proj\.weight.*NaN"):
        evo.run(show_progress=False)
    assert not list((tmp_path / "run" / "trials").glob("*.json"))
    assert not (tmp_path / "run" / "best.json").exists()

    # A failing evaluation fails its trial; later trials complete.
    recipe_data["models"][1]["model"] = str(llama_fp32["m2"])
    recipe_data["name"] = "flaky"
    recipe.write_text(yaml.safe_dump(recipe_data))
    evo = Evolution(recipe, run_dir=tmp_path / "run2")
    evo.score_baselines()  # the preflight passes first
    marker.write_text("x")
    outcome = evo.run(show_progress=False)
    assert [t.score is None for t in outcome.timings] == [True, False, False]
    assert outcome.best_value is not None


def test_plan_reads_configs_only(tmp_path):
    from tiny import llama_config

    folder = tmp_path / "config-only"
    llama_config(layers=4).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    recipe = {"name": "p", "base": str(folder), "models": [str(folder), str(folder)],
              "merge": {"method": "dare_ties", "search": {"weight": [0, 1], "density": [0, 1]},
                        "granularity": "per_group"},
              "dtype": "bfloat16", "search": {"trials": 100}}
    recipe["models"] = [{"model": str(folder), "name": "a"}, {"model": str(folder), "name": "b"}]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run(EVOMERGE + ["plan", str(path), "--json"], capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    n = (4 + 2) * 2 * 2  # (embed, 4 layers, head) x 2 sources x (weight, density)
    assert plan["searched_values"] == n
    assert plan["popsize"] == 4 + int(3 * torch.log(torch.tensor(float(n))).item())
    assert plan["generations"] == -(-100 // plan["popsize"])
    params = plan["parameters"]
    assert plan["resident_model_gb"] == pytest.approx(params * 2 / 2**30, abs=1e-3)
    assert plan["trial_cache_gb"] == pytest.approx(params * 2 * 3 / 2**30, abs=1e-3)


def test_journal_storage_resumes_and_reports(llama_fp32, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = write_recipe(tmp_path / "r.yaml", llama_fp32, name="journal", evaluator=PY_EVAL)
    run, storage = tmp_path / "run", f"journal:{tmp_path / 'run' / 'study.journal'}"
    first = Evolution(recipe, run_dir=run, storage=storage).run(3, show_progress=False)
    again = Evolution(recipe, run_dir=run, storage=storage).run(5, show_progress=False)
    assert (run / "study.journal").exists() and not (run / "study.db").exists()
    assert [t.number for t in first.timings] == [0, 1, 2] and [t.number for t in again.timings] == [3, 4]
    from evomerge.pipelines.report import write_report

    assert write_report(run)["storage"] == str(run / "study.journal")


def test_timing_summary_reports_generation_speed_per_trial():
    from rich.console import Console

    from evomerge.pipelines.evolve import TrialTiming
    from evomerge.progress import timing_summary

    timings = [TrialTiming(0, 0.5, 0.1, 1.0, 1.2, "", 300, 1.0),   # 300 tokens/s
               TrialTiming(1, 0.6, 0.1, 2.0, 2.2, "", 200, 2.0),   # 100 tokens/s
               TrialTiming(2, None, 0.1, 0.0, 0.1, "boom")]        # failed: no generation
    console = Console(record=True, width=120)
    console.print(timing_summary(timings))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in console.export_text().splitlines() if line.count("│") > 2}
    # all: 500 tokens in 3 s; per trial: mean 200, p50 200, p90 280, max 300
    assert rows["tokens/s"] == ["167", "-", "200", "200", "280", "300"]
    assert rows["evaluate"][0] == "3.00"
    without = Console(record=True, width=120)
    without.print(timing_summary(timings[2:]))
    assert "tokens/s" not in without.export_text()
