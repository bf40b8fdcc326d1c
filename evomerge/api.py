"""The Python API: load a recipe, merge once, evolve, from a script or a notebook.

Each function takes the recipe as a path (an evomerge recipe, a mergekit YAML, a run folder or
the name of a shipped recipe), a dict of the same fields, or a :class:`~evomerge.recipe.Recipe`.
Relative model paths in a dict are read from the working directory. Heavy libraries (torch,
transformers) load on the first call, so ``import evomerge`` stays cheap.

A dict is checked as a recipe file is, with one-line errors naming the field:

>>> import evomerge
>>> recipe = evomerge.load_recipe({
...     "name": "two-experts", "base": "/models/base",
...     "models": [{"model": "/models/math", "name": "math"}, {"model": "/models/chat", "name": "chat"}],
...     "merge": {"method": "ties", "parameters": {"weight": 0.5, "density": 0.6}},
... })
>>> recipe.merge.method, [m.label for m in recipe.models]
('ties', ['math', 'chat'])
>>> evomerge.load_recipe({"name": "x", "models": ["/m"], "merge": {"method": "linear"}, "seeds": 1})
Traceback (most recent call last):
  ...
evomerge.errors.EvomergeError: recipe: field seeds: unknown key (a typo?); remove it or check the documented keys

A mergekit config is a dict too (``merge_method`` tells them apart):

>>> evomerge.load_recipe({"merge_method": "slerp", "base_model": "/models/a",
...                       "models": [{"model": "/models/a"}, {"model": "/models/b"}],
...                       "parameters": {"t": 0.3}}).merge.method
'slerp'

:func:`merge` and :func:`evolve` then run them (the README's "Python API" section shows both
on small models).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from evomerge.pipelines.evolve import EvolveOutcome
    from evomerge.recipe import Recipe

RecipeLike = Union[str, Path, Mapping[str, Any], "Recipe"]


def load_recipe(recipe: RecipeLike) -> Recipe:
    """A :class:`~evomerge.recipe.Recipe` from a path, a dict or a Recipe (returned as is).

    A path may be a recipe file, a mergekit YAML, a run folder (its ``recipe.yaml``) or the name
    of a shipped recipe (``"evollm-jp-ps"``).
    """
    from evomerge.recipe import Recipe, recipe_from_data
    from evomerge.recipe import load_recipe as load_file

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_data(copy.deepcopy(dict(recipe)), "recipe", Path.cwd())
    return load_file(_recipe_file(Path(recipe)))


def _recipe_file(path: Path) -> Path:
    from evomerge.shipped import recipe_file

    return path / "recipe.yaml" if path.is_dir() else recipe_file(path)


def merge(config_or_recipe: RecipeLike, out_dir: str | Path, *, values: Mapping[str, float] | None = None,
          force: bool = False, device: str = "cpu", allow_pickle: bool = False,
          trust_remote_code: bool = False, allow_nonfinite: bool = False,
          show_progress: bool = True) -> Path:
    """Merge once into ``out_dir`` (a model folder stock ``from_pretrained`` loads); returns it.

    The recipe's fixed values are used, and ``values`` for searched ones (as ``best.json`` names
    them, e.g. ``{"math/weight": 0.7}``). A run folder merges with its best values, as
    ``evomerge merge RUN OUT`` does. ``force`` replaces a non-empty ``out_dir``.
    """
    from evomerge.pipelines.merge import merge_recipe

    run_values: dict[str, float] = {}
    if isinstance(config_or_recipe, (str, Path)) and Path(config_or_recipe).is_dir():
        from evomerge.pipelines.evolve import best_values

        run_values = best_values(Path(config_or_recipe))
    return merge_recipe(load_recipe(config_or_recipe), out_dir, {**run_values, **(values or {})},
                        device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        allow_nonfinite=allow_nonfinite, force=force, show_progress=show_progress)


def evolve(recipe: RecipeLike, *, run_dir: str | Path | None = None, trials: int | None = None,
           export_best: bool = False, storage: str | None = None, sampler: str | None = None,
           device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False,
           show_progress: bool = True) -> EvolveOutcome:
    """Search the recipe's values (CMA-ES unless it says otherwise), as ``evomerge evolve`` does.

    ``run_dir`` (default ``runs/<name>``) holds the study, every trial and ``best.json``; a rerun
    on it resumes until ``trials`` trials (default: the recipe's ``search.trials``) have finished.
    ``export_best`` writes the best model to ``run_dir/best``. Returns the outcome: ``best_value``,
    ``best_values`` (ready for :func:`merge`), per-trial ``timings`` and ``baselines``.
    """
    import yaml
    from rich.console import Console

    from evomerge.pipelines.evolve import Evolution

    options = dict(run_dir=run_dir, storage=storage, sampler=sampler, device=device, allow_pickle=allow_pickle,
                   trust_remote_code=trust_remote_code, console=Console(quiet=not show_progress))
    if isinstance(recipe, (str, Path)):
        evolution = Evolution(_recipe_file(Path(recipe)), **options)
        return evolution.run(trials, export_best=export_best, show_progress=show_progress)
    # Evolution keeps a copy of a recipe file in the run folder: write one (paths are absolute by
    # now; the root pinned to the working directory, so a rerun finds the same recipe and resumes)
    data = {"root": str(Path.cwd()), **load_recipe(recipe).model_dump(mode="json", exclude_defaults=True)}
    with tempfile.TemporaryDirectory(prefix="evomerge-recipe-") as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return Evolution(path, **options).run(trials, export_best=export_best, show_progress=show_progress)
