"""Layouts as data: every supported family's tensors fall in the groups its modeling code implies,
value lists are spread over its layers, mergekit 0.1.5 gives the same tensors for Falcon, GPT-2
and Qwen2 merges with value lists, and a model of an unknown layout is refused in one line.

The expected groups are written here from each family's module names (transformers), and the
per-layer values from the hand-worked table in ``reference.GRADIENT_WEIGHTS``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import reference as ref
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.modalities import get_adapter
from evomerge.pipelines.merge import merge_to_folder, open_session
from evomerge.recipe import load_recipe

LAYERS = 4
LLAMA_OTHER = {"model.embed_tokens.weight": "embed", "model.norm.weight": "head", "lm_head.weight": "head"}
# family -> (prefix of layer i, every other tensor and its group); a tied head is read from the embedding
EXPECTED = {
    "llama": ("model.layers.{}.", LLAMA_OTHER),
    "mistral": ("model.layers.{}.", LLAMA_OTHER),
    "qwen2": ("model.layers.{}.", LLAMA_OTHER),
    "qwen3": ("model.layers.{}.", LLAMA_OTHER),
    "gemma": ("model.layers.{}.", LLAMA_OTHER),
    "gemma2": ("model.layers.{}.", LLAMA_OTHER),
    "phi3": ("model.layers.{}.", LLAMA_OTHER),
    "gpt2": ("transformer.h.{}.", {"transformer.wte.weight": "embed", "transformer.wpe.weight": "embed",
                                   "transformer.ln_f.weight": "head", "transformer.ln_f.bias": "head",
                                   "lm_head.weight": "head"}),
    "falcon": ("transformer.h.{}.", {"transformer.word_embeddings.weight": "embed",
                                     "transformer.ln_f.weight": "head", "transformer.ln_f.bias": "head",
                                     "lm_head.weight": "head"}),
    "gpt_neox": ("gpt_neox.layers.{}.", {"gpt_neox.embed_in.weight": "embed",
                                         "gpt_neox.final_layer_norm.weight": "head",
                                         "gpt_neox.final_layer_norm.bias": "head", "embed_out.weight": "head"}),
}


def config(family: str, **overrides):
    import transformers as T

    small = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=LAYERS)
    llama_like = dict(small, intermediate_size=64, num_key_value_heads=2)
    cls, kwargs = {
        "llama": (T.LlamaConfig, llama_like),
        "mistral": (T.MistralConfig, llama_like),
        "qwen2": (T.Qwen2Config, llama_like),
        "qwen3": (T.Qwen3Config, dict(llama_like, head_dim=8)),
        "gemma": (T.GemmaConfig, dict(llama_like, head_dim=8)),
        "gemma2": (T.Gemma2Config, dict(llama_like, head_dim=8)),
        "phi3": (T.Phi3Config, dict(llama_like, pad_token_id=0)),
        "gpt2": (T.GPT2Config, dict(vocab_size=64, n_embd=32, n_head=4, n_layer=LAYERS, n_positions=64,
                                    bos_token_id=1, eos_token_id=2)),
        "falcon": (T.FalconConfig, small),
        "gpt_neox": (T.GPTNeoXConfig, dict(small, intermediate_size=64)),
        "opt": (T.OPTConfig, dict(small, ffn_dim=64, word_embed_proj_dim=32)),
    }[family]
    return cls(**{**kwargs, **overrides})


def save_family(root: Path, cfg, names=("base", "m1", "m2"), seed: int = 0) -> dict[str, Path]:
    """A base and fine-tunes (the base plus seeded noise), saved as safetensors by transformers."""
    from tiny import perturbed
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg)
    out = {}
    for i, name in enumerate(names):
        model = base if i == 0 else perturbed(copy.deepcopy(base), seed * 10 + i, scale=0.1)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


_BUILT: dict[str, dict[str, Path]] = {}


@pytest.fixture
def family_models(tmp_path_factory):
    def get(family: str) -> dict[str, Path]:
        if family not in _BUILT:
            _BUILT[family] = save_family(tmp_path_factory.mktemp(family), config(family))
        return _BUILT[family]

    return get


def expected_group(family: str, name: str) -> str:
    prefix, other = EXPECTED[family]
    for i in range(LAYERS):
        if name.startswith(prefix.format(i)):
            return f"layers.{i}"
    return other[name]


def a_weight(values: list[float], name: str, family: str) -> float:
    """The weight a tensor gets from a value list: layer i of LAYERS at depth i/(LAYERS-1),
    tensors outside the layers at depth 0."""
    group = expected_group(family, name)
    depth = Fraction(int(group.split(".")[1]), LAYERS - 1) if group.startswith("layers.") else Fraction(0)
    return ref.gradient(values, depth)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_groups_and_value_lists(family, family_models, tmp_path):
    models = family_models(family)
    adapter = get_adapter("causal_lm")
    source = adapter.open(str(models["base"]), "base")
    assert adapter.layout.family == family
    names = source.names()
    prefix, other = EXPECTED[family]
    assert {n for n in names if not any(n.startswith(prefix.format(i)) for i in range(LAYERS))} == set(other)
    for name in names:
        assert adapter.group(name) == expected_group(family, name), name
    assert adapter.groups(names) == ["embed", *(f"layers.{i}" for i in range(LAYERS)), "head"]

    # a linear merge whose first weight is a value list: each layer gets its own weight
    values = [0.2, 0.6, 1.0]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"modality": "causal_lm", "merge": {"method": "linear"}, "models": [
        {"model": str(models["m1"]), "name": "a", "parameters": {"weight": values}},
        {"model": str(models["m2"]), "name": "b", "parameters": {"weight": 0.5}}]}))
    out = merge_to_folder(open_session(load_recipe(recipe), device="cpu"), tmp_path / "out", show_progress=False)
    merged = load_file(out / "model.safetensors")
    a, b = load_file(models["m1"] / "model.safetensors"), load_file(models["m2"] / "model.safetensors")
    assert set(a) <= set(merged)
    weights = set()
    for name in a:
        wa = a_weight(values, name, family)
        weights.add(round(wa, 6))
        expected = (wa * a[name].double() + 0.5 * b[name].double()) / (wa + 0.5)
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6, msg=name)
    assert weights == {0.2, round(0.2 / 3 + 1.2 / 3, 6), round(1.2 / 3 + 1 / 3, 6), 1.0}  # 4 layers, 4 weights


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_llava_language_model_groups(kind, tmp_path):
    from tiny import make_vlm_family

    fam = make_vlm_family(tmp_path, kind=kind)
    adapter = get_adapter("vlm")
    vlm = adapter.open(str(fam["vlm"]), "vlm")
    text = adapter.open(str(fam["text"]), "text")
    assert adapter.layout.family == "llava (mistral)"
    lm = "model.language_model."
    for name in vlm.names():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")):
            group = "vision"
        elif name.startswith(lm + "layers."):
            group = "layers." + name[len(lm + "layers."):].split(".")[0]
        else:
            group = {lm + "embed_tokens.weight": "embed", lm + "norm.weight": "head", "lm_head.weight": "head"}[name]
        assert adapter.group(name) == group, name
    assert set(text.names()) == {n for n in vlm.names() if adapter.group(n) != "vision"}
    # the language model's layers spread over depth; the vision tower's own layers do not count
    depths = {adapter.group(n): adapter.layer_fraction(n, vlm) for n in vlm.names()}
    assert depths == {"embed": 0.0, "layers.0": 0.0, "layers.1": 1.0, "head": 0.0, "vision": 0.0}


# --- the same tensors as mergekit 0.1.5 ------------------------------------------------------------

MK_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out, "--no-copy-tokenizer"], standalone_mode=False)
"""
# mergekit's falcon table names the new decoder's ln_attn/ln_mlp and an untied lm_head; GPT-2 is
# tied (no lm_head stored, as transformers saves it); Qwen2 has attention biases
PARITY_FAMILIES = {"falcon": dict(new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False),
                   "gpt2": {}, "qwen2": {}}


def passthrough_layers(family: str) -> int:
    """Layers of the frankenmerge: 6 from 4, but 4 for Qwen2, whose config lists one layer_types
    entry per layer (which neither tool rewrites)."""
    return LAYERS if family == "qwen2" else 6


def mk_configs(family: str, fam: dict[str, Path]) -> dict[str, dict]:
    base, m1, m2 = (str(fam[k]) for k in ("base", "m1", "m2"))
    half = passthrough_layers(family) // 2
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": m1, "parameters": {"weight": [0, 0.5, 1]}},
            {"model": m2, "parameters": {"weight": [0.9, 0.1, 0.3, 0.7]}}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "dtype": "float32",
                  "models": [{"model": base}, {"model": m1}], "parameters": {"t": [0, 0.5, 1]}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                            "models": [{"model": m1, "parameters": {"weight": [0.2, 1.0]}},
                                       {"model": m2, "parameters": {"weight": [0.7, 0.1, 0.4]}}]},
        # a frankenmerge: layers renumbered, the count written under the family's config key
        "passthrough": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": m1, "layer_range": [0, half]}]},
            {"sources": [{"model": m2, "layer_range": [1, 1 + half]}]}]},
    }


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory) -> list[tuple[str, str, Path, Path]]:
    """(family, method, config, mergekit's output) for every case, mergekit run in one process."""
    root = tmp_path_factory.mktemp("parity")
    cases, args = [], []
    for family, overrides in PARITY_FAMILIES.items():
        fam = save_family(root / family, config(family, **overrides), seed=3)
        for method, cfg in mk_configs(family, fam).items():
            path = root / f"{family}-{method}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            cases.append((family, method, path, root / f"mk-{family}-{method}"))
            args += [str(path), str(cases[-1][3])]
    done = subprocess.run([sys.executable, "-c", MK_DRIVER, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return cases


def test_value_lists_match_mergekit(parity_runs, tmp_path, evomerge_cli):
    for family, method, cfg, theirs_dir in parity_runs:
        out = tmp_path / f"{family}-{method}"
        code, _, stderr = evomerge_cli("merge", cfg, "--out", out, "--device", "cpu")
        assert code == 0, stderr
        ours, theirs = load_file(out / "model.safetensors"), load_file(theirs_dir / "model.safetensors")
        assert set(ours) == set(theirs), (family, method)
        for name, t in ours.items():
            assert torch.equal(t, theirs[name]), (family, method, name)
        key = "n_layer" if family == "gpt2" else "num_hidden_layers"
        layers = {json.loads((d / "config.json").read_text())[key] for d in (out, theirs_dir)}
        assert layers == {passthrough_layers(family) if method == "passthrough" else LAYERS}, (family, method)


# --- refusals --------------------------------------------------------------------------------------


def test_unknown_layout_refused_on_the_command_line(tmp_path, evomerge_cli):
    fam = save_family(tmp_path, config("opt"), names=("o1", "o2"))
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(fam["o1"]), "parameters": {"weight": [0, 1]}},
        {"model": str(fam["o2"]), "parameters": {"weight": 1}}]}))
    code, _, stderr = evomerge_cli("merge", cfg, "--out", tmp_path / "out", "--device", "cpu")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert "model o1: " in lines[0] and "model.decoder." in lines[0] and "OPTForCausalLM" in lines[0]
    assert "layouts.py" in lines[0]
    assert not (tmp_path / "out").exists()


def gpt2_rewritten(family_models, folder: Path, edit) -> dict[str, torch.Tensor]:
    """The tiny GPT-2 base saved into ``folder`` with its tensors passed through ``edit``; the
    original tensors are returned."""
    from safetensors.torch import save_file

    folder.mkdir()
    src = family_models("gpt2")["base"]
    (folder / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    save_file(edit(tensors), folder / "model.safetensors")
    return tensors


def test_a_known_family_with_a_stray_tensor_is_refused(family_models, tmp_path):
    folder = tmp_path / "stray"
    gpt2_rewritten(family_models, folder, lambda t: {**t, "transformer.extra.weight": torch.zeros(2)})
    with pytest.raises(EvomergeError, match=r"model stray: tensor transformer.extra.weight does not fit the "
                                            r"gpt2 layout \(architecture GPT2LMHeadModel\)"):
        get_adapter("causal_lm").open(str(folder), "stray")


def test_gpt2_names_without_the_transformer_prefix(family_models, tmp_path):
    """GPT-2's own checkpoints store ``h.0.*``, ``wte.weight``: read as transformers names them."""
    folder = tmp_path / "bare"
    tensors = gpt2_rewritten(family_models, folder, lambda t: {k.removeprefix("transformer."): v for k, v in t.items()})
    source = get_adapter("causal_lm").open(str(folder), "bare")
    assert set(source.names()) == set(tensors) | {"lm_head.weight"}


def test_families_of_other_layouts_are_not_merged_together(family_models):
    adapter = get_adapter("causal_lm")
    adapter.open(str(family_models("gpt_neox")["base"]), "neox")
    with pytest.raises(EvomergeError, match="model llama: llama layout, the models before it have the gpt_neox"):
        adapter.open(str(family_models("llama")["base"]), "llama")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2"])
def test_exported_group_filters_select_one_group(family, family_models):
    """Per-group values exported to mergekit: each layer's filter (a substring of names) picks
    exactly that layer's tensors."""
    from evomerge.mergekit_export import group_filters

    adapter = get_adapter("causal_lm")
    names = adapter.open(str(family_models(family)["base"]), "base").names()
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(adapter.group(name), []).append(name)
    filters = group_filters(groups)
    assert filters["layers.2"] == [EXPECTED[family][0].format(2)]
    for group, strings in filters.items():
        assert {n for n in names if any(f in n for f in strings)} == set(groups[group]), group


def test_an_unlisted_family_whose_tensors_fit_is_merged_in_that_layout(family_models, tmp_path):
    """A family missing from the table (here a Llama checkpoint relabelled) takes the layout all
    its tensors fit: its groups are the usual ones, not one group."""
    folder = tmp_path / "granite"
    folder.mkdir()
    src = family_models("llama")["base"]
    cfg = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GraniteForCausalLM"],
                                                    "model_type": "granite"}))
    (folder / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    adapter = get_adapter("causal_lm")
    names = adapter.open(str(folder), "granite").names()
    assert adapter.layout.family == "llama"
    assert adapter.groups(names) == ["embed", *(f"layers.{i}" for i in range(LAYERS)), "head"]


def test_a_tied_head_is_the_merged_embedding_in_trials_and_in_the_saved_model(family_models, tmp_path):
    """GPT-2 ties its head: per-group values for the head group would be what a trial scores
    (head and embedding share storage) but not what a loader reads, so no head is merged or written."""
    from transformers import AutoModelForCausalLM

    from evomerge.pipelines.candidates import make_candidates

    models = family_models("gpt2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "modality": "causal_lm", "base": str(models["base"]), "models": [str(models["m1"]), str(models["m2"])],
        "merge": {"method": "task_arithmetic", "granularity": "per_group", "search": {"weight": [0, 1]}}}))
    candidates = make_candidates(load_recipe(recipe))
    assert "lm_head.weight" not in {j.name for j in candidates.session.engine.jobs}
    values = {name: (0.9 if "head" in name else 0.3) for name in candidates.space.names}
    runnable = candidates.apply(values)
    trial_logits = runnable(torch.arange(8)[None]).logits
    out = merge_to_folder(candidates.session, tmp_path / "out", values, show_progress=False)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(saved.lm_head.weight, saved.transformer.wte.weight)
    assert torch.equal(saved(torch.arange(8)[None]).logits, trial_logits)
