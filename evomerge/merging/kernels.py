"""Fused CPU kernels for the merge hot loop (C, in ``_kernels.c``), called through ctypes.

torch runs a merge op by op, one pass over memory each; TIES takes a dozen such ops, which on a
CPU keeps it far from the memory-bandwidth floor. These kernels do the same arithmetic in one
pass, bit for bit (tests compare the two; ``_kernels.c`` has the fine print). They are built
with the package (``setup.py``); where they are missing (installed from source without a C
compiler), stale (a build of another ABI version: warned, never called) or switched off with
``EVOMERGE_KERNELS=0``, :func:`supports` is False and the methods run their torch code, which
gives the same bits, only slower. GPU tensors always take the torch code. ``fused.py`` plans
the calls; this module only binds the C functions.

Every function takes flat tensors: ``rows`` is ``(n_sources, n)`` with unit column stride (row
``i`` at ``rows[i]``), and works on columns ``[start, end)`` so callers can split the work
across threads (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # as in _kernels.c
_I32, _I64, _F32, _PTR = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


ABI_VERSION = 2  # must equal EM_ABI_VERSION in _kernels.c: any other build is stale
_SIGNATURES = {
    "em_has_dtype": ([ctypes.c_int], ctypes.c_int),
    "em_max_sources": ([], ctypes.c_int),
    "em_histogram16": ([_PTR, _I64, _PTR], ctypes.c_int),
    "em_tie_cut": ([ctypes.c_int, _PTR, _I64, _I32, _I64, _I64], _I64),
    "em_ties": ([ctypes.c_int, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR,
                 _I32, _F32, _I32], ctypes.c_int),
    "em_linear": ([ctypes.c_int, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I32, _F32],
                  ctypes.c_int),
}


def built_path() -> str | None:
    """Where the compiled kernels of this package are (None: not built)."""
    spec = importlib.util.find_spec("evomerge.merging._kernels")
    if spec is None or not spec.origin or not spec.origin.endswith((".so", ".pyd", ".dylib")):
        return None
    return spec.origin


def load(path: str, abi_version: int = ABI_VERSION) -> ctypes.CDLL | None:
    """The kernel library at ``path`` with its functions typed, or None (with a warning) when it
    is not a build of this ABI: a stale build is never called with the wrong arguments."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:  # a damaged or foreign build: run torch rather than fail
        _warn_stale(path, f"it does not load ({e})")
        return None
    version = getattr(lib, "em_abi_version", None)
    if version is None:
        _warn_stale(path, "it has no ABI version (built before evomerge had one)")
        return None
    version.argtypes, version.restype = [], ctypes.c_int
    if version() != abi_version:
        _warn_stale(path, f"it is ABI {version()}, this evomerge needs {abi_version}")
        return None
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def _warn_stale(path: str, why: str) -> None:
    warnings.warn(f"evomerge's fused CPU merge kernels at {path} are not usable: {why}. CPU merges "
                  "run on torch code (same results, slower); rebuild them with `pip install -e .` or "
                  "`python setup.py build_ext --inplace`.", stacklevel=3)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EVOMERGE_KERNELS", "1") == "0":
        return None
    path = built_path()
    return None if path is None else load(path)


_LIB = _load()
# what this build takes, read once (supports() runs for every tensor of every trial)
_DTYPES = {d for d, code in _CODES.items() if _LIB is not None and _LIB.em_has_dtype(code)}
_MAX_SOURCES = _LIB.em_max_sources() if _LIB is not None else 0
# not built at all: warn at the first CPU merge (a stale build has warned already)
_missing = built_path() is None and os.environ.get("EVOMERGE_KERNELS", "1") != "0"


def warn_if_missing() -> None:
    """Say once that CPU merges will run on the slower torch code (not when switched off)."""
    global _missing
    if _missing:
        _missing = False
        warnings.warn("evomerge's fused CPU merge kernels are not built (installing from source "
                      "needs a C compiler): CPU merges run on torch code, with the same results "
                      "but several times slower. Reinstall with a compiler, or set "
                      "EVOMERGE_KERNELS=0 to silence this.", stacklevel=3)


def available() -> bool:
    """Whether the compiled kernels are loaded (False: torch code only)."""
    return _LIB is not None


def supports(x: torch.Tensor, n_sources: int = 1) -> bool:
    """Whether the kernels can merge ``x`` (a CPU tensor of a dtype they know)."""
    return (_LIB is not None and x.device.type == "cpu" and x.dtype in _DTYPES
            and n_sources <= _MAX_SOURCES)


@contextmanager
def disabled() -> Iterator[None]:
    """Within this block the methods run their torch code (to compare the two paths)."""
    global _LIB
    saved, _LIB = _LIB, None
    try:
        yield
    finally:
        _LIB = saved


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"evomerge kernel {what} failed (status {status})")


def _pointer_and_stride(rows: torch.Tensor) -> tuple[int, int]:
    """(pointer, row stride in elements) of a (n, cols) tensor with unit column stride."""
    if rows.dim() != 2 or rows.stride(1) != 1:
        raise ValueError("kernel rows must be a 2-d tensor with unit column stride")
    return rows.data_ptr(), rows.stride(0)


def _per_row(rows: torch.Tensor, *values: torch.Tensor) -> None:
    """The kernels read one value per row from each of these: check before C does."""
    if any(v.numel() != rows.shape[0] or not v.is_contiguous() for v in values):
        raise ValueError(f"kernel values must hold one entry per row ({rows.shape[0]})")


def _flat(x: torch.Tensor) -> int:
    if not x.is_contiguous():
        raise ValueError("kernel tensors must be contiguous")
    return x.data_ptr()


def histogram16(x: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of each 15-bit magnitude pattern (sign bit cleared) of a bf16/fp16 tensor,
    added into ``counts`` (32768 int64, contiguous) when given."""
    counts = torch.zeros(1 << 15, dtype=torch.int64) if counts is None else counts
    flat = x.reshape(-1)
    _check(_LIB.em_histogram16(_flat(flat), flat.numel(), counts.data_ptr()), "histogram")
    return counts


def tie_cut(flat: torch.Tensor, bits: int, wanted: int, total: int = -1) -> int:
    """The flat index just past the ``wanted``-th entry whose magnitude bits equal ``bits``;
    ``total``, the number of such entries when known, lets the scan start from the nearer end."""
    return int(_LIB.em_tie_cut(_CODES[flat.dtype], _flat(flat), flat.numel(), bits, wanted, total))


def ties(rows: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor, start: int, end: int,
         thresholds: torch.Tensor, cuts: torch.Tensor, weights: torch.Tensor, normalize: bool,
         lam: float) -> None:
    """TIES of the task vectors ``rows`` into ``out[start:end]`` (plus ``base`` when given).

    Row ``i`` keeps entries whose magnitude bits exceed ``thresholds[i]`` (int32) and those
    equal to it at flat index below ``cuts[i]`` (int64); ``weights`` are float32 values already
    rounded to the rows' dtype, as torch rounds them.
    """
    ptr, stride = _pointer_and_stride(rows)
    _per_row(rows, thresholds, cuts, weights)
    _check(_LIB.em_ties(_CODES[rows.dtype], rows.shape[0], ptr, stride,
                        None if base is None else _flat(base), _flat(out), start, end - start,
                        thresholds.data_ptr(), cuts.data_ptr(), weights.data_ptr(),
                        int(normalize), lam, int(lam != 1)), "ties")


def linear(rows: torch.Tensor, out: torch.Tensor, start: int, end: int, weights: torch.Tensor,
           normalize: bool, total: float) -> None:
    """``out[start:end] = sum_i weights[i] * rows[i]`` (float32 fused multiply-adds), divided by
    ``total`` when ``normalize``."""
    ptr, stride = _pointer_and_stride(rows)
    _per_row(rows, weights)
    _check(_LIB.em_linear(_CODES[rows.dtype], rows.shape[0], ptr, stride, _flat(out), start,
                          end - start, weights.data_ptr(), int(normalize), total), "linear")
