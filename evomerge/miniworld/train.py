"""A small trainer for the mini-world's tiny Llama (4 layers, hidden 128, ~0.68M parameters).

Examples are (prompt, completion) pairs; the loss covers the completion and its end-of-sequence
token only. Greedy decoding here is a fast path for the build's probes (all sum prompts have the
same length, so no padding is needed); the demo itself scores with the real ja_math evaluator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from evomerge.evaluators.ja_math import is_correct
from evomerge.evaluators.langid import is_japanese
from evomerge.miniworld.tasks import Example


def model_config(vocab_size: int, *, layers: int = 4, hidden: int = 128, intermediate: int = 256,
                 heads: int = 4, max_positions: int = 64, pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=False,
                       pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                       rms_norm_eps=1e-5, initializer_range=0.02)


def new_model(tokenizer, seed: int) -> torch.nn.Module:
    """A freshly initialised tiny LlamaForCausalLM for ``tokenizer`` (float32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = model_config(len(tokenizer), pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
                          eos_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class CharCodec:
    """Direct character <-> id maps of a character-level tokenizer (faster than calling it)."""

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        self.to_id = {t: i for t, i in vocab.items() if len(t) == 1}
        self.to_char = {i: t for t, i in self.to_id.items()}
        self.unk, self.pad, self.eos = tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return [self.to_id.get(c, self.unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if i == self.eos:
                break
            out.append(self.to_char.get(int(i), ""))
        return "".join(out)

    def batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Right-padded input ids, attention mask and labels (-100 outside the completion)."""
        rows = []
        for prompt, completion in examples:
            p, c = self.encode(prompt), self.encode(completion) + [self.eos]
            rows.append((p + c, [-100] * len(p) + c))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: torch.nn.Module, codec: CharCodec, draw: Callable[[random.Random], Example], *,
          steps: int, lr: float, batch_size: int = 64, seed: int = 0, warmup: int = 0,
          weight_decay: float = 0.0, every: int = 0,
          callback: Callable[[int, torch.nn.Module], bool] | None = None,
          optimizer: torch.optim.Optimizer | None = None, rng: random.Random | None = None,
          start_step: int = 0) -> int:
    """Train with AdamW (constant rate after a linear warm-up). ``callback(step, model)`` runs
    every ``every`` steps; returning True stops training. Pass ``optimizer``, ``rng`` and
    ``start_step`` to continue an earlier call. Returns the steps taken."""
    rng = rng or random.Random(seed)
    if start_step == 0:
        torch.manual_seed(seed)
    opt = optimizer or new_optimizer(model, lr, weight_decay)
    model.train()
    step = start_step
    for step in range(start_step + 1, start_step + steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / warmup) if warmup else lr
        batch = codec.batch([draw(rng) for _ in range(batch_size)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if callback is not None and every and step % every == 0:
            model.eval()
            stop = callback(step, model)
            model.train()
            if stop:
                break
    model.eval()
    return step


def new_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


@torch.no_grad()
def greedy(model: torch.nn.Module, codec: CharCodec, prompts: Sequence[str], max_new_tokens: int = 14,
           batch_size: int = 500) -> list[str]:
    """Greedy completions (prompts grouped by length, so no padding is involved)."""
    by_len: dict[int, list[int]] = {}
    encoded = [codec.encode(p) for p in prompts]
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    out = [""] * len(prompts)
    for idx_all in by_len.values():
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            ids = torch.tensor([encoded[i] for i in idx])
            start = ids.shape[1]
            done = torch.zeros(len(idx), dtype=torch.bool)
            cache = None
            step_ids = ids
            for _ in range(max_new_tokens):
                res = model(input_ids=step_ids, cache=cache, use_cache=True)
                cache = res.cache
                nxt = res.logits[:, -1].argmax(-1)
                ids = torch.cat([ids, nxt[:, None]], 1)
                step_ids = nxt[:, None]
                done |= nxt == codec.eos
                if bool(done.all()):
                    break
            for r, i in enumerate(idx):
                out[i] = codec.decode(ids[r, start:].tolist())
    return out


def score(model: torch.nn.Module, codec: CharCodec, problems: Sequence[dict], prompt: str) -> dict[str, float]:
    """accuracy (right last number), accuracy_ja (right and Japanese) and ja_share (Japanese
    responses), with the ja_math evaluator's own scoring functions."""
    outputs = greedy(model, codec, [prompt.format(question=p["question"]) for p in problems])
    correct = [is_correct(o, p["answer"]) for o, p in zip(outputs, problems, strict=True)]
    ja = [is_japanese(o) for o in outputs]
    n = len(problems)
    return {"accuracy": sum(correct) / n, "accuracy_ja": sum(c and j for c, j in zip(correct, ja, strict=True)) / n,
            "ja_share": sum(ja) / n}


def weight_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


def delta_ratio(tuned: torch.nn.Module, base: torch.nn.Module) -> float:
    """||tuned - base|| / ||base|| over all parameters (the task vector's relative size)."""
    num = sum(float((a.detach().double() - b.detach().double()).pow(2).sum())
              for a, b in zip(tuned.parameters(), base.parameters(), strict=True))
    return math.sqrt(num) / weight_norm(base)
