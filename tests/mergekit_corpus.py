"""mergekit configs (its examples, pointed at tiny local models, and probes of every key) run
through mergekit 0.1.5 and through ``evomerge merge``, compared model by model.

    python tests/mergekit_corpus.py [CONFIG ...]     # prints one line per config and the tally

Each config ends as one of: ``match`` (same tensors, config layer count and vocabulary,
tokenizer and chat template), ``ties`` (TIES-family merges differing only at magnitude ties,
under 2% of elements), ``stats`` (random-drop methods: kept share and L1 within 2%),
``refused`` (evomerge exits 2 with one line) or ``MISMATCH``/``CRASH`` (evomerge wrote another
model, or failed otherwise). Whether mergekit itself merged is shown beside.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).parent
CORPUS = HERE / "mergekit_corpus"
sys.path.insert(0, str(HERE))

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
TIES_FAMILY = ("ties", "dare_ties", "breadcrumbs_ties", "della", "sce")


def build_world(root: Path) -> dict[str, str]:
    """Tiny 4-layer Llama families (float32 and bfloat16), two models with extra tokens and a
    LoRA adapter: the placeholders the corpus configs name."""
    from tiny import make_llm_family, perturbed
    from transformers import AutoModelForCausalLM

    marker = root / "world.json"
    if marker.exists():
        return json.loads(marker.read_text())
    f32 = make_llm_family(root / "f32", n=3, layers=4)
    b16 = make_llm_family(root / "bf16", n=3, layers=4, dtype=torch.bfloat16, seed=1)
    world = {k: str(v) for k, v in f32.items()} | {f"b16_{k}": str(v) for k, v in b16.items()}
    for folder in world.values():  # ids 0..n-1, as real tokenizers have
        gapless_tokenizer().save_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(f32["base"])
    for seed, (name, extra, rows) in enumerate((("x1", ["<x1>", "<x2>", "<x3>"], 72), ("x2", ["<x3>", "<y1>"], 64))):
        model = perturbed(copy.deepcopy(base), 40 + seed)
        model.resize_token_embeddings(rows)
        with torch.no_grad():  # new rows: deterministic values
            g = torch.Generator().manual_seed(rows)
            model.get_input_embeddings().weight[64:] = torch.randn(rows - 64, 32, generator=g)
            model.get_output_embeddings().weight[64:] = torch.randn(rows - 64, 32, generator=g)
        tok = gapless_tokenizer()
        tok.add_tokens(extra)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        world[name] = str(root / name)
    world["lora"] = str(make_lora(Path(world["m1"]), root / "lora"))
    world |= make_tied_qwen2(root / "qwen2")
    marker.write_text(json.dumps(world))
    return world


def gapless_tokenizer():
    """The tiny tokenizer's words, each once (tiny.WORDS repeats one, leaving an unused id)."""
    from tiny import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def make_tied_qwen2(root: Path) -> dict[str, str]:
    """A Qwen2 base and two fine-tunes (attention biases, tied embeddings: no lm_head stored)."""
    from tiny import perturbed
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(5)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    base = AutoModelForCausalLM.from_config(config)
    out = {}
    for i, name in enumerate(["q_base", "q1", "q2"]):
        model = base if i == 0 else perturbed(copy.deepcopy(base), 50 + i)
        model.save_pretrained(root / name)
        gapless_tokenizer().save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def make_lora(model_dir: Path, out: Path) -> Path:
    """A PEFT LoRA (q/v projections, rank 4) with non-zero B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out, safe_serialization=True)
    return out


def instantiate(config: Path, world: dict[str, str], dest: Path) -> Path:
    text = config.read_text()
    for key in sorted(world, key=len, reverse=True):
        text = text.replace("{" + key + "}", world[key])
    dest.write_text(text)
    return dest


MK_DRIVER = """
import json, sys, traceback
from mergekit.scripts.run_yaml import main
status = {}
for cfg, out in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        main([cfg, out, "--random-seed", "0", "--lora-merge-cache", out + ".lora"], standalone_mode=False)
        status[cfg] = "ok"
    except BaseException as e:
        status[cfg] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
json.dump(status, open(sys.argv[1], "w"))
"""


def run_mergekit(jobs: list[tuple[Path, Path]], status_file: Path) -> dict[str, str]:
    args = [str(a) for job in jobs for a in job]
    subprocess.run([sys.executable, "-c", MK_DRIVER, str(status_file), *args], capture_output=True)
    return json.loads(status_file.read_text())


def run_evomerge(config: Path, out: Path) -> tuple[int, str]:
    from evomerge.cli import main

    err = io.StringIO()
    code = 0
    argv = ["evomerge", "merge", str(config), "--out", str(out), "--device", "cpu"]
    with mock.patch.object(sys, "argv", argv), redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # a traceback is a failure of its own kind
            return 99, f"{type(e).__name__}: {e}"
    return code, err.getvalue().strip()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype in (torch.bfloat16, torch.float16):
        return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    if a.dtype == torch.float32:
        return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()
    return (a != b).int()


def _tokenizer_facts(folder: Path) -> tuple | None:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").exists():
        return None
    tok = AutoTokenizer.from_pretrained(folder)
    return tok.get_vocab(), tok.chat_template


def compare(ours: Path, theirs: Path, method: str, base: Path | None) -> str:
    """'match', 'ties', 'stats' or 'MISMATCH: why'."""
    a, b = _tensors(ours), _tensors(theirs)
    if set(a) != set(b):
        return f"MISMATCH: tensors {sorted(set(a) ^ set(b))[:3]}"
    for key in ("num_hidden_layers", "vocab_size"):
        ca, cb = (json.loads((f / "config.json").read_text())[key] for f in (ours, theirs))
        if ca != cb:
            return f"MISMATCH: config {key} {ca} vs {cb}"
    ta, tb = _tokenizer_facts(ours), _tokenizer_facts(theirs)
    if tb is not None and ta != tb:
        return "MISMATCH: tokenizer vocabulary or chat template"
    differing = total = 0
    for name, t in a.items():
        if t.shape != b[name].shape or t.dtype != b[name].dtype:
            return f"MISMATCH: {name} {t.dtype}{list(t.shape)} vs {b[name].dtype}{list(b[name].shape)}"
        differing += int((_ulps(t, b[name]) > 1).sum())
        total += t.numel()
    if differing == 0:
        return "match"
    if method in RANDOM and base is not None:
        return _same_statistics(a, b, _tensors(base))
    if method in TIES_FAMILY and differing < 0.02 * total:
        return "ties"
    return f"MISMATCH: {differing} of {total} elements differ"


def _same_statistics(a, b, base) -> str:
    names = [n for n in a if a[n].dim() == 2 and n in base and base[n].shape == a[n].shape]

    def stats(m):
        changed = sum(int((m[n] != base[n]).sum()) for n in names) / sum(m[n].numel() for n in names)
        l1 = sum(float((m[n].double() - base[n].double()).abs().sum()) for n in names)
        return changed, l1

    (ka, la), (kb, lb) = stats(a), stats(b)
    if abs(ka - kb) <= 0.02 and abs(la - lb) <= 0.02 * max(la, lb):
        return "stats"
    return f"MISMATCH: kept {ka:.3f} vs {kb:.3f}, L1 {la:.4g} vs {lb:.4g}"


@dataclass
class Outcome:
    config: str
    mergekit: str
    result: str
    detail: str


def run_corpus(root: Path, configs: list[Path]) -> list[Outcome]:
    import yaml

    world = build_world(root / "world")
    work = root / "runs"
    work.mkdir(parents=True, exist_ok=True)
    jobs = [(instantiate(c, world, work / c.name), work / f"mk-{c.stem}") for c in configs]
    # mergekit's outputs are kept between runs (it is slow); a changed config runs again
    stale = [(cfg, out) for cfg, out in jobs if not (out / "mergekit_config.yml").is_file()
             or (out / "mergekit_config.yml").read_text() != cfg.read_text()]
    for _, out in stale:
        shutil.rmtree(out, ignore_errors=True)
    status = run_mergekit(stale, work / "mergekit-status.json") if stale else {}
    status_path = work / "mergekit-all.json"
    known = json.loads(status_path.read_text()) if status_path.exists() else {}
    known.update(status)
    status_path.write_text(json.dumps(known))
    outcomes = []
    for (cfg, mk_out), source in zip(jobs, configs, strict=True):
        ours = work / f"evo-{source.stem}"
        shutil.rmtree(ours, ignore_errors=True)
        code, message = run_evomerge(cfg, ours)
        mk = known.get(str(cfg), "?")
        data = yaml.safe_load(cfg.read_text())
        method = data.get("merge_method", "?") if isinstance(data, dict) else "?"
        base = data.get("base_model") if isinstance(data, dict) else None
        if code == 2 and len(message.splitlines()) == 1:
            outcomes.append(Outcome(source.stem, mk, "refused", message))
        elif code != 0:
            outcomes.append(Outcome(source.stem, mk, "CRASH", message.splitlines()[-1] if message else str(code)))
        elif mk != "ok":
            outcomes.append(Outcome(source.stem, mk, "MISMATCH", "evomerge merged what mergekit refused"))
        else:
            verdict = compare(ours, mk_out, method, Path(base) if isinstance(base, str) and Path(base).is_dir() else None)
            outcomes.append(Outcome(source.stem, mk, verdict.split(":")[0], verdict))
    return outcomes


def main(argv: list[str]) -> int:
    configs = [Path(a) for a in argv] or sorted(CORPUS.glob("*.yml"))
    outcomes = run_corpus(Path("/tmp/evomerge-mergekit-corpus"), configs)
    for o in outcomes:
        print(f"{o.config:32s} mergekit={'ok' if o.mergekit == 'ok' else 'fails'}  {o.result:9s} {o.detail[:150]}")
    tally = {}
    for o in outcomes:
        tally[o.result] = tally.get(o.result, 0) + 1
    merged = [o for o in outcomes if o.mergekit == "ok"]
    same = sum(o.result in ("match", "ties", "stats") for o in merged)
    print(f"\n{len(outcomes)} configs: {tally}; mergekit merges {len(merged)}, evomerge gives its model for {same}")
    return 0 if not any(o.result in ("MISMATCH", "CRASH") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
