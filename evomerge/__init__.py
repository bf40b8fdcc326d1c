"""evomerge: merge models and let CMA-ES choose the recipe.

The Python API (see :mod:`evomerge.api`): ``evomerge.load_recipe``, ``evomerge.merge`` and
``evomerge.evolve``, imported on first use so ``import evomerge`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "evolve", "load_recipe", "merge"]

if TYPE_CHECKING:
    from evomerge.api import evolve, load_recipe, merge


def __getattr__(name: str) -> Any:
    if name in ("evolve", "load_recipe", "merge"):
        from evomerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
