"""Fault injection for `evomerge merge --force`: kill the merge before its Nth file operation.

    python kill_merge.py CONFIG OUT OLD_COPY [--no-exchange] [--signal TERM]

For N = 0, 1, 2... a forked child runs the real CLI with os.mkdir/rename/replace/unlink/rmdir
and evomerge.atomic.exchange wrapped so that the Nth call sends the child SIGKILL (or SIGTERM)
instead; the parent then records what OUT holds, puts the old model back (from OLD_COPY) and
removes the child's leftovers, so every child starts from the same state. It stops at the first
child that finishes. Prints one JSON list: [{"step", "signalled", "state", "leftovers"}...],
where state is the digest of OUT ("missing" when absent) and leftovers the names beside it.
--no-exchange makes the atomic swap unavailable (the two-rename fallback runs);
a fallback run's recovery is recorded as "recovered": the digest after the next run's recovery.
Torch is imported before forking, and the parent runs no torch work, so forking is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import evomerge.atomic as atomic
import evomerge.pipelines.merge  # noqa: F401  (torch and the merge code, imported once before forking)
from evomerge.cli import main

WRAPPED = ("mkdir", "rename", "replace", "unlink", "rmdir")


def digest(folder: Path) -> str:
    if not folder.exists():
        return "missing"
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "README.md":  # the card names the run, not the weights
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def child(config: str, out: Path, step: int, sig: int, exchange: bool) -> None:
    calls = [0]

    def wrap(owner, name):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step + 1:  # once: a SIGTERM handler's cleanup must run unhindered
                os.kill(os.getpid(), sig)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    for name in WRAPPED:
        wrap(os, name)
    if not exchange:
        atomic.exchange = lambda a, b: False
    wrap(atomic, "exchange")
    sys.argv = ["evomerge", "merge", config, "--out", str(out), "--force", "--device", "cpu"]
    sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        main()
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def reset(out: Path, old_copy: Path) -> None:
    for name in leftovers(out):
        p = out.parent / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(old_copy, out)


def sweep(config: str, out: Path, old_copy: Path, sig: int, exchange: bool) -> list[dict]:
    results = []
    for step in range(200):
        reset(out, old_copy)
        pid = os.fork()
        if pid == 0:
            child(config, out, step, sig, exchange)
        _, status = os.waitpid(pid, 0)
        row = {"step": step, "signalled": os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 143,
               "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
               "state": digest(out), "leftovers": leftovers(out)}
        if row["state"] == "missing":  # the fallback's gap: the next run on OUT must restore it
            with contextlib.suppress(RuntimeError), atomic.building_folder(out):
                raise RuntimeError
            row["recovered"] = digest(out)
        results.append(row)
        if not row["signalled"]:
            break
    return results


if __name__ == "__main__":
    config, out, old_copy = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    sig = signal.SIGTERM if "--signal" in sys.argv and sys.argv[sys.argv.index("--signal") + 1] == "TERM" else signal.SIGKILL
    print(json.dumps(sweep(config, out, old_copy, sig, "--no-exchange" not in sys.argv)))
