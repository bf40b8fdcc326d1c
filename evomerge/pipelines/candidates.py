"""What a trial turns values into: a runnable model to score, and later a folder to keep.

The evolve loop only knows this small interface, so parameter-space merges and data-flow
(layer path) merges plug into the same study:

- ``space``: the searched values (``names``, ``bounds(name)``);
- ``runnable()``: the model evaluators score, built once;
- ``apply(values)``: make the runnable that candidate, in memory (raises FloatingPointError
  when the candidate's weights hold NaN/inf);
- ``apply_baseline(spec)``: make it a baseline (a source, a fixed merge);
- ``export(values, out_dir)``: write the candidate as a stock model folder with its card;
- ``tokenizer_source`` and ``evaluator_settings``: what the evaluator is built with (the folder
  whose tokenizer it may load; the modality's data for it, e.g. SDXL sampling settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evomerge.pipelines.baselines import baseline_tensors
from evomerge.pipelines.merge import MergeSession, merge_to_folder, open_session
from evomerge.recipe import Recipe


def all_finite(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params.values() if p.is_floating_point())


class ParameterSpaceCandidates:
    """Candidates are parameter-space merges written in place into one resident model."""

    def __init__(self, session: MergeSession, device: str):
        self.session, self.device = session, device
        self.space = session.space
        self.tokenizer_source: Path = session.reference.folder
        self.evaluator_settings = session.adapter.evaluator_settings()
        self._model = None

    def runnable(self) -> Any:
        if self._model is None:
            s = self.session
            self._model = s.adapter.build(s.reference, s.engine.dtype, self.device)
            self._params = s.adapter.parameters(self._model)
        return self._model

    def apply(self, values: dict[str, float]) -> Any:
        model = self.runnable()
        self.session.engine.merge_into(self._params, self.session.table(values))
        self.session.adapter.after_merge(self._params)
        if not all_finite(self._params):
            raise FloatingPointError("merged weights hold NaN or inf")
        return model

    def apply_baseline(self, spec: dict) -> Any:
        model = self.runnable()
        with torch.no_grad():
            for name, tensor in baseline_tensors(self.session, spec):
                self._params[name][: tensor.shape[0]].copy_(tensor)
        self.session.adapter.after_merge(self._params)
        return model

    def export(self, values: dict[str, float], out_dir: Path, *, extra_card: str = "",
               show_progress: bool = True) -> Path:
        return merge_to_folder(self.session, out_dir, values, force=True,
                               show_progress=show_progress, extra_card=extra_card)


def make_candidates(recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False,
                    trust_remote_code: bool = False, console: Any = None):
    """The candidates a recipe describes: layer paths for a ``dfs:`` recipe (which may first evolve
    the PS study it chains), parameter-space merges otherwise."""
    if recipe.dfs is not None:
        from evomerge.pipelines.dfs import DFSCandidates

        return DFSCandidates(recipe, device=device, allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code, console=console)
    session = open_session(recipe, device=device, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    return ParameterSpaceCandidates(session, device)
