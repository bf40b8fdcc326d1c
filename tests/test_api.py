"""The Python API (evomerge.merge / evolve / load_recipe) on tiny models, and its examples run
as doctests: the docstrings of evomerge/api.py and the README's "Python API" section."""

from __future__ import annotations

import doctest
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import evomerge
from evomerge.recipe import Recipe

ROOT = Path(__file__).parents[1]
TEXTS = ["abc def 123", "the cat sat", "one two three", "a+b=c? 4", "hello world", "zz yy xx 9"]


@pytest.fixture
def notebook(llama_fp32, tmp_path, monkeypatch) -> Path:
    """A working folder as the README's example expects it: models/{base,math,chat}, texts.jsonl."""
    for name, src in (("base", "base"), ("math", "m1"), ("chat", "m2")):
        shutil.copytree(llama_fp32[src], tmp_path / "models" / name)
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_doctest(text: str, name: str) -> None:
    test = doctest.DocTestParser().get_doctest(text, {}, name, name, 0)
    assert test.examples, f"{name}: no examples"
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


def readme_example() -> str:
    section = re.search(r"^## Python API\n(.*?)^## ", (ROOT / "README.md").read_text(), re.M | re.S)
    assert section, "README has no Python API section"
    return "\n".join(re.findall(r"```python\n(.*?)```", section.group(1), re.S))


def test_readme_python_api_example(notebook):
    run_doctest(readme_example(), "README.md (Python API)")
    assert (notebook / "merged" / "best" / "config.json").exists()


def test_api_docstrings():
    import evomerge.api

    for name, text in [("evomerge.api", evomerge.api.__doc__)] + [
            (f"evomerge.api.{f}", getattr(evomerge.api, f).__doc__) for f in ("load_recipe", "merge", "evolve")]:
        if ">>>" in (text or ""):
            run_doctest(text, name)


def test_a_path_a_dict_and_a_recipe_merge_the_same_bits(notebook):
    data = {"name": "same", "base": "models/base",
            "models": [{"model": "models/math", "name": "math"}, {"model": "models/chat", "name": "chat"}],
            "merge": {"method": "dare_ties", "parameters": {"weight": 0.6, "density": 0.5}}, "seed": 3}
    (notebook / "r.yaml").write_text(yaml.safe_dump(data))
    outs = [evomerge.merge(r, notebook / f"out{i}", show_progress=False)
            for i, r in enumerate([str(notebook / "r.yaml"), data, evomerge.load_recipe(data)])]
    weights = [(o / "model.safetensors").read_bytes() for o in outs]
    assert weights[0] == weights[1] == weights[2]
    assert isinstance(evomerge.load_recipe(notebook / "r.yaml"), Recipe)


def test_evolve_resumes_from_a_dict_and_its_best_merges(notebook):
    recipe = {"name": "tiny-evolve", "base": "models/base",
              "models": [{"model": "models/math", "name": "math"}, {"model": "models/chat", "name": "chat"}],
              "merge": {"method": "task_arithmetic", "search": {"weight": [0, 1]}},
              "evaluator": {"kind": "loss", "data": {"path": "texts.jsonl"}}, "search": {"trials": 2}}
    first = evomerge.evolve(recipe, run_dir="run", show_progress=False)
    again = evomerge.evolve(recipe, run_dir="run", trials=3, show_progress=False, export_best=True)
    assert len(first.timings) == 2 and len(again.timings) == 1  # resumed to the new total
    assert set(again.best_values) == {"math/weight", "chat/weight"}
    assert (notebook / "run" / "best" / "config.json").exists()
    out = evomerge.merge(notebook / "run", "again", values=again.best_values, show_progress=False)
    assert (out / "model.safetensors").read_bytes() == (notebook / "run" / "best" / "model.safetensors").read_bytes()


def test_import_is_cheap():
    code = "import sys, evomerge; assert 'torch' not in sys.modules, 'torch'; print(evomerge.merge.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "evomerge.api"
