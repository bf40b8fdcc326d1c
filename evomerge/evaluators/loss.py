"""Language-modelling fitness: how well a causal LM predicts a set of texts.

Each text is one item; its score is the mean log-likelihood per predicted token (minus the
cross-entropy, so higher is better), and the evaluator's score is the mean over texts. The
metrics add ``perplexity`` (exp of the mean per-token loss over the texts scored). As a recipe
block::

    evaluator: {kind: loss, data: {path: texts.jsonl}, text_field: text, limit: 200}

Per-item scores make it an :class:`~evomerge.evaluators.base.ItemEvaluator`, so racing and
estimated fitness work with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import Result, ScoresItems
from evomerge.evaluators.data import load_rows
from evomerge.evaluators.generation import load_tokenizer, prepare_tokenizer


class LossEvaluator(ScoresItems):
    """Mean per-token log-likelihood of each text (spec: ``data``, ``text_field`` ("text"),
    ``limit``, ``batch_size`` (16), ``max_length`` (512 tokens, longer texts are cut))."""

    name = "loss"

    def __init__(self, spec: dict, tokenizer_source: str | Path | None = None, *, tokenizer: Any = None):
        data = spec.get("data")
        if not isinstance(data, dict):
            raise EvomergeError("evaluator loss: 'data' must be a data spec, e.g. {path: texts.jsonl}")
        data = {**data, **{k: spec[k] for k in ("limit", "offset") if k in spec and k not in data}}
        field = spec.get("text_field", "text")
        rows = load_rows(data)
        where = data.get("path") or data.get("hub")
        missing = [i for i, row in enumerate(rows) if not isinstance(row.get(field), str) or not row[field]]
        if missing:
            raise EvomergeError(f"{where}: row {missing[0] + 1}: no text in field {field!r} (set text_field)")
        if not rows:
            raise EvomergeError(f"{where}: no texts (check the file, split, offset and limit)")
        self.texts = [row[field] for row in rows]
        self.batch_size = int(spec.get("batch_size", 16))
        self.max_length = int(spec.get("max_length", 512))
        if self.batch_size < 1 or self.max_length < 2:
            raise EvomergeError("evaluator loss: batch_size must be >= 1 and max_length >= 2")
        if tokenizer is None:
            if tokenizer_source is None:
                raise EvomergeError("evaluator loss: no tokenizer (give the model to take it from)")
            tokenizer = load_tokenizer(tokenizer_source)
        self.tokenizer = prepare_tokenizer(tokenizer)

    @property
    def n_items(self) -> int:
        return len(self.texts)

    def score_items(self, runnable: Any, indices: Iterable[int]) -> Result:
        """Score the texts at ``indices`` only (racing, estimated fitness)."""
        import torch
        import torch.nn.functional as F

        indices = list(indices)
        device = next(runnable.parameters()).device
        values: list[float] = []
        tokens = 0
        nll = 0.0
        for start in range(0, len(indices), self.batch_size):
            batch = [self.texts[i] for i in indices[start:start + self.batch_size]]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            with torch.inference_mode():
                logits = runnable(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            counted = mask[:, 1:].float()
            for row_loss, row_mask in zip(loss, counted, strict=True):
                n = int(row_mask.sum())
                if n == 0:
                    raise EvomergeError("evaluator loss: a text has fewer than 2 tokens")
                total = float((row_loss * row_mask).sum())
                values.append(-total / n)
                nll += total
                tokens += n
        items = [{"prompt": self.texts[i], "output": "", "correct": None, "loglik": v}
                 for i, v in zip(indices, values, strict=True)]
        score = sum(values) / len(values)
        metrics = {"loglik": score, "perplexity": math.exp(nll / tokens), "n": float(len(values))}
        return Result(score=score, metrics=metrics, items=items, values=values)
