"""Several `evomerge evolve` processes on one study (issue 14's bar): real processes, real
storages (a journal file; PostgreSQL when a server answers), tiny real models.

The bar: the same command started 4 times on one storage (one first, three joining while it
runs), one of them SIGKILLed mid-trial: exactly N complete trials, no traceback, every
surviving worker exits 0, and at most 2% of complete trials unused by CMA-ES.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.pipelines.study import (
    INTERRUPTED,
    OWNER,
    default_popsize,
    generation,
    open_storage,
    unused_by_cmaes,
)

TESTS = Path(__file__).parent
STORAGES: dict[str, optuna.storages.BaseStorage] = {}
PG_URL = os.environ.get("EVOMERGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def postgres() -> str:
    """PostgreSQL's URL when a server answers; with CI=true a missing server fails the test."""
    try:
        import psycopg

        psycopg.connect(PG_URL.replace("postgresql://", "postgresql://", 1), connect_timeout=3).close()
    except Exception as e:  # no driver, no server
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_URL} is needed under CI=true: {type(e).__name__}: {e}")
        pytest.skip(f"no PostgreSQL at {PG_URL} ({type(e).__name__})")
    return PG_URL


def write_recipe(path: Path, family: dict, *, trials: int, sleep: float, baselines=()) -> Path:
    recipe = {"name": "shared", "base": str(family["base"]),
              "models": [{"model": str(family[k]), "name": k} for k in ("m1", "m2")],
              "merge": {"method": "ties", "search": {"weight": [0, 1], "density": [0.1, 1]},
                        "granularity": "per_source"},
              "evaluator": {"kind": "python", "callable": "scoring:likelihood", "options": {"sleep": sleep}},
              "search": {"trials": trials}, "seed": 5, "baselines": list(baselines)}
    path.write_text(yaml.safe_dump(recipe))
    return path


def load(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return []
    if url not in STORAGES:  # one per test process: a new engine per poll would use up the server's connections
        STORAGES[url] = open_storage(url)[0]
    try:
        return optuna.load_study(study_name=name, storage=STORAGES[url]).get_trials(deepcopy=False)
    except KeyError:
        return []


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start(cmd: list[str], logs: Path, i: int) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(logs / f"w{i}.out", "w"), stderr=open(logs / f"w{i}.err", "w"),
                            env=env())


def run_bar(family: dict, tmp_path: Path, storage: str, *, trials: int = 45) -> dict:
    recipe = write_recipe(tmp_path / "r.yaml", family, trials=trials, sleep=0.4,
                          baselines=[{"name": "m1", "source": "m1"}, {"name": "avg", "method": "linear",
                                                                        "parameters": {"weight": 1.0}}])
    name = f"bar-{uuid.uuid4().hex[:8]}"
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "evomerge.cli", "evolve", str(recipe), "--run-dir", str(run),
           "--storage", storage, "--study-name", name, "--device", "cpu"]
    t0 = time.time()
    workers = [start(cmd, tmp_path, 0)]
    wait_until(lambda: sum(t.state == TrialState.COMPLETE for t in load(storage, name)) >= 2, 240, "worker 0's trials")
    workers += [start(cmd, tmp_path, i) for i in (1, 2, 3)]
    victim = workers[1]

    def victim_mid_trial() -> bool:
        trials = load(storage, name)
        mine = [t for t in trials if (t.system_attrs.get(OWNER) or {}).get("pid") == victim.pid]
        return any(t.state == TrialState.COMPLETE for t in mine) and any(t.state == TrialState.RUNNING for t in mine)

    wait_until(victim_mid_trial, 240, "the victim to be mid-trial")
    time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    codes = {i: w.wait(timeout=300) for i, w in enumerate(workers)}
    wall = time.time() - t0
    trials = load(storage, name)
    logs = {i: (tmp_path / f"w{i}.out").read_text() + (tmp_path / f"w{i}.err").read_text() for i in range(4)}
    popsize = default_popsize(4)  # weight and density for two sources
    unused, complete = unused_by_cmaes(trials, popsize)
    return {"name": name, "codes": codes, "trials": trials, "logs": logs, "unused": unused, "complete": complete,
            "popsize": popsize, "run": run, "wall": wall, "victim": victim.pid}


def check_bar(result: dict, trials: int = 45) -> None:
    codes, logs = result["codes"], result["logs"]
    assert codes[1] == -signal.SIGKILL
    assert {i: c for i, c in codes.items() if i != 1} == {0: 0, 2: 0, 3: 0}, logs
    for text in logs.values():
        assert "Traceback" not in text, text[-3000:]
    states = [t.state for t in result["trials"]]
    assert states.count(TrialState.COMPLETE) == trials
    assert TrialState.RUNNING not in states
    failed = [t for t in result["trials"] if t.state == TrialState.FAIL]
    # the victim's trial was retired (not counted) and its slot asked again, once
    assert len(failed) == 1 and failed[0].user_attrs.get("reason") == INTERRUPTED
    assert (failed[0].system_attrs[OWNER])["pid"] == result["victim"]
    assert result["unused"] <= 0.02 * result["complete"], result["unused"]
    assert all(generation(t) is not None for t in result["trials"])  # trial 0 too: every trial is CMA-ES's
    # Optuna's own record agrees: the CMA-ES state its last trial stored has been told every full
    # generation, so it counts the complete trials of the generations before it and the current one
    complete = sorted((t for t in result["trials"] if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    told = optuna.samplers.CmaEsSampler(popsize=result["popsize"])._restore_optimizer(complete).generation
    assert told * result["popsize"] + sum(generation(t) == told for t in complete) == trials
    # baselines scored once among the four workers
    for name in ("m1", "avg"):
        assert sum(f"baseline {name}:" in text for text in logs.values()) == 1, logs
    assert set(json.loads((result["run"] / "baselines.json").read_text())) == {"m1", "avg"}
    # every worker that finished reports the same best
    best = json.loads((result["run"] / "best.json").read_text())
    complete = [t for t in result["trials"] if t.state == TrialState.COMPLETE]
    assert best["score"] == pytest.approx(max(t.value for t in complete))
    print(f"\nbar ({result['name']}): {result['complete']} complete, {result['unused']} unused by CMA-ES "
          f"({result['unused'] / result['complete']:.1%}), popsize {result['popsize']}, exit codes {result['codes']}, "
          f"{result['wall']:.0f} s wall")


def test_four_workers_one_killed_on_a_journal(llama_fp32, tmp_path, evomerge_cli):
    result = run_bar(llama_fp32, tmp_path, f"journal:{tmp_path / 'study.journal'}")
    check_bar(result)
    code, out, err = evomerge_cli("report", result["run"])
    assert code == 0, err
    assert f"complete trials CMA-ES did not use: {result['unused']} of 45" in out


def test_four_workers_one_killed_on_postgresql(llama_fp32, tmp_path, postgres, evomerge_cli):
    result = run_bar(llama_fp32, tmp_path, postgres)
    try:
        check_bar(result)
        code, out, err = evomerge_cli("report", result["run"])
        assert code == 0, err
        assert f"complete trials CMA-ES did not use: {result['unused']} of 45" in out and "postgresql://" in out
    finally:
        optuna.delete_study(study_name=result["name"], storage=STORAGES[postgres])


def test_local_workers_started_together(llama_fp32, tmp_path):
    """--workers 2: both start at once; the total is exact and each baseline is scored once."""
    recipe = write_recipe(tmp_path / "r.yaml", llama_fp32, trials=10, sleep=0.2,
                          baselines=[{"name": "m1", "source": "m1"}, {"name": "m2", "source": "m2"}])
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "evolve", str(recipe), "--run-dir", str(run),
                          "--workers", "2", "--export-best"], capture_output=True, text=True, env=env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("worker ") >= 2 and "Traceback" not in out.stderr
    assert out.stdout.count("best model written to") == 1 and (run / "best" / "config.json").exists()
    for name in ("m1", "m2"):
        assert out.stdout.count(f"baseline {name}:") == 1, out.stdout
    info = json.loads((run / "run.json").read_text())
    assert info["storage"] == "journal:{run}/study.journal"
    trials = load(f"journal:{run / 'study.journal'}", info["study"])
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 10 and len(trials) == 10
    owners = {t.system_attrs[OWNER]["pid"] for t in trials}
    assert len(owners) == 2  # both workers ran trials


def test_missing_postgres_driver_is_one_line(llama_fp32, tmp_path, evomerge_cli, monkeypatch):
    """A PostgreSQL URL without its driver: one line saying what to install, before any folder."""
    for module in ("psycopg", "psycopg2"):  # as on a machine without evomerge[postgres]
        monkeypatch.setitem(sys.modules, module, None)
    recipe = write_recipe(tmp_path / "r.yaml", llama_fp32, trials=2, sleep=0)
    code, out, err = evomerge_cli("evolve", recipe, "--run-dir", tmp_path / "run", "--device", "cpu",
                                  "--storage", "postgresql://postgres@127.0.0.1/test")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "pip install 'evomerge[postgres]'" in err and not (tmp_path / "run").exists()


def test_a_worker_joins_a_running_sqlite_study(llama_fp32, tmp_path):
    """The default storage (SQLite in the run folder): a second worker joins mid-run."""
    # trials slow enough that the second worker (seconds of start-up on a loaded machine) gets some
    recipe = write_recipe(tmp_path / "r.yaml", llama_fp32, trials=16, sleep=0.8)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "evomerge.cli", "evolve", str(recipe), "--run-dir", str(run), "--device", "cpu"]
    first = start(cmd, tmp_path, 0)
    url = f"sqlite:///{run / 'study.db'}"

    def name() -> str:
        return json.loads((run / "run.json").read_text())["study"] if (run / "run.json").exists() else "-"

    wait_until(lambda: sum(t.state == TrialState.COMPLETE for t in load(url, name())) >= 2, 240, "trials")
    second = start(cmd, tmp_path, 1)
    assert (first.wait(timeout=300), second.wait(timeout=300)) == (0, 0), (tmp_path / "w1.err").read_text()[-2000:]
    trials = load(url, name())
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 16
    assert {t.system_attrs[OWNER]["pid"] for t in trials} == {first.pid, second.pid}
    assert unused_by_cmaes(trials, default_popsize(4)) == (0, 16)


def test_estimated_fitness_rescores_once_among_workers(llama_fp32, tmp_path):
    from test_fitness import loss_recipe

    recipe = loss_recipe(tmp_path, llama_fp32, {"mode": "estimated", "anchors": 10, "rescore": 3}, trials=8)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "evolve", str(recipe), "--run-dir", str(run),
                          "--workers", "2"], capture_output=True, text=True, env=env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("re-scored trial") == 3, out.stdout  # by one worker only
    rescored = json.loads((run / "rescored.json").read_text())
    best = json.loads((run / "best.json").read_text())
    assert len(rescored) == 3 and "estimate" in best and str(best["trial"]) in rescored
    assert best["score"] == max(e["score"] for e in rescored.values() if e["full"])
    assert out.stdout.count(f"best score {best['score']:.4g}") == 2  # both workers end on the re-scored best


def test_racing_workers_share_the_incumbent(llama_fp32, tmp_path):
    """Racing with two workers: each races against the best fully scored trial of the study."""
    from test_fitness import loss_recipe

    recipe = loss_recipe(tmp_path, llama_fp32, {"mode": "racing", "chunk": 5}, trials=10)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "evolve", str(recipe), "--run-dir", str(run),
                          "--workers", "2"], capture_output=True, text=True, env=env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (run / "trials").glob("*.json")]
    best = json.loads((run / "best.json").read_text())
    assert len(records) == 10 and best["metrics"]["fitness_full"]
    assert best["score"] == max(r["score"] for r in records)


def test_the_postgresql_claim_lock_survives_a_dropped_connection(postgres):
    """The lock's connection idles through a whole trial; a server restart or an idle timeout
    drops it, and the next claim reconnects instead of failing."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from evomerge.pipelines.storage import AdvisoryLock

    lock = AdvisoryLock(postgres, f"drop-{uuid.uuid4().hex[:8]}")
    with lock:
        pid = lock._conn.execute(text("select pg_backend_pid()")).scalar()
    admin = create_engine(postgres, poolclass=NullPool)
    with admin.connect() as conn:
        assert conn.execute(text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
    with lock:
        assert lock._conn.execute(text("select pg_backend_pid()")).scalar() != pid
    lock._conn.close()
    admin.dispose()
