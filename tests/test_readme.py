"""The README's commands name files that exist, and the configs it shows load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CONFIG = re.compile(r"(?<![\w/.-])([\w.-]+(?:/[\w.-]+)*\.ya?ml)\b")


def command_blocks() -> list[list[str]]:
    """Fenced bash/sh blocks, and indented command lines (shown in prose sections)."""
    blocks, fence, current = [], None, []
    for line in README.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, current = line[3:].strip(), []
            else:
                if fence in ("", "bash", "sh", "console"):
                    blocks.append(current)
                fence = None
        elif fence is not None:
            current.append(line)
        elif line.startswith("    ") and line.strip().startswith(("evomerge ", "python ", "make ")):
            blocks.append([line])
    return blocks


def named_configs() -> list[str]:
    names = set()
    for block in command_blocks():
        for line in block:
            if line.strip().startswith(("evomerge ", "python ", "make ")):
                command = line.split("#", 1)[0]  # comments may mention files the user writes
                names.update(CONFIG.findall(command))
    return sorted(names)


def test_the_readme_names_configs():
    assert "examples/ties.yaml" in named_configs()


@pytest.mark.parametrize("name", named_configs())
def test_every_config_a_command_names_exists_and_loads(name):
    from evomerge.recipe import load_recipe

    path = ROOT / name
    assert path.is_file(), f"README names {name}, which is not in the repository"
    assert load_recipe(path).merge is not None or load_recipe(path).dfs is not None


def test_shown_files_match_the_repository():
    """A YAML block that starts with `# path` shows that file's content."""
    for path, body in re.findall(r"```yaml\n# ([\w./-]+\.ya?ml)\n(.*?)```", README, re.S):
        assert yaml.safe_load(body) == yaml.safe_load((ROOT / path).read_text()), path


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load(path):
    from evomerge.recipe import load_recipe

    recipe = load_recipe(path)
    assert recipe.models and recipe.merge is not None
