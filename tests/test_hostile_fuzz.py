"""A small seeded fuzzer: mutants of valid recipes and mergekit YAMLs through the real CLI entry.
Every mutant either merges (exit 0) or is refused in one line (exit 2); none raises."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import yaml

N_MUTANTS = 40  # per seed config; a refused mutant costs milliseconds, a merged one ~0.1 s

ODD_VALUES = [None, True, -1, 0, 1e308, float("inf"), float("nan"), "", "abc", "../../x", [], [1, "a"],
              {}, {"a": 1}, [[[]]], 10**30, -0.0, "1e3", [None], {"filter": 5}]


def valid_configs(fam: dict[str, Path]) -> dict[str, dict]:
    base, m1, m2 = (str(fam[k]) for k in ("base", "m1", "m2"))
    return {
        "mergekit": {"merge_method": "ties", "base_model": base, "dtype": "float32",
                     "parameters": {"normalize": True},
                     "models": [{"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
                                {"model": m2, "parameters": {"weight": [0.2, 0.8], "density": 0.7}}]},
        "recipe": {"name": "fuzz", "base": base, "models": [{"model": m1, "name": "a"}, m2],
                   "merge": {"method": "dare_ties", "parameters": {"weight": 0.5, "density": 0.6},
                             "granularity": "per_source", "rescale": "l1"},
                   "seed": 3, "search": {"sampler": "random", "trials": 4},
                   "evaluator": {"kind": "ja_math", "data": {"path": "x.jsonl", "limit": 3}, "batch_size": 2},
                   "baselines": [{"name": "a", "source": "a"}]},
    }


def paths(node, prefix=()):
    """Every (path, value) in a nested mapping/list."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def mutate(config: dict, rng: random.Random) -> dict | str:
    """One random structural or textual mutation of a deep copy of ``config``."""
    data = yaml.safe_load(yaml.safe_dump(config))
    where, _ = rng.choice([p for p in paths(data) if p[0]])
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    last = where[-1]
    op = rng.randrange(6)
    if op == 0:
        parent[last] = rng.choice(ODD_VALUES)
    elif op == 1:
        del parent[last]
    elif op == 2 and isinstance(parent, dict):  # a typo in a key
        key = str(last)
        i = rng.randrange(len(key))
        parent[key[:i] + key[i + 1:] or "x"] = parent.pop(last)
    elif op == 3:
        parent[last] = [parent[last]]
    elif op == 4:
        parent[last] = {"nested": parent[last]}
    else:  # text level: cut the document somewhere or duplicate a line
        text = yaml.safe_dump(data, sort_keys=False)
        lines = text.splitlines(keepends=True)
        i = rng.randrange(len(lines))
        return text[: rng.randrange(len(text))] if rng.random() < 0.5 else "".join(lines[:i + 1] + lines[i:])
    return data


@pytest.mark.parametrize("kind", ["mergekit", "recipe"])
def test_mutants_exit_0_or_2_never_a_traceback(llama_fp32, tmp_path, evomerge_cli, kind):
    rng = random.Random(f"evomerge-fuzz-{kind}")
    config = valid_configs(llama_fp32)[kind]
    cfg, out = tmp_path / "c.yaml", tmp_path / "out"
    codes = []
    for _ in range(N_MUTANTS):
        mutant = mutate(config, rng)
        cfg.write_text(mutant if isinstance(mutant, str) else yaml.safe_dump(mutant, sort_keys=False))
        code, _, err = evomerge_cli("merge", cfg, "--out", out, "--device", "cpu", "--force")
        lines = err.strip().splitlines()
        assert code in (0, 2), (cfg.read_text(), err[-2000:])
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), (cfg.read_text(), err[-2000:])
        shutil.rmtree(out, ignore_errors=True)
        codes.append(code)
    assert codes.count(2) >= N_MUTANTS // 4  # the mutations do reach the checks
