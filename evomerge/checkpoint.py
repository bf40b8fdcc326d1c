"""Reading and writing checkpoint files: safetensors shards, without loading whole models.

Reads use positioned reads (``os.pread``) into caller-owned buffers instead of a memory map:
pages of a mapped file count toward the process's resident memory and every first touch is a
page fault, while a pread into a reused buffer costs one copy and keeps the footprint at the
size of the tensors being worked on. Writes stream each tensor to its final offset in a
pre-sized shard, so the whole output never sits in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from queue import Queue

import torch

from evomerge.errors import EvomergeError
from evomerge.strict_io import read_json

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a tensor name appears twice in the header")
    return out


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one .safetensors file's header: name -> where its bytes are.

    Every entry must be an object with a known dtype, a shape of non-negative integers and
    ``data_offsets`` whose span is exactly the shape's bytes, inside the file, overlapping no
    other tensor: a header that lies would otherwise read another tensor's bytes (or none).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, MAX_HEADER_BYTES):  # garbage: do not read (or allocate) it
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length), object_pairs_hook=_no_duplicates)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError, RecursionError) as e:
        raise EvomergeError(f"{path}: not a readable safetensors file ({e}); re-download or re-save it") from None
    data_start, data_size = 8 + length, size - 8 - length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(info, data_size)
        if problem:
            raise EvomergeError(f"{path}: tensor {name}: {problem}; re-download or re-save the file")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, end - begin)
    spans = sorted((e.start, e.start + e.nbytes, n) for n, e in entries.items())
    for (_, end, first), (begin, _, second) in pairwise(spans):
        if begin < end:
            raise EvomergeError(f"{path}: tensors {first} and {second} overlap in the file; "
                                "re-download or re-save it")
    return entries


def _entry_problem(info: object, data_size: int) -> str | None:
    """What is wrong with one header entry, or None."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        return "the header entry is not an object with dtype, shape and data_offsets"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"unsupported dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return "its shape is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {str(offsets)[:40]} are not two increasing non-negative integers"
    if offsets[1] > data_size:
        return "it ends past the end of the file (truncated?)"
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        return f"shape {shape} of {dtype} needs {nbytes} bytes, data_offsets span {offsets[1] - offsets[0]}"
    return None


def index_safetensors(folder: Path, stem: str) -> dict[str, TensorEntry]:
    """All tensors of the ``stem`` checkpoint in a folder (single file or sharded with an index)."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f.endswith(".safetensors") and Path(f).name == f for f in weight_map.values()):
            raise EvomergeError(f"{index}: weight_map is not a mapping of tensor names to shard files "
                                "in the folder; re-download or re-save it")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob(f"{stem}*.safetensors"))
    entries: dict[str, TensorEntry] = {}
    for name in files:
        entries.update(read_safetensors_header(inside_folder(folder, folder / name)))
    return entries


def inside_folder(folder: Path, path: Path) -> Path:
    """``path``, refused when a link takes it outside ``folder`` (a model folder that links to
    ~/.ssh would have the key copied into the output). Links from a Hub cache snapshot into
    its repo's ``blobs`` are how the cache stores files, and allowed."""
    real, root = path.resolve(), folder.resolve()
    allowed = [root] + [p.parent.parent.resolve() / "blobs" for p in [folder, *folder.absolute().parents]
                        if p.parent.name == "snapshots"]
    if not any(real.is_relative_to(a) for a in allowed):
        raise EvomergeError(f"{path}: a link to {real}, outside the model folder; copy the file into "
                            "the folder instead of linking it")
    return path


def read_tensor(entry: TensorEntry, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes from disk (into ``out`` when given, which must match)."""
    if out is None:
        out = torch.empty(entry.shape, dtype=entry.dtype)
    buffer = out.view(-1).view(torch.uint8).numpy()
    with open(entry.file, "rb", buffering=0) as f:
        got = os.preadv(f.fileno(), [buffer], entry.start)
    if got != entry.nbytes:
        raise EvomergeError(f"{entry.file}: truncated while reading a tensor; the file is damaged")
    return out


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickle checkpoint (only when the user allowed it), tensors only."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Writes a known list of tensors into safetensors shards, in any order, one at a time.

    Shard headers are written first (every name, shape and offset is known in advance), then
    each ``write`` puts a tensor's bytes at its place. ``stem`` is ``model`` for transformers and
    ``diffusion_pytorch_model`` for diffusers; a single shard is named ``{stem}.safetensors``.
    """

    def __init__(self, folder: Path, tensors: Iterable[PlannedTensor], stem: str = "model",
                 max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        names = [f"{stem}.safetensors"] if n == 1 else [
            f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        self._fds = []
        weight_map, total = {}, 0
        for file_name, shard in zip(names, shards, strict=True):
            header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
            for t in shard:
                header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
                weight_map[t.name] = file_name
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
            fd = os.open(self.folder / file_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(blob)) + blob)
            os.ftruncate(fd, 8 + len(blob) + offset)
            self._fds.append(fd)
            for t in shard:
                begin = header[t.name]["data_offsets"][0]
                self.where[t.name] = (fd, 8 + len(blob) + begin, t.nbytes)
            total += offset
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fd, offset, nbytes = self.where[name]
        data = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise EvomergeError(f"tensor {name}: {data.nbytes} bytes to write, {nbytes} planned")
        os.pwrite(fd, data, offset)
        self.written.add(name)

    def release(self) -> None:
        """Close the shard files (after a failure: the caller removes the folder)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> None:
        self.release()
        missing = set(self.where) - self.written
        if missing:
            raise EvomergeError(f"output incomplete: {len(missing)} tensors never written, e.g. {min(missing)}")


class WriteBehind:
    """Writes tensors on a background thread (``pwrite`` releases the GIL), so the next tensor
    is merged while this one goes to disk; writing into fresh page-cache pages costs about as
    much as the merge itself. One tensor waits at most: a caller that reuses buffers from
    tensor to tensor must rotate :attr:`BUFFERS` of them (one written, one waiting, one filled).

        with WriteBehind(writer) as out:
            out.write(name, tensor)   # returns once the tensor is queued
    """

    BUFFERS = 3

    def __init__(self, writer: ShardedSafetensorsWriter):
        self.writer = writer
        self._queue: Queue = Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="evomerge-writer", daemon=True)

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((name, tensor))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # reported to the caller on its next write or at exit
                    self._error = e

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is None:
            self.writer.close()
            return
        self.writer.release()
        if exc_type is None:
            raise self._error


def iter_files(folder: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for p in sorted(folder.iterdir()):
        if p.suffix in suffixes:
            yield p
