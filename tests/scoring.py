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


def fails_after(model, calls: int = 1, counter: str = "") -> float:
    """Scores the first ``calls`` evaluations (counted in the file ``counter``), then fails every
    time the same way, with a number that changes (as CUDA's out-of-memory message does)."""
    path = Path(counter)
    n = int(path.read_text()) if path.exists() else 0
    path.write_text(str(n + 1))
    if n >= calls:
        raise RuntimeError(f"CUDA out of memory. Tried to allocate {n * 2 + 1}.00 MiB")
    return likelihood(model)


def odd_items(model) -> dict:
    """A score with items JSON cannot hold as they are."""
    return {"score": likelihood(model), "items": [{"obj": object(), "t": torch.tensor([1.0, 2.0])}]}
