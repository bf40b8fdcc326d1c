"""What a DFS recipe costs, from configs alone (``evomerge plan``), and the report's grid of a
DFS trial's values."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.dtypes import default_dtype
from evomerge.errors import EvomergeError
from evomerge.merging.dfs import DFSSpace
from evomerge.modalities import get_adapter
from evomerge.modalities.base import TensorSource, config_folder, reference_config
from evomerge.modalities.dfs_path import check_same_family, decoder_of
from evomerge.pipelines.evolve import default_popsize
from evomerge.recipe import DFSSpec, PSRef, Recipe, load_recipe


@dataclass
class DFSPlan:
    recipe: str
    modality: str
    method: str
    model_a: str
    model_b: str
    layers_a: int
    layers_b: int
    repeats: int
    slots: int
    scales: str
    searched_values: int
    indicator_values: int
    scale_values: int
    sampler: str
    popsize: int
    separable: bool
    trials: int
    generations: int
    dtype: str
    parameters_a: int
    initial_path_layers: int
    max_path_layers: int
    resident_models_gb: float  # A and B, loaded once; paths share their layers
    export_gb_per_layer: float
    export_gb_initial: float
    notes: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def ref_config_folder(ref: str | PSRef) -> Path:
    """A folder with config.json for a DFS model reference, without running anything: a PS
    reference reads its export if there is one, else its recipe's reference model."""
    if isinstance(ref, str):
        return config_folder(ref, None)
    run = Path(ref.ps_run) if ref.ps_run else (Path(ref.run_dir) if ref.run_dir else None)
    if ref.ps_recipe is not None:
        ps = load_recipe(ref.ps_recipe)
        run = run or Path("runs") / ps.name
    else:
        if not (run / "recipe.yaml").exists() and not (run / "best" / "config.json").exists():
            raise EvomergeError(f"dfs: PS run {run} has no recipe.yaml")
        ps = None
    if (run / "best" / "config.json").exists():
        return run / "best"
    ps = ps or load_recipe(run / "recipe.yaml")
    if ps.dfs is not None or not ps.models:
        raise EvomergeError("dfs: a PS reference must name a parameter-space recipe or run")
    return reference_config(get_adapter(ps.modality), ps).folder


def dfs_value_grid(params: dict[str, float], recipe: Recipe) -> tuple[list[str], list[str], list[list[float]]]:
    """The report's heatmap for a DFS trial: one row per repetition (indicator of each layer's
    slot, > 0 = kept), plus a row of per-target scales; columns are the layers."""
    spec: DFSSpec = recipe.dfs  # type: ignore[assignment]
    n_a, n_b = (int(json.loads((ref_config_folder(r) / "config.json").read_text())["num_hidden_layers"])
                for r in (spec.model_a, spec.model_b))
    space = DFSSpace(n_a, n_b, spec.repeats, spec.scales, spec.scale_bounds, spec.indicator_margin)
    m = space.n_layers
    rows = [f"repeat {i + 1}" for i in range(spec.repeats)]
    grid = [[params.get(space.slot_names[i * m + j], float("nan")) for j in range(m)] for i in range(spec.repeats)]
    if spec.scales == "per_target":
        rows.append("scale")
        grid.append([params.get(f"scale.{n}", float("nan")) for n in space.layer_names])
    return rows, space.layer_names, grid


def make_dfs_plan(recipe: Recipe) -> DFSPlan:
    spec: DFSSpec = recipe.dfs  # type: ignore[assignment]
    folders = [ref_config_folder(spec.model_a), ref_config_folder(spec.model_b)]
    cfgs = [json.loads((f / "config.json").read_text()) for f in folders]
    check_same_family(*cfgs)
    n_a, n_b = (int(c["num_hidden_layers"]) for c in cfgs)
    space = DFSSpace(n_a, n_b, spec.repeats, spec.scales, spec.scale_bounds, spec.indicator_margin)
    config = AutoConfig.from_pretrained(folders[0])
    config.num_hidden_layers = 1
    with torch.device("meta"):
        one = AutoModelForCausalLM.from_config(config)
    per_layer = sum(p.numel() for p in decoder_of(one).layers[0].parameters())
    outside = sum(p.numel() for p in one.parameters()) - per_layer
    dtype = default_dtype(recipe.dtype, TensorSource.from_headers("a", folders[0], "model", cfgs[0]))
    size = torch.empty((), dtype=dtype).element_size()
    gb = size / 2**30
    n = len(space)
    search = recipe.search
    popsize = search.popsize or (default_popsize(n) if search.sampler == "cmaes" else 1)
    notes = []
    if search.sampler == "cmaes" and n >= 300 and not search.separable:
        notes.append(f"{n} values: set search.separable: true (full CMA-ES keeps an {n}x{n} covariance)")
    if spec.scales == "full":
        notes.append("scales: full searches the paper's whole W; per_target (one per layer) is far smaller")
    for key, ref, folder in (("model_a", spec.model_a, folders[0]), ("model_b", spec.model_b, folders[1])):
        if isinstance(ref, PSRef) and folder.name != "best":  # not exported yet
            what = ref.ps_recipe or f"the recipe of {ref.ps_run}"
            notes.append(f"{key}: the PS study {what} runs (or is exported) first; plan it on its own")
    return DFSPlan(
        recipe=recipe.name, modality="causal_lm", method="dfs",
        model_a=str(folders[0]) if not isinstance(spec.model_a, str) else spec.model_a,
        model_b=str(folders[1]) if not isinstance(spec.model_b, str) else spec.model_b,
        layers_a=n_a, layers_b=n_b, repeats=spec.repeats, slots=space.n_slots, scales=spec.scales,
        searched_values=n, indicator_values=space.n_slots, scale_values=len(space.scale_names),
        sampler=search.sampler, popsize=popsize, separable=search.separable, trials=search.trials,
        generations=math.ceil(search.trials / popsize), dtype=str(dtype).removeprefix("torch."),
        parameters_a=outside + per_layer * n_a, initial_path_layers=n_a, max_path_layers=space.n_slots + 2,
        resident_models_gb=round((2 * outside + per_layer * (n_a + n_b)) * gb, 3),
        export_gb_per_layer=round(per_layer * gb, 3),
        export_gb_initial=round((outside + per_layer * n_a) * gb, 3),
        notes=notes)
