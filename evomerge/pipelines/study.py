"""The study that several ``evomerge evolve`` workers share: storage, sampler, and who asks what.

Every worker is the same command started again (on this host or another sharing the storage).
They coordinate through the storage alone:

- **A claim lock** serialises the decision to ask a trial: a PostgreSQL advisory lock, or an
  ``flock`` on a file beside a journal/SQLite file (:mod:`evomerge.pipelines.storage`). Both
  die with their process.
- **No waste**: Optuna's CMA-ES tags each trial with its generation and tells a generation's
  first ``popsize`` complete trials; complete trials of a past generation are never used. So a
  worker asks only while the current generation has fewer than ``popsize`` trials running or
  complete, and otherwise waits until the generation completes (or one of its trials fails and
  frees its slot). The search space is known up front, so even trial 0 is a CMA-ES sample.
- **Exact total**: no trial is asked once finished + running trials reach the total.
- **Dead workers**: each running trial records its owner (host, boot, pid, process start) and a
  lease the owner renews every 10 s. A trial is retired (failed, "interrupted", its slot asked
  again) only when its owner is dead: a process gone from this host (or a zombie), or a lease
  not renewed for 60 s on another host. A live worker's trial is never retired; the one case
  that looks alike is a worker on another host cut off from the storage for a minute, whose
  late result is then dropped with one line.
- **Once per study**: baselines, the preflight check and the final re-score are claimed with the
  same owner and lease in the study's system attributes, so each is done by one worker.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import EvomergeError
from evomerge.pipelines.storage import check_storage, open_storage, open_study, storage_url

__all__ = ["INTERRUPTED", "SharedStudy", "check_storage", "open_storage", "open_study", "storage_url"]

INTERRUPTED = "interrupted"
OWNER, LEASE = "evomerge:owner", "evomerge:lease"
LEASE_INTERVAL_S = 10.0  # how often an owner renews its leases
LEASE_GRACE_S = 60.0  # a lease not renewed for this long (another host) means its owner is dead


def default_popsize(n_values: int) -> int:
    return 4 + math.floor(3 * math.log(max(n_values, 1)))


# -- the sampler -------------------------------------------------------------------------------


class KnownSpaceCmaEs(optuna.samplers.CmaEsSampler):
    """CMA-ES over a search space known up front: Optuna infers the space from complete trials,
    so its first trial would be sampled at random and tagged with no generation (unused)."""

    def __init__(self, space: dict[str, BaseDistribution], **kwargs):
        super().__init__(n_startup_trials=0, warn_independent_sampling=False, **kwargs)
        self._known = dict(sorted(space.items()))  # Optuna's own order: names sorted

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return dict(self._known)


def make_sampler(kind: str, space: dict[str, BaseDistribution], *, seed: int, popsize: int | None,
                 separable: bool) -> optuna.samplers.BaseSampler:
    """CMA-ES as in the paper (Optuna's defaults: mean at the box centre, sigma 1/6, population
    4 + floor(3 ln n)); random and TPE for comparison."""
    if kind == "cmaes":
        return KnownSpaceCmaEs(space, seed=seed, popsize=popsize, use_separable_cma=separable)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise EvomergeError(f"--sampler {kind!r}: use cmaes, random or tpe")


def distributions(space) -> dict[str, BaseDistribution]:
    return {name: FloatDistribution(*space.bounds(name)) for name in space.names}


# -- owners and leases ---------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks (Linux): a reused pid has another. A zombie (killed,
    not yet reaped by its parent) is dead: "zombie"."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace() -> str:
    """Containers sharing a host's network and boot id have pids of their own: a pid means a
    process only inside one pid namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(), "pid": pid,
            "start": _process_start(pid)}


def owner_alive(owner: dict | None, lease: float | None) -> bool:
    """Whether a trial's (or claim's) owner still runs: on this host, its process; elsewhere,
    its lease."""
    if not isinstance(owner, dict):
        return False  # no owner recorded: a process killed while asking, or an older evomerge
    here = me()
    if all(owner.get(k) == here[k] for k in ("host", "boot", "pidns")):
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's live process
        start = _process_start(pid)
        return start != "zombie" and (not owner.get("start") or start in ("", owner["start"]))
    return isinstance(lease, (int, float)) and time.time() < lease


class Leases:
    """Renews this process's leases in the background, so others see it alive mid-trial."""

    def __init__(self):
        self._renew: dict[str, Callable[[float], None]] = {}
        self._mutex = threading.Lock()  # the registry
        self._renewing = threading.Lock()  # held while renewing: a dropped lease is never renewed after
        self._thread: threading.Thread | None = None
        self._stopped = False

    def hold(self, key: str, renew: Callable[[float], None]) -> None:
        renew(time.time() + LEASE_GRACE_S)
        with self._mutex:
            self._renew[key] = renew
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="evomerge-leases", daemon=True)
                self._thread.start()

    def drop(self, key: str) -> None:
        with self._renewing, self._mutex:
            self._renew.pop(key, None)

    def stop(self) -> None:
        """Renew nothing more; the thread ends at its next wake-up."""
        with self._renewing, self._mutex:
            self._renew.clear()
            self._stopped = True

    def _loop(self) -> None:
        while not self._stopped:
            time.sleep(LEASE_INTERVAL_S)
            with self._renewing:
                with self._mutex:
                    renewals = list(self._renew.values())
                for renew in renewals:
                    with contextlib.suppress(Exception):  # a retired trial: its owner learns at tell
                        renew(time.time() + LEASE_GRACE_S)


# -- trials --------------------------------------------------------------------------------------


def counted(t: FrozenTrial) -> bool:
    """Trials that count toward the total: complete, or failed for a reason of their own."""
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.user_attrs.get("reason") != INTERRUPTED)


def generation(t: FrozenTrial) -> int | None:
    for key, v in t.system_attrs.items():
        if key.endswith(":generation") and isinstance(v, int):  # cma:, sepcma: (CMA-ES records it)
            return v
    return None


def unused_by_cmaes(trials: list[FrozenTrial], popsize: int) -> tuple[int, int]:
    """(complete trials CMA-ES never uses, complete trials). Optuna tells a generation's first
    ``popsize`` complete trials (by number); the rest of that generation, and trials sampled
    outside CMA-ES (no generation), are never used. The last generation's trials are told when
    the study goes on."""
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    seen: dict[int, int] = {}
    unused = 0
    for t in complete:
        g = generation(t)
        if g is None:
            unused += 1
            continue
        seen[g] = seen.get(g, 0) + 1
        unused += seen[g] > popsize
    return unused, len(complete)


@dataclass
class Claim:
    """What a worker may do now: ``trial`` (run it), ``wait`` (why) or ``done``."""

    kind: str
    trial: optuna.Trial | None = None
    why: str = ""
    retired: tuple[int, ...] = ()


class SharedStudy:
    """One worker's handle on the shared study: claims trials and once-per-study jobs."""

    def __init__(self, study: optuna.Study, lock: Any, space: dict[str, BaseDistribution],
                 popsize: int | None):
        self.study, self.lock, self.space, self.popsize = study, lock, space, popsize
        self.leases = Leases()
        self.owner = me()

    @property
    def storage(self):
        return self.study._storage

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def retire_dead(self, trials: list[FrozenTrial]) -> tuple[int, ...]:
        """Mark running trials whose owner is dead failed-interrupted (not counted, redone)."""
        dead = [t for t in trials if t.state == TrialState.RUNNING
                and not owner_alive(t.system_attrs.get(OWNER), t.system_attrs.get(LEASE))]
        retired = []
        for t in dead:
            try:
                self.storage.set_trial_user_attr(t._trial_id, "reason", INTERRUPTED)
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # a cut-off owner came back and told it meanwhile
                continue
            retired.append(t.number)
        return tuple(retired)

    def claim(self, total: int) -> Claim:
        with self.lock:
            trials = self.trials()
            retired = self.retire_dead(trials)
            if retired:
                trials = self.trials()
            finished = sum(counted(t) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= total:
                return Claim("done", retired=retired)
            if finished + running >= total:
                return Claim("wait", why="the last trials are running", retired=retired)
            if self.popsize:
                why = self._generation_full(trials)
                if why:
                    return Claim("wait", why=why, retired=retired)
            trial = self.study.ask(self.space)  # sampled (and its generation tagged) under the lock
            self.storage.set_trial_system_attr(trial._trial_id, OWNER, self.owner)
            self.leases.hold(f"trial:{trial._trial_id}", lambda until, tid=trial._trial_id:
                             self.storage.set_trial_system_attr(tid, LEASE, until))
            return Claim("trial", trial=trial, retired=retired)

    def _generation_full(self, trials: list[FrozenTrial]) -> str:
        gens = [g for t in trials if (g := generation(t)) is not None]
        if not gens:
            return ""
        g = max(gens)
        mine = [t for t in trials if generation(t) == g]
        done = sum(t.state == TrialState.COMPLETE for t in mine)
        asked = done + sum(t.state == TrialState.RUNNING for t in mine)
        if done < self.popsize <= asked:
            return f"generation {g} is fully asked ({done}/{self.popsize} complete)"
        return ""

    def release(self, trial: optuna.Trial) -> None:
        self.leases.drop(f"trial:{trial._trial_id}")

    def close(self) -> None:
        """This worker is done with the study: no more lease renewals, the lock's connection back."""
        self.leases.stop()
        self.lock.close()

    def interrupt(self, trial: optuna.Trial) -> None:
        """This worker stops mid-trial (Ctrl-C, SIGTERM): the trial is retired now, not counted."""
        self.release(trial)
        with contextlib.suppress(Exception):
            self.storage.set_trial_user_attr(trial._trial_id, "reason", INTERRUPTED)
            self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)

    # -- once per study ------------------------------------------------------------------------

    def job(self, key: str) -> dict | None:
        return self.storage.get_study_system_attrs(self.study._study_id).get(f"evomerge:{key}")

    def set_job(self, key: str, value: dict) -> None:
        self.storage.set_study_system_attr(self.study._study_id, f"evomerge:{key}", value)

    def take(self, key: str, *, retry_failed_before: float | None = None) -> str:
        """Claim a once-per-study job: ``mine`` (do it, under a lease), ``done`` (its record
        holds a result), ``failed`` or ``busy`` (a live worker does it). A failed job recorded
        before ``retry_failed_before`` is claimed again."""
        with self.lock:
            rec = self.job(key) or {}
            if "result" in rec:
                return "done"
            if "failed" in rec and (retry_failed_before is None or rec.get("at", 0) >= retry_failed_before):
                return "failed"
            if "owner" in rec and "failed" not in rec and owner_alive(rec["owner"], rec.get("lease")):
                return "busy"
            owner = self.owner
            self.leases.hold(f"job:{key}", lambda until: self.set_job(key, {"owner": owner, "lease": until}))
            return "mine"

    def finish(self, key: str, result: Any = None, *, failed: str | None = None, release: bool = False) -> None:
        """Record a job's result or failure, or (``release``: this worker stops) give it back."""
        self.leases.drop(f"job:{key}")
        if release:
            self.set_job(key, {"released": time.time()})
        elif failed is not None:
            self.set_job(key, {"failed": failed, "at": time.time()})
        else:
            self.set_job(key, {"result": result})

    def wait_job(self, key: str, poll: float = 0.5) -> dict:
        """Wait until another worker's job has a result (or failed, or its owner died)."""
        while True:
            status = self.take(key)
            if status != "busy":
                return {"status": status, **(self.job(key) or {})}
            time.sleep(poll)


class Backoff:
    """``wait()`` sleeps a little longer each time (up to ``most`` seconds) until ``reset()``:
    a worker waiting for a generation looks often at first, then every few seconds."""

    def __init__(self, first: float = 0.2, most: float = 2.0):
        self.first, self.most, self.delay = first, most, first

    def __call__(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 1.5, self.most)

    def reset(self) -> None:
        self.delay = self.first
