"""What a recipe will cost, read from configs alone (models built on the meta device, no weights).

Reports the searched values, the CMA-ES population and generations, and the memory the merge
needs: the resident model, the cached inputs of the trial path (base + one task vector per
source), and the streaming export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from evomerge.dtypes import default_dtype
from evomerge.merging.registry import get_method
from evomerge.merging.space import SearchSpace
from evomerge.modalities import get_adapter
from evomerge.modalities.base import Adapter, TensorSource, reference_config
from evomerge.pipelines.evolve import default_popsize
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.pipelines.dfs_plan import DFSPlan


@dataclass
class Plan:
    recipe: str
    modality: str
    method: str
    parameters: int  # parameters of the output model
    merged_parameters: int
    searched_values: int
    groups: int
    sampler: str
    popsize: int
    trials: int
    generations: int
    dtype: str
    resident_model_gb: float
    trial_cache_gb: float  # base + one task vector per source, kept for the trial path
    total_trial_memory_gb: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan_reference(recipe: Recipe, adapter: Adapter) -> TensorSource:
    """The reference a merge of ``recipe`` would take (the same choice), as far as configs tell:
    its config, and its tensors' headers when its weights are on disk (for the default dtype)."""
    ref = reference_config(adapter, recipe)
    return TensorSource.from_headers(ref.label, ref.folder, adapter.weights_stem, ref.config)


def make_plan(recipe: Recipe) -> Plan | DFSPlan:
    if recipe.dfs is not None:
        from evomerge.pipelines.dfs_plan import make_dfs_plan

        return make_dfs_plan(recipe)
    adapter = get_adapter(recipe.modality, grouping=recipe.grouping)
    method = get_method(recipe.merge.method)
    reference = plan_reference(recipe, adapter)
    state = dict(adapter.empty_model(reference.folder).state_dict())
    merged = {n: t for n, t in state.items()
              if t.is_floating_point() and adapter.merge_role(n, reference) == "merge"}
    groups = adapter.groups(list(merged))
    space = SearchSpace.from_spec(recipe.merge, method, [m.label for m in recipe.models], groups)
    dtype = default_dtype(recipe.dtype, reference)
    size = torch.empty((), dtype=dtype).element_size()
    n_params = sum(t.numel() for t in state.values())
    n_merged = sum(t.numel() for t in merged.values())
    cached_inputs = len(recipe.models) + (1 if method.on_deltas else 0)
    popsize = recipe.search.popsize or (default_popsize(len(space)) if recipe.search.sampler == "cmaes" else 1)
    gb = 1 / 2**30
    resident = n_params * size * gb
    cache = n_merged * size * cached_inputs * gb
    return Plan(recipe.name, recipe.modality, method.name, n_params, n_merged, len(space), len(groups),
                recipe.search.sampler, popsize, recipe.search.trials,
                math.ceil(recipe.search.trials / popsize), str(dtype).removeprefix("torch."),
                round(resident, 3), round(cache, 3), round(resident + cache, 3))
