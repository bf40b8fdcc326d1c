"""Rows of an evaluation data set, from a local file or the Hugging Face Hub.

A data spec is a small dict::

    {"path": "mgsm_ja.jsonl"}                                # local JSONL / JSON / CSV / TSV / parquet
    {"hub": "juletxara/mgsm", "config": "ja", "split": "test"}   # datasets.load_dataset
    {"path": "juletxara/mgsm", "config": "ja"}               # a path that is no file is a Hub id

plus ``offset`` and ``limit`` to take a slice (``offset`` first). Rows come back as plain dicts
in file order, so the same spec always yields the same questions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from evomerge.errors import EvomergeError, describe

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_jsonl(path: Path, *, numbered: bool = False) -> list:
    """Objects of a JSON Lines file (blank lines skipped); errors name the file and line.
    With ``numbered`` each row comes as ``(line_number, object)``."""
    rows: list = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvomergeError(f"{path}: not UTF-8 text (byte {e.start}); is it a JSON Lines file?") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise EvomergeError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
        if not isinstance(row, dict):
            raise EvomergeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row) if numbered else row)
    return rows


def read_local(path: Path) -> list[dict]:
    """Rows of a local JSONL, JSON (a list of objects), CSV, TSV or parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return read_jsonl(path)  # JSON Lines under a .json name (or an error naming the line)
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise EvomergeError(f"{path}: expected a list of JSON objects")
        return data
    if suffix in (".csv", ".tsv"):
        try:
            with open(path, encoding="utf-8", newline="") as f:
                return [dict(r) for r in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
        except (UnicodeDecodeError, csv.Error) as e:
            raise EvomergeError(f"{path}: not a readable {suffix[1:].upper()} file ({e})") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise EvomergeError(f"{path}: cannot read parquet ({e})") from None
    raise EvomergeError(f"{path}: unsupported data file type {suffix!r} "
                        f"(use one of {', '.join(LOCAL_SUFFIXES)})")


def read_hub(dataset_id: str, config: str | None, split: str) -> list[dict]:
    """Rows of one split of a Hub (or local ``datasets``-loadable) data set."""
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # offline, missing config, auth: one line for the user
        raise EvomergeError(f"data set {dataset_id!r} (config {config!r}, split {split!r}): "
                            f"could not load ({describe(e)})") from None
    return [dict(r) for r in ds]


def load_rows(spec: dict) -> list[dict]:
    """Rows a data spec names, sliced by ``offset`` and ``limit``.

    Keys: ``path`` (local file, or a Hub id when no such file exists) or ``hub``; ``config``;
    ``split`` (default ``"test"``, Hub only); ``offset`` (default 0); ``limit`` (default all).
    """
    source = spec.get("path") or spec.get("hub")
    if not source:
        raise EvomergeError("data: give 'path' (a local file) or 'hub' (a data set id)")
    local = Path(str(source)).expanduser()
    if spec.get("path") and local.is_file():
        rows = read_local(local)
    elif spec.get("path") and (local.suffix.lower() in LOCAL_SUFFIXES or str(source).startswith((".", "/", "~"))):
        raise EvomergeError(f"data file {str(source)!r} does not exist")
    else:
        rows = read_hub(str(source), spec.get("config"), spec.get("split") or "test")
    offset = int(spec.get("offset") or 0)
    limit = spec.get("limit")
    if offset < 0 or (limit is not None and int(limit) < 0):
        raise EvomergeError("data: 'offset' and 'limit' must be >= 0")
    rows = rows[offset:]
    if limit is not None:
        rows = rows[: int(limit)]
    return rows
