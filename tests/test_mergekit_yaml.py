"""mergekit YAMLs through ``evomerge merge``: parity with mergekit 0.1.5 itself on the corpus
(tests/mergekit_corpus: its examples and probes of slices, the base among models, out_dtype,
chat templates, tokenizer unions in both orders, the tokenizer block, model+lora, revisions),
and one-line exit-2 refusals of every key evomerge does not honour."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergekit_corpus import CORPUS, build_world, run_corpus

# configs mergekit merges whose model evomerge must give (the full corpus: tests/mergekit_corpus.py)
PARITY = ["gradient-slerp", "ties-slices", "slice-base", "linear-base-in-models", "linear-base-appended",
          "out-dtype", "chat-template-named", "chat-template-inline", "union-small-first",
          "union-large-first", "tokenizer-block", "tokenizer-source-base", "tokenizer-source-model",
          "lora", "revision-local", "dare-ties", "ties-bf16", "qwen2-tied-ties", "slices-union-ties"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def outcomes(root):
    return {o.config: o for o in run_corpus(root, [CORPUS / f"{name}.yml" for name in PARITY])}


@pytest.mark.parametrize("name", PARITY)
def test_gives_mergekits_model(name, outcomes):
    o = outcomes[name]
    assert o.mergekit == "ok", o.mergekit
    expected = {"dare-ties": "stats", "ties-bf16": "ties"}.get(name, "match")
    assert o.result in (expected, "match"), o.detail


@pytest.fixture(scope="module")
def world(root) -> dict[str, str]:
    return build_world(root / "world")


def refused(cli, tmp_path: Path, cfg: dict, *extra) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    code, _, stderr = cli("merge", path, "--out", out, "--device", "cpu", *extra)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert not out.exists()
    return lines[0]


def linear(world, **extra) -> dict:
    return {"models": [{"model": world["m1"], "parameters": {"weight": 0.5}},
                       {"model": world["m2"], "parameters": {"weight": 0.5}}],
            "merge_method": "linear", **extra}


@pytest.mark.parametrize("key,expect", [
    ("dtyp", "did you mean 'dtype'"), ("base_modle", "did you mean 'base_model'"),
    ("tokenizer_sorce", "did you mean 'tokenizer_source'"), ("frobnicate", "known keys")])
def test_unknown_top_level_keys(key, expect, world, tmp_path, evomerge_cli):
    msg = refused(evomerge_cli, tmp_path, linear(world, **{key: "float16"}))
    assert repr(key) in msg and expect in msg


def test_unknown_nested_keys(world, tmp_path, evomerge_cli):
    cfg = linear(world)
    cfg["models"][0]["paramters"] = {"weight": 1}
    assert "models.0.paramters" in refused(evomerge_cli, tmp_path, cfg)
    cfg = {"slices": [{"sources": [{"model": world["m1"], "layer_rang": [0, 2]}]}], "merge_method": "passthrough"}
    assert "layer_rang" in refused(evomerge_cli, tmp_path, cfg)
    cfg = linear(world, tokenizer={"source": "union", "tokens": {"<a>": {"sorce": "zero"}}})
    assert "sorce" in refused(evomerge_cli, tmp_path, cfg)


@pytest.mark.parametrize("cfg_change,expect", [
    (lambda w, c: c.update(modules={"decoder": {"models": c.pop("models")}}), "`modules`"),
    (lambda w, c: c.update(slices=[{"sources": [{"model": w["m1"], "layer_range": [0, 2]}]}]), "exactly one of"),
    (lambda w, c: c.update(tokenizer_source="union", tokenizer={"source": "base"}), "give one of them"),
    (lambda w, c: c["models"][0].update(model={"model": w["m1"], "override_architecture": "X"}),
     "override_architecture"),
    (lambda w, c: c.update(chat_template="nosuchtemplate"), "chat_template 'nosuchtemplate'"),
    (lambda w, c: c.update(chat_template="{{ x }}"), "chat_template"),
    (lambda w, c: c.update(tokenizer_source=w["m3"]), "not one of the merged models"),
    (lambda w, c: c["models"][0].update(model=w["m1"] + "@a@b"), "more than one '@'"),
    (lambda w, c: c["models"][0].update(model=w["m1"] + "+a+b"), "more than one '+'"),
    (lambda w, c: c["models"][1].update(model=w["m1"]), "listed twice"),
    (lambda w, c: c["models"][0]["parameters"].update(wieght=1), "'wieght' is not a value"),
])
def test_refused_settings(cfg_change, expect, world, tmp_path, evomerge_cli):
    cfg = linear(world)
    cfg_change(world, cfg)
    assert expect in refused(evomerge_cli, tmp_path, cfg)


def test_slice_refusals(world, tmp_path, evomerge_cli):
    def slices(*sources, **extra):
        return {"slices": [{"sources": list(sources), **extra}], "merge_method": "ties", "base_model": world["base"]}

    m1 = {"model": world["m1"], "layer_range": [0, 2], "parameters": {"weight": 1, "density": 0.5}}
    assert "not among the slice's sources" in refused(evomerge_cli, tmp_path, slices(m1))
    base = {"model": world["base"], "layer_range": [0, 3]}
    assert "same number of layers" in refused(evomerge_cli, tmp_path, slices(base, m1))
    base["layer_range"] = [3, 5]
    m1["layer_range"] = [3, 5]
    assert "which has 4 layers" in refused(evomerge_cli, tmp_path, slices(base, m1))
    base["layer_range"] = m1["layer_range"] = [2, 2]
    assert "need 0 <= start < end" in refused(evomerge_cli, tmp_path, slices(base, m1))
    base["layer_range"] = m1["layer_range"] = [0, 2]
    assert "'densit' is not a value" in refused(evomerge_cli, tmp_path, slices(base, m1, parameters={"densit": 1}))


def test_vocabulary_mismatch_needs_a_tokenizer_setting(world, tmp_path, evomerge_cli):
    cfg = linear(world)
    cfg["models"][1]["model"] = world["x1"]
    assert "tokenizer_source: union" in refused(evomerge_cli, tmp_path, cfg)


def pickled_lora(world, dest: Path) -> Path:
    """The corpus LoRA saved as adapter_model.bin (a pickle) only."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(world["lora"], dest)
    torch.save(load_file(str(dest / "adapter_model.safetensors")), dest / "adapter_model.bin")
    (dest / "adapter_model.safetensors").unlink()
    return dest


def test_lora_refusals(world, tmp_path, evomerge_cli):
    import json
    import shutil

    cfg = linear(world)
    cfg["models"][0]["model"] = f"{world['m1']}+{tmp_path}"
    assert "no adapter_config.json" in refused(evomerge_cli, tmp_path, cfg)
    cfg["models"][0]["model"] = f"{world['m1']}+{pickled_lora(world, tmp_path / 'pickled')}"
    assert "--allow-pickle" in refused(evomerge_cli, tmp_path, cfg)
    dora = tmp_path / "dora"
    shutil.copytree(world["lora"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cfg["models"][0]["model"] = f"{world['m1']}+{dora}"
    assert "use_dora" in refused(evomerge_cli, tmp_path, cfg)


def test_pickled_lora_loads_with_allow_pickle(world, tmp_path, evomerge_cli):
    import torch
    from safetensors.torch import load_file

    pickled = pickled_lora(world, tmp_path / "pickled")
    for name, lora in (("safe", world["lora"]), ("pickle", pickled)):
        cfg = linear(world)
        cfg["models"][0]["model"] = f"{world['m1']}+{lora}"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, _, err = evomerge_cli("merge", path, "--out", tmp_path / name, "--device", "cpu", "--allow-pickle")
        assert code == 0, err
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("safe", "pickle"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- mergekit-yaml's command-line habits ---------------------------------------------------------


def test_positional_output_shards_tokenizer_and_seed(world, tmp_path, evomerge_cli):
    from mergekit_corpus import _tensors

    cfg = tmp_path / "dare.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"model": world["m1"], "parameters": {"weight": 0.5, "density": 0.5}}],
        "merge_method": "dare_linear", "base_model": world["base"]}))

    def merge(out, *extra):
        code, _, err = evomerge_cli("merge", cfg, out, "--device", "cpu", "--quiet", *extra)
        assert code == 0, err
        return out

    one = merge(tmp_path / "one", "--random-seed", "3")
    sharded = merge(tmp_path / "sharded", "--random-seed", "3", "--out-shard-size", "20K", "--no-copy-tokenizer", "-v")
    other = merge(tmp_path / "other", "--random-seed", "4")
    assert (one / "tokenizer.json").exists() and not (sharded / "tokenizer.json").exists()
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    a, b, c = _tensors(one), _tensors(sharded), _tensors(other)
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)
    assert not all(a[k].equal(c[k]) for k in a)
    code, _, err = evomerge_cli("merge", cfg, tmp_path / "x", "--out", tmp_path / "y")
    assert code == 2 and "two output folders" in err
    code, _, err = evomerge_cli("merge", cfg)
    assert code == 2 and "no output folder" in err


def test_layer_count_change_of_per_layer_configs_is_refused(world, tmp_path, evomerge_cli):
    cfg = {"slices": [{"sources": [{"model": world["q_base"], "layer_range": [0, 2]},
                                   {"model": world["q1"], "layer_range": [1, 3]}]}],
           "merge_method": "slerp", "base_model": world["q_base"], "parameters": {"t": 0.5}}
    assert "layer_types has one entry per layer" in refused(evomerge_cli, tmp_path, cfg)


def test_relative_paths_read_from_the_working_directory(world, tmp_path, evomerge_cli, monkeypatch):
    """As mergekit-yaml: a relative model path in a mergekit YAML means the working directory."""
    import os

    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    cfg = linear(world)
    cfg["models"][0]["model"] = os.path.relpath(world["m1"], tmp_path)
    path = elsewhere / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    code, _, err = evomerge_cli("merge", path, tmp_path / "out", "--device", "cpu")
    assert code == 0, err
