"""Outputs that are never half written, and never lost.

A folder output is built in a temporary folder beside its destination and swapped in whole:

    with building_folder(out) as tmp:
        ...write everything into tmp...
    # here `out` is the new folder; had anything failed, `out` would still be the old one

While it runs, a lock on the destination keeps a second evomerge process out (it stops with a
one-line error instead of silently replacing the first one's output). Holding that lock also
means every ``.NAME.tmp-*`` / ``.NAME.old-*`` folder beside the destination belongs to a dead
process, so each run first removes them: a killed merge's litter goes on the next run.

The swap: on Linux, ``renameat2(RENAME_EXCHANGE)`` exchanges the two folders in one atomic
step, so at every instant the destination is the whole old folder or the whole new one. Where
that call is missing (other systems, some network file systems) the swap is two renames, old
out then new in; a process killed between them leaves the destination missing and the old
folder at ``.NAME.old-PID``, which the next run on that destination puts back before anything
else. Either way a kill never loses the old output; only the fallback has an instant where the
destination path is empty. (Guarantees are against killed processes, not power cuts: nothing
is fsynced.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errors of an output that no retry fixes: the user must free space or pick another place
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where this system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _beside(dest: Path, kind: str) -> list[Path]:
    """Temporary folders of ``kind`` (tmp, old) for ``dest``, oldest first."""
    found = [Path(p) for p in glob.glob(str(dest.parent / f".{glob.escape(dest.name)}.{kind}-*"))]
    return sorted(found, key=lambda p: p.lstat().st_mtime)


@contextmanager
def output_lock(dest: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``dest``: one writer at a time. The kernel drops the lock when
    its holder dies; the file itself is removed on release (a killed holder's file is reused)."""
    path = dest.parent / f".{dest.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EvomergeError(f"{dest}: another evomerge process (pid {holder}) is writing it; wait for "
                                "it to finish or choose another --out") from None
        try:  # the holder we waited on may have removed the file: lock the one at `path`
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.unlink(path)  # before unlocking, so a newcomer never locks a file that is going away
        os.close(fd)


def _recover_and_clean(dest: Path) -> None:
    """With the lock held: put back an old folder a killed fallback swap left out, then remove
    every dead process's temporary folder."""
    olds = _beside(dest, "old")
    if olds and not os.path.lexists(dest):
        os.rename(olds[-1], dest)
    for p in _beside(dest, "tmp") + _beside(dest, "old"):
        shutil.rmtree(p, ignore_errors=True)


def swap_in(tmp: Path, dest: Path) -> None:
    """Make the finished ``tmp`` folder ``dest``; the old ``dest`` goes only afterwards."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
    elif exchange(tmp, dest):
        shutil.rmtree(tmp)  # it holds the old folder now
    else:
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.rename(dest, old)
        os.rename(tmp, dest)  # killed just before this: the next run on dest puts `old` back
        shutil.rmtree(old)


def _output_error(dest: Path, e: OSError) -> EvomergeError:
    return EvomergeError(f"{dest}: cannot write the output ({e.strerror}); free space, fix permissions "
                         "or choose another --out")


@contextmanager
def building_folder(dest: str | Path) -> Iterator[Path]:
    """An empty folder to build ``dest`` in, swapped in when the block ends without error
    (removed when it fails). See the module docstring for what a kill leaves."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(dest):
            _recover_and_clean(dest)
            tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
            tmp.mkdir()
            try:
                yield tmp
                swap_in(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        if e.errno in _OUTPUT_ERRNOS:
            raise _output_error(dest, e) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file beside it, renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in _OUTPUT_ERRNOS:
            raise _output_error(path, e) from None
        raise


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """JSON through :func:`write_text_atomic` (numbers torch or numpy hand over become floats)."""
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, default=float))


def check_output(dest: str | Path, *, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output that is not a folder, a non-empty one without ``force``, or one that
    equals or contains an input (replacing it would delete that input)."""
    dest = Path(dest)
    if dest.is_symlink():
        raise EvomergeError(f"--out {dest}: a symbolic link (to {os.readlink(dest)}); give a real folder path")
    if dest.exists() and not dest.is_dir():
        raise EvomergeError(f"--out {dest}: a file, not a folder; choose another --out")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise EvomergeError(f"--out {dest} exists and is not empty: choose another --out or pass --force")
    real = dest.resolve()
    for ref in inputs:
        path = Path(ref).expanduser()
        if not path.exists():
            continue  # a Hub id
        inp = path.resolve()
        if inp.is_relative_to(real):
            raise EvomergeError(f"--out {dest}: overlaps the input {ref}; choose an --out outside every input")
