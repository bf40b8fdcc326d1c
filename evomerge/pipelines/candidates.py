"""What a trial turns values into: a runnable model to score, and later a folder to keep.

The evolve loop only knows :class:`Candidates`, so parameter-space merges and data-flow (layer
path) merges plug into the same study.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from evomerge.pipelines.baselines import baseline_tensors
from evomerge.pipelines.merge import MergeSession, merge_to_folder, open_session
from evomerge.recipe import Recipe


class Space(Protocol):
    """The searched values: their names (the flat vector's order) and each one's bounds."""

    @property
    def names(self) -> Sequence[str]: ...

    def bounds(self, name: str) -> tuple[float, float]: ...

    def __len__(self) -> int: ...


class Candidates(Protocol):
    """What the evolve loop asks of a kind of merge."""

    space: Space
    tokenizer_source: Path  # the folder whose tokenizer an evaluator may load
    evaluator_settings: dict[str, Any]  # the modality's data for its evaluator (SDXL: sampling)

    def runnable(self) -> Any:
        """The model evaluators score, built once."""

    def apply(self, values: dict[str, float]) -> Any:
        """The runnable made that candidate, in memory (FloatingPointError on NaN/inf weights)."""

    def apply_baseline(self, spec: dict) -> Any:
        """The runnable made a baseline (a source, a fixed merge)."""

    def export(self, values: dict[str, float], out_dir: Path, *, extra_card: str = "",
               show_progress: bool = True) -> Path:
        """The candidate written as a stock model folder with its card."""


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
                    trust_remote_code: bool = False, console: Any = None) -> Candidates:
    """The candidates a recipe describes: layer paths for a ``dfs:`` recipe (which may first evolve
    the PS study it chains), parameter-space merges otherwise."""
    if recipe.dfs is not None:
        from evomerge.pipelines.dfs import DFSCandidates

        return DFSCandidates(recipe, device=device, allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code, console=console)
    session = open_session(recipe, device=device, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    return ParameterSpaceCandidates(session, device)
