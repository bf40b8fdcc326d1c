"""The recipes evomerge ships: ``recipes/`` in a source checkout, ``evomerge/recipes`` when
installed from a wheel (setup.py copies the folder in)."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import EvomergeError

_PACKAGE = Path(__file__).resolve().parent


def recipes_dir() -> Path:
    for candidate in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise EvomergeError(f"no recipes folder next to the package ({_PACKAGE}); reinstall evomerge")


def shipped_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))


def recipe_file(path: Path) -> Path:
    """``path`` when it exists, else the shipped recipe of that name (``evollm-jp-ps`` or
    ``evollm-jp-ps.yaml``), so an installed evomerge runs its recipes from any folder."""
    if path.exists() or path.parent != Path("."):
        return path
    for candidate in (recipes_dir() / path.name, recipes_dir() / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    return path
