"""Recipes resolve like files: a relative path inside a recipe means the recipe's folder.

A reference that names an existing file or folder under the recipe's folder, or that cannot be a
Hub id (``./x``, ``../x``, ``a/b/c``), becomes an absolute path there; ``owner/name`` and ``name``
that exist nowhere under the folder stay Hub ids. The working directory plays no part.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from evomerge.recipe import Recipe

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
TEMPLATE_FIELD = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# evaluator keys (top level or under data:) that name a file or folder
EVALUATOR_PATH_KEYS = ("path", "prompts", "model_config", "checkpoint", "language_model")


def template_fields(text: str) -> list[str]:
    """``${NAME}`` placeholders left in a recipe's text: such a file is a template to fill in."""
    return sorted(set(TEMPLATE_FIELD.findall(text)))


def resolve_ref(ref: str, folder: Path) -> str:
    """``ref`` against ``folder`` (absolute), unless it is absolute already or a Hub id."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path)
    local = folder / path
    if local.exists() or ref.startswith(".") or not HUB_ID.fullmatch(ref):
        return str(local.resolve())
    return ref


def _resolve_evaluator(spec: dict[str, Any], folder: Path) -> None:
    for key in EVALUATOR_PATH_KEYS:
        if isinstance(spec.get(key), str):
            spec[key] = resolve_ref(spec[key], folder)
    data = spec.get("data")
    if isinstance(data, str):
        spec["data"] = resolve_ref(data, folder)
    elif isinstance(data, dict) and isinstance(data.get("path"), str):
        spec["data"] = {**data, "path": resolve_ref(data["path"], folder)}
    if spec.get("kind") == "python":
        spec.setdefault("import_path", str(folder))


def resolve_recipe_paths(recipe: Recipe, folder: Path) -> Recipe:
    """Every path field of ``recipe`` made absolute against ``folder`` (in place; returned)."""
    from evomerge.recipe import PSRef

    folder = Path(recipe.root).expanduser() if recipe.root else folder
    folder = folder.resolve()

    def ref(value: Any) -> Any:
        if isinstance(value, PSRef):
            for key in ("ps_run", "ps_recipe", "run_dir"):
                if getattr(value, key):
                    setattr(value, key, resolve_ref(getattr(value, key), folder))
            return value
        return resolve_ref(value, folder) if isinstance(value, str) else value

    recipe.base = ref(recipe.base)
    for m in recipe.models:
        m.model = ref(m.model)
    if recipe.dfs is not None:
        recipe.dfs.model_a, recipe.dfs.model_b = ref(recipe.dfs.model_a), ref(recipe.dfs.model_b)
    if recipe.sdxl is not None:
        recipe.sdxl.pipeline = ref(recipe.sdxl.pipeline)
        recipe.sdxl.components = {k: ref(v) for k, v in recipe.sdxl.components.items()}
        if recipe.sdxl.lora is not None:
            recipe.sdxl.lora.path = ref(recipe.sdxl.lora.path)
    if recipe.evaluator:
        _resolve_evaluator(recipe.evaluator, folder)
    return recipe


def importable(folder: str | Path) -> None:
    """Let ``import`` find modules in ``folder`` (appended: it never shadows installed packages)."""
    folder = str(folder)
    if folder not in sys.path:
        sys.path.append(folder)


def pin_root(text: str, recipe_path: Path) -> str:
    """A recipe's text for a copy kept elsewhere (a run folder): its relative paths keep meaning
    the original recipe's folder."""
    if "root" in (yaml.safe_load(text) or {}):
        return text
    return f"root: {json.dumps(str(recipe_path.resolve().parent))}  # folder of the original recipe\n{text}"


def same_recipe(text_a: str, text_b: str) -> bool:
    """Two recipe texts hold the same recipe (a pinned root aside: runs made before roots were
    pinned resume)."""
    a, b = yaml.safe_load(text_a) or {}, yaml.safe_load(text_b) or {}
    a.pop("root", None), b.pop("root", None)
    return a == b
