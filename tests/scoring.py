"""Evaluators used by the evolve tests through the recipe's ``kind: python`` hook."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

TEXT = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 30, 11, 4, 8, 2]])


def likelihood(model, sleep: float = 0.0, fail_marker: str = "") -> float:
    """Mean log-likelihood of a fixed token sequence (a real, deterministic score).

    ``sleep`` slows each evaluation so a test can kill the run mid-trial; when the file
    ``fail_marker`` exists, the evaluation raises (a failing evaluator).
    """
    if fail_marker and Path(fail_marker).exists():
        Path(fail_marker).unlink()
        raise RuntimeError("evaluation failed on purpose")
    with torch.no_grad():
        logits = model(TEXT).logits.float()
    time.sleep(sleep)
    return -F.cross_entropy(logits[0, :-1], TEXT[0, 1:]).item()
