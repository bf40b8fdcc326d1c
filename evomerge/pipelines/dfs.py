"""DFS merges in the evolve loop: the candidates backend (layer paths through two resident
models), PS+DFS chaining (a model that is the best of a parameter-space study, evolved first
when needed) and the model card of an exported path.

The search space and folding math live in ``merging/dfs.py``; the path model and its export in
``modalities/dfs_path.py``; the plan and the report grid in ``pipelines/dfs_plan.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from evomerge import __version__
from evomerge.atomic import building_folder, check_output
from evomerge.dtypes import default_dtype
from evomerge.errors import EvomergeError, describe
from evomerge.merging.dfs import DFSSpace, LayerPath, cumulative_scales
from evomerge.modalities.base import TensorSource, resolve_folder
from evomerge.modalities.dfs_path import PathModel, check_same_family, decoder_of, write_path_layers
from evomerge.pipelines.evolve import Evolution, best_values
from evomerge.pipelines.merge import merge_to_folder, open_session
from evomerge.recipe import DFSSpec, PSRef, Recipe, load_recipe


def resolve_model(ref: str | PSRef, *, device: str = "cpu", allow_pickle: bool = False,
                  trust_remote_code: bool = False, console: Any = None) -> Path:
    """A local model folder for a DFS model reference, running or exporting a PS study if needed.

    ``{ps_run: DIR}``: DIR/best, exported from DIR's best values when missing.
    ``{ps_recipe: PATH}``: that recipe's run (``run_dir`` or runs/<name>) is evolved, resuming,
    with --export-best when it has no export yet.
    """
    if isinstance(ref, str):
        return resolve_folder(ref, allow_pickle=allow_pickle)
    kwargs = dict(device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if ref.ps_run is not None:
        run = Path(ref.ps_run)
        best = run / "best"
        if (best / "config.json").exists():
            return best
        if not (run / "best.json").exists():
            raise EvomergeError(f"dfs: PS run {run} has no best.json; evolve it first (or give "
                                "{ps_recipe: ...} to have it evolved)")
        session = open_session(load_recipe(run / "recipe.yaml"), **kwargs)
        return merge_to_folder(session, best, best_values(run), force=True, show_progress=False,
                               extra_card=f"## Evolution\n\nBest values of the PS run `{run}`.")
    ps_recipe = load_recipe(ref.ps_recipe)
    from evomerge.pipelines.run_state import run_folder

    run = run_folder(ps_recipe, ref.run_dir)  # a recipe's name is a name, not a path
    if (run / "best" / "config.json").exists():
        return run / "best"
    if ps_recipe.dfs is not None:
        raise EvomergeError(f"dfs: {ref.ps_recipe} is itself a DFS recipe; chain a PS recipe")
    if console is not None:
        console.print(f"PS+DFS: evolving the PS study {ref.ps_recipe} in {run} first")
    Evolution(ref.ps_recipe, run_dir=run, console=console, **kwargs).run(export_best=True)
    return run / "best"


class DFSCandidates:
    """Candidates (:class:`evomerge.pipelines.candidates.Candidates`) are layer paths through A's
    and B's resident layers."""

    def __init__(self, recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False,
                 trust_remote_code: bool = False, console: Any = None):
        spec: DFSSpec = recipe.dfs  # type: ignore[assignment]
        self.recipe, self.spec, self.device = recipe, spec, device
        opts = dict(device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, console=console)
        self.folder_a = resolve_model(spec.model_a, **opts)
        self.folder_b = resolve_model(spec.model_b, **opts)
        cfg_a, cfg_b = (json.loads((f / "config.json").read_text()) for f in (self.folder_a, self.folder_b))
        check_same_family(cfg_a, cfg_b)
        self.dtype = default_dtype(recipe.dtype, TensorSource.from_headers("a", self.folder_a, "model", cfg_a))

        def load(folder: Path) -> nn.Module:
            try:  # safetensors only, unless the user allowed pickle checkpoints
                m = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=None if allow_pickle else True)
            except OSError as e:
                raise EvomergeError(f"dfs: model {folder}: cannot load ({describe(e)}); convert pickle "
                                    "checkpoints to safetensors, or pass --allow-pickle if you trust them") from None
            return m.to(device).eval()

        model_a, model_b = load(self.folder_a), load(self.folder_b)
        self.space = DFSSpace(len(decoder_of(model_a).layers), len(decoder_of(model_b).layers),
                              spec.repeats, spec.scales, spec.scale_bounds, spec.indicator_margin)
        self.paths = PathModel(model_a, model_b, self.space, fold=spec.fold)
        self.tokenizer_source: Path = self.folder_a
        self.evaluator_settings: dict[str, Any] = {}
        self.paths.set_path(self.space.path(list(range(self.space.n_a))))

    def runnable(self) -> nn.Module:
        return self.paths.model

    def apply(self, values: dict[str, float]) -> nn.Module:
        bad = next((k for k, v in values.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise FloatingPointError(f"dfs value {bad} is {values[bad]}")
        return self.paths.set_path(self.space.decode(values))

    def path_for(self, spec: dict) -> LayerPath:
        """The path a baseline spec names: ``source: a`` (A itself), ``values: {...}`` or
        ``layers: [a00, a01, b05, ...]`` with optional ``scales`` (e.g. a frankenmerge)."""
        if "values" in spec:
            return self.space.decode({**self.space.initial(), **spec["values"]})
        if "layers" in spec:
            return self.space.path([self.space.layer_index(n) for n in spec["layers"]], scales=spec.get("scales"))
        if spec.get("source") == "a":
            return self.space.path(list(range(self.space.n_a)))
        raise EvomergeError(f"dfs baseline {spec.get('name')!r}: give source: a|b, values: {{...}} or layers: [...]")

    def apply_baseline(self, spec: dict) -> nn.Module:
        if spec.get("source") == "b":
            return self.paths.model_b
        return self.paths.set_path(self.path_for(spec))

    def export(self, values: dict[str, float], out_dir: Path, *, extra_card: str = "",
               show_progress: bool = True, force: bool = True) -> Path:
        path = self.space.decode(values)
        folded = self.paths.folds(path)
        sources = {"a": _ref_label(self.spec.model_a, self.folder_a), "b": _ref_label(self.spec.model_b, self.folder_b)}
        card = path_card(self.recipe, self.space, path, values, sources, folded=folded, extra=extra_card)
        check_output(out_dir, force=force, inputs=[self.folder_a, self.folder_b])
        with building_folder(out_dir) as tmp:
            write_path_layers(self.paths, path, self.folder_a, tmp, fold=self.spec.fold,
                              show_progress=show_progress)
            (tmp / "README.md").write_text(card)
        return Path(out_dir)


def _ref_label(ref: str | PSRef, folder: Path) -> str:
    return ref if isinstance(ref, str) else str(folder)


def path_card(recipe: Recipe, space: DFSSpace, path: LayerPath, values: dict[str, float],
              sources: dict[str, str], *, folded: bool, extra: str = "") -> str:
    names = space.describe(path)
    totals = cumulative_scales(path)
    front = {"base_model": list(sources.values()), "library_name": "transformers",
             "tags": ["merge", "evomerge", "dfs"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {recipe.name}", "",
             f"Data-flow-space merge made with [evomerge](https://github.com/evomerge/evomerge) {__version__}: "
             f"{len(path)} layers taken from two models; A's embeddings, final norm, head and tokenizer.",
             "", "## Sources", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in sources.items()]
    lines += ["", "## Path", "", "| position | layer | input scale | cumulative |", "|---|---|---|---|"]
    lines += [f"| {k} | `{n}` | {s:.6g} | {p:.6g} |" for k, (n, s, p) in enumerate(zip(names, path.scales, totals, strict=True))]
    if folded:
        lines += ["", "The scales are folded into the weights: position k's o_proj and down_proj are divided "
                  "by its cumulative scale, so this loads and runs with stock transformers. The fold is exact "
                  "up to the RMSNorm epsilon."]
    elif any(s != 1.0 for s in path.scales):
        lines += ["", "**The scales are NOT folded** (this architecture does not allow it exactly): the layers "
                  "are stored unscaled; apply `dfs_scales.json` with `dfs_scaling.py` after loading."]
    searched = {k: v for k, v in values.items() if k.startswith("scale.")}
    if searched:
        lines += ["", "## Searched scales", "", "| value | chosen |", "|---|---|"]
        lines += [f"| `{k}` | {v:.6g} |" for k, v in searched.items()]
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False,
                                 allow_unicode=True)
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```"]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"
