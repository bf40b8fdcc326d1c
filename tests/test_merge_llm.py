"""The foundation merge of causal LMs, end to end through the ``evomerge merge`` command:
mergekit YAMLs and evomerge recipes over tiny Llama/Mistral families, checked against an
independent computation from the source files, against mergekit itself, and reloaded with
transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import reference as ref
import torch
import yaml
from safetensors.torch import load_file

LAYERS = 2


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def depth(name: str) -> float:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) / (LAYERS - 1) if m else 0.0


def value(setting, name: str):
    """A mergekit parameter for one tensor: number, per-layer list, or filter conditionals."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return value(cond["value"], name)
        raise AssertionError(f"no conditional matches {name}")
    return ref.gradient(setting, depth(name))


# --- mergekit configurations over a family -------------------------------------------------------


def mk_config(fam: dict[str, Path], method: str, dtype: str) -> dict:
    b, m1, m2, m3 = (str(fam[k]) for k in ("base", "m1", "m2", "m3"))
    if method == "linear":
        return {"merge_method": "linear", "dtype": dtype, "models": [
            {"model": m1, "parameters": {"weight": 0.2}},
            {"model": m2, "parameters": {"weight": [0.3, 0.9]}},
            {"model": m3, "parameters": {"weight": 0.5}}]}
    if method == "task_arithmetic":
        return {"merge_method": method, "base_model": b, "dtype": dtype,
                "parameters": {"lambda": 0.8}, "models": [
                    {"model": b},
                    {"model": m1, "parameters": {"weight": 0.5}},
                    {"model": m2, "parameters": {"weight": [0.3, 0.9]}},
                    {"model": m3, "parameters": {"weight": -0.2}}]}
    if method == "ties":
        return {"merge_method": method, "base_model": b, "dtype": dtype,
                "parameters": {"normalize": True}, "models": [
                    {"model": b},
                    {"model": m1, "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": m2, "parameters": {"weight": [0.3, 0.9], "density": 0.6}},
                    {"model": m3, "parameters": {"weight": 0.4, "density": [0.7, 0.3]}}]}
    if method in ("dare_ties", "dare_linear"):
        return {"merge_method": method, "base_model": b, "dtype": dtype, "models": [
            {"model": b},
            {"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": m2, "parameters": {"weight": 0.5, "density": 0.3}},
            {"model": m3, "parameters": {"weight": 0.3, "density": 0.7}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": b, "dtype": dtype,
                "models": [{"model": b}, {"model": m1}],
                "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.8]},
                                     {"filter": "mlp", "value": 0.7}, {"value": 0.4}]}}
    raise AssertionError(method)


def reference_merge(cfg: dict) -> dict[str, torch.Tensor]:
    """The merge a mergekit config describes, computed tensor by tensor in float64."""
    method, base_path = cfg["merge_method"], cfg.get("base_model")
    entries = [e for e in cfg["models"] if e["model"] != base_path or method == "slerp"]
    srcs = [tensors(Path(e["model"])) for e in entries]
    base = tensors(Path(base_path)) if base_path else None
    shared = cfg.get("parameters", {})
    out = {}
    for name in srcs[0]:
        xs = [s[name] for s in srcs]
        w = [value(e.get("parameters", {}).get("weight"), name) for e in entries]
        if method == "linear":
            out[name] = ref.linear(xs, w)
        elif method == "task_arithmetic":
            out[name] = ref.task_arithmetic(base[name], xs, w, lam=shared.get("lambda", 1.0))
        elif method == "ties":
            d = [value(e["parameters"]["density"], name) for e in entries]
            out[name] = ref.ties(base[name], xs, w, d, normalize=shared.get("normalize", True))
        elif method == "slerp":
            out[name] = ref.slerp(xs[0], xs[1], value(shared["t"], name))
    return out


def evomerge(cli, cfg_path: Path, out: Path, *extra) -> Path:
    code, stdout, stderr = cli("merge", cfg_path, "--out", out, "--device", "cpu", *extra)
    assert code == 0, stderr
    assert (out / "model.safetensors").exists()
    return out


EXACT = ["linear", "task_arithmetic", "ties", "slerp"]


@pytest.mark.parametrize("method", EXACT)
def test_mergekit_yaml_matches_independent_computation(method, llama_fp32, tmp_path, evomerge_cli):
    cfg = mk_config(llama_fp32, method, "float32")
    out = evomerge(evomerge_cli, write(tmp_path / "cfg.yaml", cfg), tmp_path / "out")
    got, expected = tensors(out), reference_merge(cfg)
    assert set(got) == set(expected)
    for name, t in got.items():
        assert t.dtype == torch.float32
        assert torch.allclose(t.double(), expected[name], rtol=1e-5, atol=1e-6), name
    # the merge is not trivially one of its inputs
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"],
                           tensors(llama_fp32["m1"])["model.layers.1.mlp.up_proj.weight"])


def test_output_reloads_with_transformers_and_has_a_card(llama_bf16, tmp_path, evomerge_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = mk_config(llama_bf16, "ties", "bfloat16")
    out = evomerge(evomerge_cli, write(tmp_path / "ties.yaml", cfg), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    on_disk = tensors(out)
    for name, p in model.state_dict().items():
        assert torch.equal(p, on_disk[name]), name
    ids = tok("abc 1+2=3", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 64 and torch.isfinite(logits).all()

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == [str(llama_bf16[k]) for k in ("base", "m1", "m2", "m3")]
    assert "ties" in front["tags"] and "**ties**" in card
    recipe = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert recipe["merge"]["method"] == "ties"
    params = {m["model"]: m["parameters"] for m in recipe["models"]}
    assert params[str(llama_bf16["m2"])] == {"weight": [0.3, 0.9], "density": 0.6}
    assert params[str(llama_bf16["m3"])] == {"weight": 0.4, "density": [0.7, 0.3]}
    assert recipe["dtype"] == "bfloat16"


def test_mistral_family_merges_and_reloads(mistral_fp32, tmp_path, evomerge_cli):
    from transformers import AutoModelForCausalLM

    b, m1, m2 = (str(mistral_fp32[k]) for k in ("base", "m1", "m2"))
    cfg = {"merge_method": "task_arithmetic", "base_model": b, "models": [
        {"model": m1, "parameters": {"weight": 0.5}}, {"model": m2, "parameters": {"weight": 0.5}}]}
    out = evomerge(evomerge_cli, write(tmp_path / "c.yaml", cfg), tmp_path / "out")
    expected = reference_merge(cfg)
    for name, t in tensors(out).items():
        assert torch.allclose(t.double(), expected[name], rtol=1e-5, atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MistralForCausalLM"


def test_per_layer_lists_and_filters(llama_fp32, tmp_path, evomerge_cli):
    b, m1 = str(llama_fp32["base"]), str(llama_fp32["m1"])
    base, one = tensors(llama_fp32["base"]), tensors(llama_fp32["m1"])
    # weight [0, 1] over 2 layers: layer 0 takes the base, layer 1 all of m1's delta,
    # tensors outside the layers the first value (0)
    cfg = {"merge_method": "task_arithmetic", "base_model": b,
           "models": [{"model": m1, "parameters": {"weight": [0.0, 1.0]}}]}
    got = tensors(evomerge(evomerge_cli, write(tmp_path / "g.yaml", cfg), tmp_path / "g"))
    for name in base:
        if ".layers.1." in name:
            assert torch.allclose(got[name], one[name], atol=1e-7), name
            assert not torch.equal(got[name], base[name]), name
        else:
            assert torch.equal(got[name], base[name]), name
    # filters: mlp tensors get weight 0, everything else weight 1
    cfg["models"][0]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]
    got = tensors(evomerge(evomerge_cli, write(tmp_path / "f.yaml", cfg), tmp_path / "f"))
    for name in base:
        target = base if ".mlp." in name else one
        assert torch.allclose(got[name], target[name], atol=1e-7), name


def native_recipe(fam, method: str, seed: int = 0, **merge_extra) -> dict:
    return {"name": "native", "base": str(fam["base"]), "seed": seed, "dtype": "float32",
            "models": [
                {"model": str(fam["m1"]), "name": "alpha", "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(fam["m2"]), "name": "beta", "parameters": {"weight": [0.2, 0.8], "density": 0.7}}],
            "merge": {"method": method, "parameters": {"normalize": True}, **merge_extra}}


def test_native_recipe_ties(llama_fp32, tmp_path, evomerge_cli):
    recipe = native_recipe(llama_fp32, "ties")
    out = evomerge(evomerge_cli, write(tmp_path / "r.yaml", recipe), tmp_path / "out")
    cfg = {"merge_method": "ties", "base_model": recipe["base"], "parameters": {"normalize": True},
           "models": [{"model": m["model"], "parameters": m["parameters"]} for m in recipe["models"]]}
    expected = reference_merge(cfg)
    for name, t in tensors(out).items():
        assert torch.allclose(t.double(), expected[name], rtol=1e-5, atol=1e-6), name
    card = (out / "README.md").read_text()
    assert "`alpha`" in card and "`beta`" in card and str(llama_fp32["m2"]) in card
    assert "**ties**" in card


def test_merges_are_deterministic(llama_fp32, tmp_path, evomerge_cli):
    cfg = write(tmp_path / "ties.yaml", mk_config(llama_fp32, "ties", "float32"))
    a = evomerge(evomerge_cli, cfg, tmp_path / "a") / "model.safetensors"
    b = evomerge(evomerge_cli, cfg, tmp_path / "b") / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()

    def dare(seed, out):
        path = write(tmp_path / f"dare{seed}.yaml", native_recipe(llama_fp32, "dare_ties", seed))
        return (evomerge(evomerge_cli, path, tmp_path / out) / "model.safetensors").read_bytes()

    first, again, other = dare(1, "d1"), dare(1, "d1b"), dare(2, "d2")
    assert first == again
    assert first != other


# --- parity with mergekit itself -----------------------------------------------------------------

MK_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out, "--no-copy-tokenizer"], standalone_mode=False)
"""

PARITY = [(m, d) for m in EXACT for d in ("bfloat16", "float32")] + [
    ("dare_ties", "float32"), ("dare_linear", "float32")]


@pytest.fixture(scope="session")
def mergekit_outputs(llama_fp32, llama_bf16, tmp_path_factory) -> dict[tuple[str, str], tuple]:
    """Every parity config merged once by mergekit-yaml's entry point (one process: mergekit's
    import alone takes seconds)."""
    root = tmp_path_factory.mktemp("mergekit")
    runs, args = {}, []
    for method, dtype in PARITY:
        fam = llama_bf16 if dtype == "bfloat16" else llama_fp32
        cfg = mk_config(fam, method, dtype)
        path = write(root / f"{method}-{dtype}.yaml", cfg)
        out = root / f"out-{method}-{dtype}"
        runs[(method, dtype)] = (path, out, cfg)
        args += [str(path), str(out)]
    subprocess.run([sys.executable, "-c", MK_DRIVER, *args], check=True, capture_output=True)
    return runs


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("method,dtype", [p for p in PARITY if p[0] in EXACT])
def test_parity_with_mergekit(method, dtype, mergekit_outputs, tmp_path, evomerge_cli):
    cfg_path, mk_out, cfg = mergekit_outputs[(method, dtype)]
    if method == "ties" and dtype == "bfloat16":
        # magnitude ties at the threshold: take mergekit's order (evomerge's YAML extension)
        cfg_path = write(tmp_path / "ties.yaml", {**cfg, "tie_order": "mergekit"})
    ours, theirs = tensors(evomerge(evomerge_cli, cfg_path, tmp_path / "out")), tensors(mk_out)
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == getattr(torch, dtype), name
        if dtype == "bfloat16":
            assert int(ulp_distance(t, theirs[name]).max()) <= 1, name
        else:
            assert torch.allclose(t, theirs[name], rtol=1e-6, atol=1e-8), name


def test_bf16_ties_tie_order_cli_option_and_default(mergekit_outputs, llama_bf16, tmp_path,
                                                    evomerge_cli):
    cfg_path, mk_out, cfg = mergekit_outputs[("ties", "bfloat16")]
    theirs = tensors(mk_out)
    forced = tensors(evomerge(evomerge_cli, cfg_path, tmp_path / "opt", "--tie-order", "mergekit"))
    for name, t in forced.items():
        assert int(ulp_distance(t, theirs[name]).max()) <= 1, name

    # default (index) order: a handful of elements differ, all of them threshold ties
    ours = tensors(evomerge(evomerge_cli, cfg_path, tmp_path / "default"))
    base = tensors(llama_bf16["base"])
    srcs = [tensors(llama_bf16[k]) for k in ("m1", "m2", "m3")]
    entries = cfg["models"][1:]
    differing = total = 0
    for name, t in ours.items():
        far = ulp_distance(t, theirs[name]) > 1
        differing += int(far.sum())
        total += t.numel()
        if not far.any():
            continue
        # each differing element is a tie at some source's top-k threshold
        at_threshold = torch.zeros_like(far)
        for src, entry in zip(srcs, entries, strict=True):
            delta = src[name] - base[name]
            density = value(entry["parameters"]["density"], name)
            k = max(1, int(density * delta.numel()))
            threshold = torch.sort(delta.abs().reshape(-1).float(), descending=True).values[k - 1]
            at_threshold |= delta.abs().float() == threshold
        assert bool(at_threshold[far].all()), name
    assert 0 < differing < 0.01 * total  # ties do occur in bf16, and only they differ


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_agrees_with_mergekit_in_distribution(method, mergekit_outputs, llama_fp32, tmp_path,
                                                   evomerge_cli):
    cfg_path, mk_out, _ = mergekit_outputs[(method, "float32")]
    ours = tensors(evomerge(evomerge_cli, cfg_path, tmp_path / "out"))
    theirs, base = tensors(mk_out), tensors(llama_fp32["base"])
    names = [n for n in base if base[n].dim() == 2]
    assert len(names) > 5

    def stats(merged):
        changed = sum(int((merged[n] != base[n]).sum()) for n in names)
        size = sum(merged[n].numel() for n in names)
        l1 = sum(float((merged[n] - base[n]).abs().sum()) for n in names)
        return changed / size, l1

    (frac_ours, l1_ours), (frac_theirs, l1_theirs) = stats(ours), stats(theirs)
    # survivors of three independent drops with densities .5, .3, .7: 1 - .5*.7*.3 = 0.895
    assert frac_ours == pytest.approx(0.895, abs=0.02)
    assert frac_ours == pytest.approx(frac_theirs, abs=0.02)
    assert l1_ours == pytest.approx(l1_theirs, rel=0.05)
    assert not torch.equal(ours[names[0]], theirs[names[0]])  # independent masks, not bitwise


def test_mergekit_binary_is_next_to_the_interpreter():
    assert (Path(sys.executable).parent / "mergekit-yaml").exists()


@pytest.mark.parametrize("rescale", [None, True, False])
def test_mergekit_dare_rescale_is_l1_by_default(rescale, llama_fp32, tmp_path, evomerge_cli):
    """mergekit's DARE `rescale` (default on) preserves each task vector's L1 norm; off: none."""
    b, m1 = str(llama_fp32["base"]), str(llama_fp32["m1"])
    cfg = {"merge_method": "dare_linear", "base_model": b,
           "models": [{"model": m1, "parameters": {"weight": 0.5, "density": 0.4}}]}
    if rescale is not None:
        cfg["parameters"] = {"rescale": rescale}
    got = tensors(evomerge(evomerge_cli, write(tmp_path / "c.yaml", cfg), tmp_path / "out"))
    base, one = tensors(llama_fp32["base"]), tensors(llama_fp32["m1"])
    name = "model.layers.0.mlp.gate_proj.weight"
    delta, merged = one[name] - base[name], got[name] - base[name]
    kept = merged != 0
    assert 0.35 < float(kept.float().mean()) < 0.45
    if rescale is False:
        assert torch.allclose(merged[kept], 0.5 * delta[kept], rtol=1e-5, atol=1e-7)
    else:
        assert float(merged.abs().sum()) == pytest.approx(0.5 * float(delta.abs().sum()), rel=1e-4)


@pytest.fixture(scope="session")
def llama_bf16_wide(tmp_path_factory) -> dict[str, Path]:
    """Embeddings big enough for chunk threads, parallel reads and reused output buffers."""
    from tiny import make_llm_family

    return make_llm_family(tmp_path_factory.mktemp("llama_wide"), n=3, dtype=torch.bfloat16,
                           vocab=20_000)


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_kernels_off_gives_the_same_file(method, llama_bf16_wide, tmp_path, evomerge_cli):
    """`EVOMERGE_KERNELS=0` (the torch code, as where the kernels are not built) writes the
    same bytes as the fused kernels. (For linear this holds where torch's CPU kernels are
    AVX2 or newer, which fuse the multiply-add as the kernel does; torch's scalar code can
    differ in the last float32 bit.)"""
    import os

    cfg = write(tmp_path / "cfg.yaml", mk_config(llama_bf16_wide, method, "bfloat16"))
    fused = evomerge(evomerge_cli, cfg, tmp_path / "fused")
    plain = tmp_path / "plain"
    env = {**os.environ, "EVOMERGE_KERNELS": "0"}
    run = subprocess.run([str(Path(sys.executable).parent / "evomerge"), "merge", str(cfg), "--out",
                          str(plain), "--device", "cpu"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "kernels are not built" not in run.stderr  # switched off on purpose: no warning
    assert (plain / "model.safetensors").read_bytes() == (fused / "model.safetensors").read_bytes()
