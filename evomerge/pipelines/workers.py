"""``evomerge evolve`` as a command: one worker here, or ``--workers K`` / ``--devices a,b``
local workers (each the same command with its own ``--device``), and Ctrl-C that says how to
resume."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from evomerge.errors import EvomergeError
from evomerge.pipelines.study import check_storage


def resume_command(argv: list[str] | None = None) -> str:
    """The command that resumes this run: the one typed (minus local worker flags it keeps)."""
    return "evomerge " + shlex.join(sys.argv[1:] if argv is None else argv)


def evolve_command(recipe: Path, *, trials: int | None, run_dir: Path | None, storage: str | None,
                   study_name: str | None, sampler: str | None, workers: int | None, devices: str | None,
                   export_best: bool, device: str, allow_pickle: bool, trust_remote_code: bool,
                   resolve_device: Callable[[str], str]):
    """Run one worker (returns its outcome), or start local workers and wait for them (exits
    with the worst of their codes)."""
    if workers is not None or devices is not None:
        return start_workers(recipe, trials=trials, run_dir=run_dir, storage=storage, study_name=study_name,
                             sampler=sampler, workers=workers, devices=devices, export_best=export_best,
                             device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             resolve_device=resolve_device)
    from evomerge.pipelines.evolve import Evolution

    try:
        evo = Evolution(recipe, run_dir=run_dir, storage=storage, sampler=sampler, study_name=study_name,
                        device=resolve_device(device), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        command=f"evomerge evolve {shlex.quote(str(recipe))} --run-dir NEW_FOLDER")
        outcome = evo.run(trials, export_best=export_best)
    except KeyboardInterrupt:
        print(f"\ninterrupted; no trial was left half-done. Resume with: {resume_command()}",
              file=sys.stderr, flush=True)
        raise typer.Exit(130) from None
    score = "none (no trial completed)" if outcome.best_value is None else f"{outcome.best_value:.4g}"
    typer.echo(f"best score {score} in {outcome.run_dir} (values in best.json)")
    return outcome


def start_workers(recipe: Path, *, trials: int | None, run_dir: Path | None, storage: str | None,
                  study_name: str | None, sampler: str | None, workers: int | None, devices: str | None,
                  export_best: bool, device: str, allow_pickle: bool, trust_remote_code: bool,
                  resolve_device: Callable[[str], str]):
    """Start the local workers, wait for them, and return the study's outcome."""
    if workers is not None and devices is not None:
        raise EvomergeError("--workers and --devices both start local workers: give one")
    if devices is not None:
        places = [d.strip() for d in devices.split(",") if d.strip()]
        if not places:
            raise EvomergeError(f"--devices {devices!r}: name devices, e.g. cuda:0,cuda:1")
    else:
        places = [device or "cpu"] * int(workers or 1)
    places = [resolve_device(d) for d in places]  # every device checked before any worker starts
    from evomerge.pipelines.run_state import RunPaths, run_folder
    from evomerge.recipe import load_recipe

    folder = run_folder(load_recipe(recipe), run_dir)
    if storage is None and not RunPaths(folder).recorded().get("storage"):
        # several processes on one host: the journal file, not SQLite (whose writers queue)
        storage = f"journal:{folder / 'study.journal'}"
    check_storage(storage, run_dir=folder)
    args = ["evolve", str(recipe), "--run-dir", str(folder)]
    for flag, value in (("--trials", trials), ("--storage", storage), ("--study-name", study_name),
                        ("--sampler", sampler)):
        if value is not None:
            args += [flag, str(value)]
    args += ["--export-best"] * export_best + ["--allow-pickle"] * allow_pickle + \
        ["--trust-remote-code"] * trust_remote_code
    procs = []
    try:
        for i, place in enumerate(places):
            procs.append(subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args, "--device", place]))
            print(f"worker {i + 1}/{len(places)} on {place}: pid {procs[-1].pid}", flush=True)
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the workers got it too: each retires its trial and stops
        for p in procs:
            p.wait()
        print(f"\ninterrupted. Resume with: {resume_command()}", file=sys.stderr, flush=True)
        raise typer.Exit(130) from None
    except BaseException:  # SIGTERM reaches this process only: pass it on
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    if any(codes):  # a worker killed by a signal (wait() < 0) exits as a shell reports it: 128 + N
        raise typer.Exit(max(c if c >= 0 else 128 - c for c in codes))
    from evomerge.pipelines.evolve import EvolveOutcome
    from evomerge.pipelines.run_state import read_json

    best = read_json(RunPaths(folder).best, "best.json") if RunPaths(folder).best.exists() else {}
    return EvolveOutcome(folder, best.get("score"), best.get("values") or {})  # for --push-to-hub
