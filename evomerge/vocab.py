"""The output vocabulary of a causal-LM merge (mergekit's ``tokenizer_source`` / ``tokenizer:``)
and the tokenizer files and chat template written beside the weights.

The output tokenizer is the base model's (``base``), one model's (a label), or the union of all
(``union``: the base's vocabulary, then every other token in model order, then added tokens),
plus any ``tokens`` the recipe names. Each model's embedding and head rows are then laid out in
that vocabulary before merging, as mergekit lays them out: a model's own row where it has the
token; otherwise the base model's row when the base has it and at least one other model too,
the one model's row when only one has it, the mean of the models that have it, zeros when none
does (``tokens`` entries override this: ``source`` a model (or one of its tokens) or ``zero``,
``force`` to use it even for models that have the token). Rows padded up to
``pad_to_multiple_of`` take the mean of the real rows.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import EvomergeError, describe
from evomerge.modalities.base import TensorSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json")


def _load_tokenizer(folder: Path, label: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing or unreadable tokenizer: name the model
        raise EvomergeError(f"model {label}: cannot load its tokenizer ({describe(e)}); "
                            "the tokenizer options need every model's tokenizer files") from None


def _vocab_size(source: TensorSource, tokenizer) -> int:
    text = source.config.get("text_config", source.config)
    return int(text.get("vocab_size") or len(tokenizer.get_vocab()))


def _union(base_tok, tokenizers: dict[str, object], sizes: dict[str, int], trust_remote_code: bool):
    """The base tokenizer extended with every other model's tokens (regular ones in model order,
    then added tokens with their settings, the first model's settings winning)."""
    from transformers import AutoTokenizer

    regular: dict[str, None] = {}
    added: dict[str, object] = {}
    for label, tok in tokenizers.items():
        for token, idx in tok.get_vocab().items():
            if idx < sizes[label]:
                regular.setdefault(token)
        for idx, info in tok.added_tokens_decoder.items():
            if idx < sizes[label]:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base tokenizer stays as it is
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=trust_remote_code)
    base_vocab = base_tok.get_vocab()
    for token in regular:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocabulary:
    """The output tokenizer and, per model label, output token id -> the model's row (-1: none);
    ``tensors`` are those with one row per token (the model layout's)."""

    tokenizer: object
    tensors: tuple[str, ...]
    permutations: dict[str, list[int]]
    original: dict[str, dict[str, int]]
    base_label: str | None
    tokens: dict
    pad_to_multiple_of: int | None

    @property
    def size(self) -> int:
        return len(self.tokenizer.get_vocab())

    @property
    def rows(self) -> int:
        n, m = self.size, self.pad_to_multiple_of
        return n if not m or n % m == 0 else (n // m + 1) * m

    def align(self, views: list[TensorSource], dtype: torch.dtype) -> None:
        """Lay out the vocabulary rows of one slice's inputs (in merge order) in the output
        vocabulary, in place (as tensors held in memory)."""
        for name in self.tensors:
            present = [v for v in views if name in v]
            if present:
                rows = self._aligned([v.label for v in present], [v.read(name, dtype) for v in present])
                for view, tensor in zip(present, rows, strict=True):
                    view.loaded[name] = tensor
                    view.entries.pop(name, None)

    def _aligned(self, labels: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        vocab = self.tokenizer.get_vocab()
        dtype = tensors[0].dtype
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        perms = [self.permutations[label] for label in labels]
        configs = dict(self.tokens)
        to_average = set()
        for token, tid in vocab.items():  # where a token missing from some model comes from
            if token in configs:
                continue
            has = [p[tid] >= 0 for p in perms]
            if sum(has) == 1:
                configs[token] = {"source": labels[has.index(True)], "force": False}
            elif sum(has) == 0:
                configs[token] = {"source": "zero", "force": False}
            elif self.base_label in labels and perms[labels.index(self.base_label)][tid] >= 0:
                configs[token] = {"source": self.base_label, "force": False}
            else:
                to_average.add(token)
        shape = tensors[0].shape[1:]
        defaults = {}
        for token, tid in vocab.items():
            cfg = configs.get(token)
            forced = bool(cfg and cfg.get("force"))
            if not forced and all(p[tid] >= 0 for p in perms):
                continue
            if token in to_average:
                embed, count = torch.zeros(shape, dtype=dtype), 0
                for p, t in zip(perms, tensors, strict=True):
                    if p[tid] >= 0:
                        embed = embed + t[p[tid]]
                        count += 1
                defaults[token] = embed / count
            elif cfg is not None:
                defaults[token] = self._configured(token, tid, cfg, labels, perms, tensors, dtype)
        out = []
        for p, t in zip(perms, tensors, strict=True):
            rows = torch.zeros((self.rows, *shape), dtype=dtype)
            for token, tid in vocab.items():
                forced = bool(self.tokens.get(token, {}).get("force"))
                if p[tid] >= 0 and not forced:
                    rows[tid] = t[p[tid]]
                elif token in defaults:
                    rows[tid] = defaults[token]
            if self.rows > len(vocab):
                rows[len(vocab):] = rows[: len(vocab)].mean(0)
            out.append(rows)
        return out

    def _configured(self, token, tid, cfg, labels, perms, tensors, dtype) -> torch.Tensor:
        source = cfg.get("source")
        if source == "zero" or source is None:
            return torch.zeros(tensors[0].shape[1:], dtype=dtype)
        if source not in labels:
            raise EvomergeError(f"tokenizer.tokens.{token}: its source {source} is not an input of this merge")
        i = labels.index(source)
        if cfg.get("token_id") is not None or cfg.get("token") is not None:
            row = cfg.get("token_id")
            if row is None:
                row = self.original[source].get(cfg["token"])
                if row is None:
                    raise EvomergeError(f"tokenizer.tokens.{token}: model {source} has no token {cfg['token']!r}")
            if not 0 <= row < tensors[i].shape[0]:
                raise EvomergeError(f"tokenizer.tokens.{token}: token_id {row} is outside model {source}'s rows")
            return tensors[i][row]
        if perms[i][tid] < 0:
            raise EvomergeError(f"tokenizer.tokens.{token}: model {source} has no such token; pick another source")
        return tensors[i][perms[i][tid]]


def build_vocabulary(recipe, models: dict[str, TensorSource], base: TensorSource | None,
                     reference: TensorSource, tensors: tuple[str, ...], *,
                     trust_remote_code: bool = False) -> Vocabulary:
    """The output tokenizer and every model's row permutation (``recipe.tokenizer``); ``tensors``
    are the layout's vocabulary tensors, laid out in it."""
    spec = recipe.tokenizer
    sources = ([base] if base else []) + list(models.values())
    base_source = base or reference
    tokenizers = {base_source.label: _load_tokenizer(base_source.folder, base_source.label, trust_remote_code)}
    for s in sources:
        tokenizers.setdefault(s.label, _load_tokenizer(s.folder, s.label, trust_remote_code))
    sizes = {s.label: _vocab_size(s, tokenizers[s.label]) for s in sources}
    base_tok = tokenizers[base_source.label]
    beyond = [t for t, i in base_tok.get_vocab().items() if i >= sizes[base_source.label]]
    if beyond:
        raise EvomergeError(f"model {base_source.label}: its tokenizer has {len(beyond)} tokens beyond the "
                            f"model's vocab_size ({beyond[0]!r}...); not supported as the base vocabulary")
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(base_tok, tokenizers, sizes, trust_remote_code)
    elif spec.source in models:
        out = _load_tokenizer(models[spec.source].folder, spec.source, trust_remote_code)
    else:
        raise EvomergeError(f"tokenizer.source {spec.source!r}: use base, union or a model label "
                            f"({', '.join(models)})")
    existing = set(out.get_vocab())
    for token in spec.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab_out = out.get_vocab()
    if sorted(vocab_out.values()) != list(range(len(vocab_out))):
        raise EvomergeError(f"tokenizer.source {spec.source}: the output tokenizer's ids are not 0..{len(vocab_out) - 1} "
                            "(two tokens share an id, or ids are skipped); fix that tokenizer first")
    permutations = {}
    for s in sources:
        own = tokenizers[s.label].get_vocab()
        perm = [-1] * len(vocab_out)
        for token, new in vocab_out.items():
            old = own.get(token, -1)
            perm[new] = old if old < sizes[s.label] else -1
        permutations[s.label] = perm
    tokens = {t: e.model_dump() for t, e in spec.tokens.items()}
    return Vocabulary(out, tensors, permutations, {label: t.get_vocab() for label, t in tokenizers.items()},
                      base_source.label if base_source.label in permutations else None, tokens,
                      spec.pad_to_multiple_of)


# -- chat templates and tokenizer files ------------------------------------------------------------


def _named_template(name: str) -> str | None:
    """A chat template shipped with mergekit (chatml, llama3, mistral, alpaca...), when installed."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "_data" / "chat_templates" / f"{name}.jinja"
    return path.read_text() if path.is_file() else None


def resolve_chat_template(value: str, models: list[TensorSource], trust_remote_code: bool = False) -> str | None:
    """mergekit's reading of ``chat_template``: ``auto`` (the most common template among the
    models), a template name, or Jinja text."""
    if value == "auto":
        found = []
        for s in models:
            try:
                template = _load_tokenizer(s.folder, s.label, trust_remote_code).chat_template
            except EvomergeError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        named = _named_template(value)
        if named is not None:
            return named
        raise EvomergeError(f"chat_template {value!r}: not a template name evomerge can find (named "
                            "templates come from an installed mergekit); give the Jinja text instead")
    if len(value) < 20 or "{" not in value:
        raise EvomergeError("chat_template: neither a template name nor Jinja text; give one of them")
    return value


def write_tokenizer(out_dir: Path, recipe, reference: TensorSource, models: dict[str, TensorSource],
                    vocab: Vocabulary | None, copy_tokenizer: bool, trust_remote_code: bool = False) -> None:
    """Tokenizer files of the output (the reference's were copied with its other files)."""
    template = None
    if recipe.chat_template:
        template = resolve_chat_template(recipe.chat_template, list(models.values()), trust_remote_code)
    if vocab is None and not copy_tokenizer:
        for name in TOKENIZER_FILES:
            (out_dir / name).unlink(missing_ok=True)
        return
    if vocab is None and template is None:
        return
    tokenizer = vocab.tokenizer if vocab is not None else _load_tokenizer(
        reference.folder, reference.label, trust_remote_code)
    if template is not None:
        tokenizer.chat_template = template
    for name in TOKENIZER_FILES:
        (out_dir / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(out_dir)

