"""Where a study lives: storage URLs (journal files, SQLite, PostgreSQL), their checks, and the
claim lock that goes with each storage (see :mod:`evomerge.pipelines.study`).

A claim lock must die with its holder, so that a SIGKILLed worker never blocks the others: an
``flock`` on a file beside a journal or SQLite file (the kernel drops it), or a PostgreSQL
session advisory lock (the server drops it with the connection).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import optuna

from evomerge.errors import EvomergeError, describe


def storage_url(url: str) -> str:
    """``postgresql://`` as typed: SQLAlchemy reads it as psycopg2; with only psycopg 3
    installed (``evomerge[postgres]``) it means ``postgresql+psycopg://``."""
    if url.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def check_storage(url: str | None, flag: str = "--storage", *, run_dir: Path | None = None) -> None:
    """A storage URL SQLAlchemy can open with an installed driver, or a journal in an existing
    folder (or in the run folder, made later)."""
    if url is None:
        return
    file = url.removeprefix("journal:") if url.startswith("journal:") else \
        url.removeprefix("sqlite:///") if url.startswith("sqlite:///") and ":memory:" not in url else None
    if file is not None:
        folder = Path(file).expanduser().absolute().parent
        if not folder.is_dir() and (run_dir is None or folder != run_dir.absolute()):
            raise EvomergeError(f"{flag} {url}: folder {folder} does not exist")
        if url.startswith("journal:"):
            return
    from sqlalchemy.engine import make_url

    try:
        dialect = make_url(storage_url(url)).get_dialect()
    except Exception as e:  # ArgumentError, NoSuchModuleError: all "not a URL we can open"
        raise EvomergeError(f"{flag} {url!r}: not a database URL ({describe(e)}); use "
                            "sqlite:///PATH, postgresql://USER@HOST/DB or journal:PATH") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        hint = "pip install 'evomerge[postgres]' (psycopg 3: postgresql:// or postgresql+psycopg://)" \
            if dialect.name == "postgresql" else f"install the {dialect.driver} driver"
        raise EvomergeError(f"{flag} {url}: the {dialect.name} driver ({dialect.driver}) is not installed; "
                            f"{hint}") from None


class FlockLock:
    """An exclusive ``flock`` on a file: released by the kernel when its holder dies, so a
    SIGKILLed worker never leaves a stale lock (Optuna's journal locks wait out a grace period)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._fd: int | None = None
        self._depth = 0
        self._mutex = threading.RLock()  # the lease thread writes to the journal too

    def acquire(self) -> bool:
        import fcntl

        self._mutex.acquire()
        if self._depth == 0:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as e:  # a read-only or foreign run folder
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._mutex.release()
                raise EvomergeError(f"{self.path}: cannot take the study's lock ({describe(e)}); "
                                    "the run folder must be writable") from None
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        self._mutex.release()

    def __enter__(self) -> FlockLock:
        self.acquire()
        return self

    def close(self) -> None:
        """Nothing held between claims (the file is closed after each)."""

    def __exit__(self, *exc) -> None:
        self.release()


class AdvisoryLock:
    """A PostgreSQL session advisory lock on its own connection (the server drops it when the
    connection dies)."""

    def __init__(self, url: str, name: str):
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        self._key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._text = text
        self._engine = create_engine(url, poolclass=NullPool)
        self._conn: Any = None  # connected on first use: a reader (report) never holds one
        self._mutex = threading.Lock()

    def __enter__(self) -> AdvisoryLock:
        self._mutex.acquire()
        try:
            try:
                self._lock()
            except Exception:  # the idle connection was dropped (server restart, timeouts): once more
                self._conn = None
                self._lock()
        except BaseException:
            self._mutex.release()
            raise
        return self

    def close(self) -> None:
        """Give the lock's connection back (a notebook may run many evolutions in one process)."""
        with self._mutex:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
            self._engine.dispose()

    def _lock(self) -> None:
        if self._conn is None:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._conn.execute(self._text("select pg_advisory_lock(:k)"), {"k": self._key})

    def __exit__(self, *exc) -> None:
        try:
            self._conn.execute(self._text("select pg_advisory_unlock(:k)"), {"k": self._key})
        finally:
            self._mutex.release()


def open_storage(url: str, *, lock_dir: Path | None = None, study: str = "evomerge") -> tuple[optuna.storages.BaseStorage, Any]:
    """The study storage for a URL and the claim lock that goes with it.

    ``journal:PATH`` is Optuna's append-only journal file (several processes on one host or a
    shared file system; much cheaper per write than SQLite). SQLite gets write-ahead logging:
    each trial writes a few dozen small transactions, and WAL commits them without an fsync each
    and lets readers in meanwhile. PostgreSQL is the storage for several machines."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):]).expanduser()
        appends = FlockLock(f"{path}.evomerge-append")  # not the claim lock: the lease thread appends too
        return JournalStorage(JournalFileBackend(str(path), lock_obj=appends)), FlockLock(f"{path}.evomerge-lock")
    url = storage_url(url)
    if url.startswith("sqlite:"):
        check_storage(url, "storage")  # its folder must exist (the lock file goes beside it)
        lock = FlockLock(f"{url.removeprefix('sqlite:///')}.evomerge-lock")
    elif url.startswith("postgresql"):
        lock = AdvisoryLock(url, study)  # one lock per study: other studies on the server go on
    else:  # other servers: one host only (the lock file lives in the run folder)
        lock = FlockLock((lock_dir or Path(".")) / ".study.evomerge-lock")
    with lock:  # two workers creating the tables at once would collide
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as e:
            raise EvomergeError(f"storage {url}: cannot open ({describe(e)})") from None
    if url.startswith("sqlite:"):
        from sqlalchemy import event

        def pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        event.listen(storage.engine, "connect", pragmas)
        storage.engine.dispose()  # connections opened before the listener get reopened with it
    return storage, lock


def open_study(url: str, name: str, sampler: optuna.samplers.BaseSampler, *,
               lock_dir: Path | None = None) -> tuple[optuna.Study, Any]:
    storage, lock = open_storage(url, lock_dir=lock_dir, study=name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with lock:
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                        sampler=sampler, load_if_exists=True)
        except Exception as e:  # a server that does not answer, a file it cannot write...
            raise EvomergeError(f"storage {url}: cannot open the study ({describe(e)})") from None
    return study, lock
