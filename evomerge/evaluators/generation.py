"""Greedy generation for a batch of prompts in which each sequence stops on its own.

``model.generate`` keeps every row of a batch in the forward pass until the last one ends;
here a row leaves the batch (and its KV-cache rows are dropped) as soon as it emits an end
marker, completes a stop string, or reaches ``max_new_tokens``. The tokens each row receives
are the ones greedy ``generate`` would give it: the same left-padded prefill, position ids and
argmax of the float32 last-token logits, so outputs are unchanged; only the work shrinks.

A stop string ends a row at the step it is first completed (as vLLM does), checked on the
decoded tail of the row; the caller still cuts the decoded text at the stop string.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, describe


@dataclass
class Generated:
    """Token ids produced for each prompt (end marker excluded), and the cost."""

    tokens: list[list[int]]
    generated_tokens: int  # every token the model produced, end markers included
    seconds: float


def _stop_hit(ids: list[int], tokenizer: Any, stop: Sequence[str], window: int) -> bool:
    """Whether the decoded text of ``ids`` contains a stop string: the tail is checked each step
    (cheap), and a hit is confirmed on the whole text (a tail may decode differently at its start)."""
    tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
    if not any(s in tail for s in stop):
        return False
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in stop)


def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, eos_ids: Sequence[int], stop: Sequence[str] = (),
                    batch_size: int = 8) -> Generated:
    """Greedy continuations of tokenised ``prompts``, batched by length (longest first).

    Args:
        model: a transformers causal LM (anything whose forward takes ``input_ids``,
            ``attention_mask``, ``position_ids``, ``cache`` or ``past_key_values`` and returns
            ``logits``).
        tokenizer: its tokenizer (``pad_token_id`` and ``decode`` are used).
        prompts: token ids of each prompt (special tokens already added).
        eos_ids: token ids that end a sequence.
        stop: strings that end a sequence once they appear in its decoded text.
    """
    import torch

    start = time.perf_counter()
    device = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_key = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    eos = set(int(e) for e in eos_ids)
    stop = [s for s in stop if s]
    window = 2 * max((len(s) for s in stop), default=0) + 8
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    tokens: list[list[int]] = [[] for _ in prompts]
    produced = 0

    def step(inputs: dict) -> Any:
        out = model(**inputs, use_cache=True, **extra)
        return out.logits[:, -1, :].float().argmax(-1)

    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]):] = torch.as_tensor(list(prompts[i]))
                mask[r, width - len(prompts[i]):] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            cache = _new_cache(model)
            with torch.inference_mode():
                nxt = step({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                            cache_key: cache})
                active = list(rows)
                for _ in range(max_new_tokens):
                    keep = []
                    for r, (i, t) in enumerate(zip(active, nxt.tolist(), strict=True)):
                        produced += 1
                        if t in eos:
                            continue
                        tokens[i].append(t)
                        if len(tokens[i]) >= max_new_tokens:
                            continue
                        if stop and _stop_hit(tokens[i], tokenizer, stop, window):
                            continue
                        keep.append(r)
                    if not keep:
                        break
                    if len(keep) < len(active):  # finished rows leave the batch and the cache
                        index = torch.tensor(keep, device=device)
                        cache.batch_select_indices(index)
                        mask, positions, nxt = mask[index], positions[index], nxt[index]
                        active = [active[r] for r in keep]
                    positions = positions[:, -1:] + 1
                    mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
                    nxt = step({"input_ids": nxt[:, None], "attention_mask": mask,
                                "position_ids": positions, cache_key: cache})
    finally:
        model.train(was_training)
    return Generated(tokens=tokens, generated_tokens=produced, seconds=time.perf_counter() - start)


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=getattr(model, "config", None))
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def load_pretrained(loader: Any, source: str | Path, what: str) -> Any:
    """``loader.from_pretrained(source)`` with a one-line error naming ``what`` failed to load."""
    try:
        return loader.from_pretrained(str(source))
    except Exception as e:
        raise EvomergeError(f"{what} {str(source)!r}: could not load ({describe(e)})") from None


def load_tokenizer(source: str | Path) -> Any:
    """A tokenizer for batched generation: left padding, with a pad token (eos if none)."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(load_pretrained(AutoTokenizer, source, "tokenizer"))


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Set left padding and make sure a pad token exists (decoder-only batching needs both)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise EvomergeError("tokenizer has neither a pad nor an eos token; cannot batch")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
