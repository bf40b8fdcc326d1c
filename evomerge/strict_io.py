"""Reading the small text files users hand us (recipes, mergekit YAMLs, config and index JSON)
with bounds, so a hostile file gives one line instead of a traceback or an exhausted machine.

YAML: safe tags only, duplicate keys refused (PyYAML silently keeps the last), nesting depth
and alias expansion capped (an alias bomb is a few lines that expand to billions of nodes when
anything walks the result). JSON: UTF-8 text only; nesting too deep
for the parser is an error like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from evomerge.errors import EvomergeError

MAX_YAML_BYTES = 512 * 2**10  # recipes are kilobytes; a pure-Python YAML parse is slow
MAX_JSON_BYTES = 64 * 2**20  # configs and shard indexes: kilobytes to a few MB
MAX_DEPTH = 64
MAX_NODES = 50_000  # values in a document, aliases expanded (a big mergekit config has ~2,000)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and caps depth and expanded size."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            if self._nodes > MAX_NODES:  # stop parsing now: a recipe holds hundreds of values
                raise yaml.YAMLError(f"more than {MAX_NODES} values")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):  # before merge keys (<<) are flattened into it
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.YAMLError(f"duplicate key {key!r} (lines {seen[key]} and {line}); keep one")
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: Node, memo: dict[int, int], path: set[int]) -> int:
    """Nodes in the tree once every alias is expanded (a shared node counts once per use)."""
    if id(node) in path:
        raise yaml.YAMLError("an alias refers to a node that contains it (a recursive alias)")
    if id(node) not in memo:
        path.add(id(node))
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(_expanded_size(n, memo, path) for n in node.value)
        elif isinstance(node, MappingNode):
            size += sum(_expanded_size(k, memo, path) + _expanded_size(v, memo, path) for k, v in node.value)
        path.discard(id(node))
        memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


def read_text(path: Path, what: str, limit: int = MAX_YAML_BYTES) -> str:
    """The UTF-8 text of a small file, refused when binary or over ``limit`` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise EvomergeError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > limit:
        raise EvomergeError(f"{path}: larger than {limit // 2**10} KB; not a {what}")
    if b"\x00" in data:
        raise EvomergeError(f"{path}: a binary file, not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvomergeError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None


def parse_yaml(text: str, path: str | Path, what: str = "YAML file") -> Any:
    """The YAML document ``text`` (read from ``path``), with one-line errors for anything unsafe
    or malformed."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_NODES:
            raise yaml.YAMLError(f"aliases expand it to more than {MAX_NODES} values; write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise EvomergeError(f"{path}: not a valid {what} ({str(e).splitlines()[0]})") from None
    finally:
        loader.dispose()


def read_json(path: str | Path, what: str, *, expect: type = dict) -> Any:
    """The JSON value in ``path``, which must be an ``expect`` (dict by default)."""
    path = Path(path)
    try:
        value = json.loads(read_text(path, what, MAX_JSON_BYTES))
    except (ValueError, RecursionError) as e:  # json raises RecursionError on deep nesting
        raise EvomergeError(f"{path}: not a valid {what} ({str(e)[:80]}); re-download or re-save it") from None
    if not isinstance(value, expect):
        raise EvomergeError(f"{path}: not a valid {what} (a JSON {type(value).__name__}, "
                            f"expected an {'object' if expect is dict else expect.__name__})")
    return value
