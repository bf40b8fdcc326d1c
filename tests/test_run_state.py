"""Run state: what run.json records, reruns with and without flags, moved run folders, study
names, validation before anything is written, and the once-per-study / owner-lease mechanics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.pipelines.evolve import Evolution
from evomerge.pipelines.study import (
    INTERRUPTED,
    LEASE,
    OWNER,
    SharedStudy,
    distributions,
    me,
    open_study,
    unused_by_cmaes,
)

TESTS = Path(__file__).parent
PY_EVAL = {"kind": "python", "callable": "scoring:likelihood"}


def recipe_for(path: Path, family: dict, *, name: str = "rs", trials: int = 3, evaluator=None, **extra) -> Path:
    data = {"name": name, "base": str(family["base"]),
            "models": [{"model": str(family[k]), "name": k} for k in ("m1", "m2")],
            "merge": {"method": "task_arithmetic", "search": {"weight": [0, 1]}, "granularity": "per_source"},
            "evaluator": evaluator or PY_EVAL, "search": {"trials": trials}, "seed": 1, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def scoring_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def test_run_json_records_the_run_and_a_moved_folder_resumes_and_reports(llama_fp32, tmp_path, evomerge_cli):
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=3)
    run = tmp_path / "run"
    Evolution(recipe, run_dir=run, storage=f"journal:{run / 'study.journal'}").run(show_progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["storage"] == "journal:{run}/study.journal"  # relative to the run folder
    assert info["study"].startswith("rs-") and len(info["study"]) == len("rs-") + 12
    assert info["sampler"] == {"kind": "cmaes", "popsize": None, "separable": False}
    assert info["seed"] == 1 and len(info["recipe_hash"]) == 12

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(run, moved)
    code, out, err = evomerge_cli("report", moved)
    assert code == 0, err
    assert f"optuna-dashboard {moved / 'study.journal'}" in out
    assert "complete trials CMA-ES did not use: 0 of 3 (0.0%)" in out
    # a rerun without flags resumes the moved study (run.json's storage, sampler, study) to a new total
    outcome = Evolution(recipe, run_dir=moved).run(5, show_progress=False)
    assert [t.number for t in outcome.timings] == [3, 4]
    assert not (tmp_path / "run").exists()


def test_a_worker_joining_before_anything_is_scored_finds_the_same_study(llama_fp32, tmp_path):
    """The first worker has written run.json but is still loading or scoring its baselines: the
    same command without flags joins its study, not a new one in the default storage."""
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=2)
    run = tmp_path / "run"
    first = Evolution(recipe, run_dir=run, storage=f"journal:{run / 'study.journal'}", sampler="random")
    info = json.loads((run / "run.json").read_text())
    joining = Evolution(recipe, run_dir=run)  # nothing scored yet
    assert joining.settings == first.settings
    assert json.loads((run / "run.json").read_text()) == info
    assert joining.storage == f"journal:{run / 'study.journal'}" and joining.sampler_kind == "random"


def test_flags_that_contradict_run_json_are_refused(llama_fp32, tmp_path, evomerge_cli):
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=2)
    run = tmp_path / "run"
    assert evomerge_cli("evolve", recipe, "--run-dir", run, "--device", "cpu")[0] == 0
    for flag, value in (("--sampler", "tpe"), ("--storage", f"journal:{tmp_path / 'j.log'}"), ("--study-name", "other")):
        code, out, err = evomerge_cli("evolve", recipe, "--run-dir", run, "--device", "cpu", flag, value)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{flag} {value}" in err and f"drop {flag} to resume it" in err and "--run-dir NEW_FOLDER" in err
    # the same flags as recorded, and a new total in the recipe, resume
    data = yaml.safe_load(recipe.read_text())
    data["search"]["trials"] = 4
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = evomerge_cli("evolve", recipe, "--run-dir", run, "--device", "cpu", "--sampler", "cmaes")
    assert code == 0, err
    assert len(list((run / "trials").glob("*.json"))) == 4
    assert yaml.safe_load((run / "recipe.yaml").read_text())["search"]["trials"] == 4
    # any other change is another recipe
    data["merge"]["search"] = {"weight": [0, 2]}
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = evomerge_cli("evolve", recipe, "--run-dir", run, "--device", "cpu")
    assert code == 2 and "different recipe" in err


def test_two_recipes_with_one_name_are_two_studies(llama_fp32, tmp_path):
    storage = f"journal:{tmp_path / 'shared.journal'}"
    a = recipe_for(tmp_path / "a.yaml", llama_fp32, name="same", trials=2)
    b = recipe_for(tmp_path / "b.yaml", llama_fp32, name="same", trials=2,
                   merge={"method": "linear", "search": {"weight": [0, 1]}, "granularity": "per_source"})
    Evolution(a, run_dir=tmp_path / "ra", storage=storage).run(show_progress=False)
    Evolution(b, run_dir=tmp_path / "rb", storage=storage).run(show_progress=False)
    names = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(
        optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "shared.journal"))))}
    assert len(names) == 2 and all(n.startswith("same-") for n in names) and set(names.values()) == {2}
    best_a = json.loads((tmp_path / "ra" / "best.json").read_text())
    best_b = json.loads((tmp_path / "rb" / "best.json").read_text())
    assert best_a["values"].keys() == best_b["values"].keys() and best_a != best_b


@pytest.mark.parametrize("case,words", [
    ("evaluator", ["evaluator"]),
    ("sampler", ["--sampler"]),
    ("storage", ["--storage"]),
    ("name", ["name '../escape'", "--run-dir"]),
    ("model", ["missing-model"]),
    ("devices", ["cuda:0", "no such CUDA GPU"]),
])
def test_validation_failures_leave_no_run_folder(llama_fp32, tmp_path, evomerge_cli, case, words):
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32)
    data = yaml.safe_load(recipe.read_text())
    args = ["--device", "cpu"]
    if case == "evaluator":
        data["evaluator"] = {"kind": "python", "callable": "scoring:no_such_function"}
    elif case == "sampler":
        args += ["--sampler", "annealing"]
    elif case == "storage":
        args += ["--storage", "postgresql+nodriver://x@127.0.0.1/db"]
    elif case == "name":
        data["name"] = "../escape"
    elif case == "model":
        data["models"][0]["model"] = str(tmp_path / "missing-model")
    elif case == "devices":
        if __import__("torch").cuda.is_available():
            pytest.skip("this machine has a GPU")
        args = ["--devices", "cuda:0,cuda:1"]
    recipe.write_text(yaml.safe_dump(data))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run = [] if case == "name" else ["--run-dir", tmp_path / "run"]
        code, out, err = evomerge_cli("evolve", recipe, *run, *args)
    finally:
        os.chdir(cwd)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()


def test_a_failing_preflight_stops_before_trial_one_and_a_fixed_recipe_resumes(llama_fp32, tmp_path, evomerge_cli):
    marker = tmp_path / "fail"
    marker.write_text("x")
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, evaluator={**PY_EVAL, "options": {"fail_marker": str(marker)}},
                        baselines=[{"name": "first", "source": "m1"}])
    run = tmp_path / "run"
    code, out, err = evomerge_cli("evolve", recipe, "--run-dir", run, "--device", "cpu")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: preflight: baseline first: RuntimeError: evaluation failed on purpose"), err
    assert not list((run / "trials").glob("*.json"))
    code, out, err = evomerge_cli("evolve", recipe, "--run-dir", run, "--device", "cpu")  # the marker is gone
    assert code == 0, err
    assert len(list((run / "trials").glob("*.json"))) == 3 and "first" in json.loads((run / "baselines.json").read_text())


def test_repeated_identical_failures_stop_the_run(llama_fp32, tmp_path, evomerge_cli):
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=20,
                        evaluator={"kind": "python", "callable": "scoring:fails_after",
                                   "options": {"calls": 1, "counter": str(tmp_path / "calls")}})
    data = yaml.safe_load(recipe.read_text())
    data["search"]["max_consecutive_failures"] = 3
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = evomerge_cli("evolve", recipe, "--run-dir", tmp_path / "run", "--device", "cpu")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: stopped"), err
    assert "the last 3 trials failed the same way" in err and "out of memory" in err
    assert len(list((tmp_path / "run" / "trials").glob("*.json"))) == 3


def test_items_that_are_not_json_are_recorded_as_text(llama_fp32, tmp_path):
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=2, evaluator={"kind": "python", "callable": "scoring:odd_items"})
    run = tmp_path / "run"
    Evolution(recipe, run_dir=run).run(show_progress=False)
    record = json.loads((run / "trials" / "00000.json").read_text())
    assert record["items"][0]["obj"].startswith("<object object") and record["items"][0]["t"] == [1.0, 2.0]
    assert Evolution(recipe, run_dir=run).run(3, show_progress=False).best_value is not None  # resumes


def test_only_trials_of_dead_owners_are_retired(tmp_path):
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study, lock = open_study(f"journal:{tmp_path / 'j.log'}", "s", optuna.samplers.RandomSampler(seed=0))
    shared = SharedStudy(study, lock, space, popsize=None)
    live_elsewhere = {"host": "elsewhere", "boot": "b", "pid": 1, "start": "1"}
    dead_here = {**me(), "pid": 2**22 + 17}  # no such process
    # a container sharing this host's network and boot id: its pids are not ours, its lease counts
    other_container = {**dead_here, "pidns": "pid:[1]"}
    cases = {"live here": (me(), None), "lease held elsewhere": (live_elsewhere, time.time() + 60),
             "lease held in another pid namespace": (other_container, time.time() + 60),
             "lease lapsed elsewhere": (live_elsewhere, time.time() - 1), "dead here": (dead_here, None),
             "no owner": (None, None)}
    ids = {}
    for label, (owner, lease) in cases.items():
        t = study.ask(space)
        if owner is not None:
            study._storage.set_trial_system_attr(t._trial_id, OWNER, owner)
        if lease is not None:
            study._storage.set_trial_system_attr(t._trial_id, LEASE, lease)
        ids[label] = t.number
    retired = set(shared.retire_dead(study.get_trials(deepcopy=False)))
    assert retired == {ids["lease lapsed elsewhere"], ids["dead here"], ids["no owner"]}
    for t in study.get_trials():
        assert (t.state == TrialState.FAIL) == (t.number in retired)
        assert (t.user_attrs.get("reason") == INTERRUPTED) == (t.number in retired)


def test_cmaes_generations_are_never_overfilled_and_trial_zero_is_cmaes(tmp_path):
    """In-process workers taking turns: a worker that finds the generation fully asked waits,
    and every complete trial is one CMA-ES uses."""
    from evomerge.pipelines.study import KnownSpaceCmaEs, generation

    space = {f"x{i}": optuna.distributions.FloatDistribution(0, 1) for i in range(3)}
    popsize = 4
    handles = []
    for _ in range(3):
        study, lock = open_study(f"journal:{tmp_path / 'j.log'}", "g", KnownSpaceCmaEs(space, seed=0, popsize=popsize))
        handles.append(SharedStudy(study, lock, space, popsize))
    running, waits, total = [], 0, 14
    while True:
        for h in handles:  # each asks once per round; trials finish one round later
            claim = h.claim(total)
            if claim.kind == "trial":
                running.append((h, claim.trial))
            waits += claim.kind == "wait"
        if not running and claim.kind == "done":
            break
        h, trial = running.pop(0)
        h.release(trial)
        h.study.tell(trial, -sum((v - 0.3) ** 2 for v in trial.params.values()))
    trials = handles[0].study.get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == total and waits > 0
    assert generation(trials[0]) == 0
    assert unused_by_cmaes(trials, popsize) == (0, total)
    assert max(generation(t) for t in trials) == (total - 1) // popsize
    assert distributions  # imported for the evolve loop


def test_free_running_workers_waste_trials_the_count_sees(tmp_path):
    """The same rounds without the claim protocol (plain Optuna CMA-ES, every worker asks when
    free): trials of past generations go unused, and trial 0 is not CMA-ES's."""
    from evomerge.pipelines.study import generation

    space = {f"x{i}": optuna.distributions.FloatDistribution(0, 1) for i in range(3)}
    studies = [optuna.create_study(study_name="free", storage=f"sqlite:///{tmp_path / 'f.db'}", load_if_exists=True,
                                   direction="maximize", sampler=optuna.samplers.CmaEsSampler(seed=0, popsize=4))
               for _ in range(3)]
    running = []
    for _ in range(8):
        for study in studies:
            running.append((study, study.ask(space)))
        for _ in range(len(studies)):  # finish the oldest trials, keep some running across generations
            study, trial = running.pop(0)
            study.tell(trial, -sum((v - 0.3) ** 2 for v in trial.params.values()))
    trials = studies[0].get_trials()
    unused, complete = unused_by_cmaes(trials, 4)
    assert generation(trials[0]) is None and unused > 0 and complete == 24, unused
    # Optuna's stored CMA-ES state says the same: it was told fewer trials than completed
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    told = optuna.samplers.CmaEsSampler(popsize=4)._restore_optimizer(done).generation
    assert told * 4 + sum(generation(t) == told for t in done) == complete - unused


def test_non_tty_output_logs_one_flushed_line_per_trial(llama_fp32, tmp_path):
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=3)
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "evolve", str(recipe), "--run-dir",
                             str(tmp_path / "run"), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    first = proc.stdout.readline()  # arrives while the run goes on: flushed per trial
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = [first] + out.splitlines()
    trial_lines = [line for line in lines if line.startswith("trial ")]
    assert len(trial_lines) == 3 and all("ETA" in line and "/3 done" in line for line in trial_lines)
    assert "p90" in out and "share" in out  # the timing summary


def test_ctrl_c_retires_the_trial_and_prints_the_resume_command(llama_fp32, tmp_path):
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=4, evaluator={**PY_EVAL, "options": {"sleep": 1.5}})
    run = tmp_path / "run"
    args = ["evolve", str(recipe), "--run-dir", str(run), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().startswith("trial 0:")  # mid-way through trial 1 now
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"Resume with: evomerge {' '.join(args)}" in err
    study = optuna.load_study(study_name=json.loads((run / "run.json").read_text())["study"],
                              storage=f"sqlite:///{run / 'study.db'}")
    states = [(t.state, t.user_attrs.get("reason")) for t in study.get_trials()]
    assert states == [(TrialState.COMPLETE, None), (TrialState.FAIL, INTERRUPTED)]  # nothing left running
    again = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 4


def test_baselines_and_trials_fail_alone_naming_themselves(llama_fp32, tmp_path, evomerge_cli):
    evaluator = {"kind": "python", "callable": "scoring:fails_after", "options": {"calls": 1, "counter": str(tmp_path / "n")}}
    recipe = recipe_for(tmp_path / "r.yaml", llama_fp32, trials=2, evaluator=evaluator,
                        baselines=[{"name": "first", "source": "m1"}, {"name": "second", "source": "m2"}])
    data = yaml.safe_load(recipe.read_text())
    data["search"]["max_consecutive_failures"] = 0  # never stop
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = evomerge_cli("evolve", recipe, "--run-dir", tmp_path / "run", "--device", "cpu")
    assert code == 0 and "Traceback" not in out + err, err
    lines = out.splitlines()
    assert any(line.startswith("baseline second: RuntimeError: CUDA out of memory") and line.endswith("(skipped)")
               for line in lines), out
    assert [line.split(" (")[0] for line in lines if line.startswith("trial ")] == ["trial 0: failed", "trial 1: failed"]
    assert "best score none" in out
    assert set(json.loads((tmp_path / "run" / "baselines.json").read_text())) == {"first"}
