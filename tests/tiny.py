"""Tiny models of the real architectures, built from configs in code (no downloads)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    str(d) for d in range(10)] + list("+=?: ") + list("たすはこえでしてす。")


def tiny_tokenizer(extra_special: list[str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": extra_special})
    return fast


def llama_config(arch: str = "llama", vocab: int = 64, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if arch == "mistral" else LlamaConfig
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A 'fine-tune' of ``model``: the same weights plus small seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model


def make_llm_family(root: Path, *, arch: str = "llama", n: int = 3, dtype=torch.float32,
                    layers: int = 2, vocab: int = 64, seed: int = 0) -> dict[str, Path]:
    """A base and ``n`` perturbed variants saved as model folders with a tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = llama_config(arch, vocab=vocab, layers=layers)
    base = AutoModelForCausalLM.from_config(config).to(dtype)
    tok = tiny_tokenizer()
    paths = {}
    for i, name in enumerate(["base"] + [f"m{j}" for j in range(1, n + 1)]):
        model = base if i == 0 else perturbed(copy.deepcopy(base), seed * 100 + i)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths
