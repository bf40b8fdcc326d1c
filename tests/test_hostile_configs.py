"""Hostile input through the real `evomerge` entry: every case exits 2 with one short line on
stderr naming what is wrong, no traceback, and nothing written (no output, no temporary folder)."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

MAX_LINE = 300  # "short": one line a person reads at a glance


def refused(cli, *args, out: Path | None = None) -> str:
    code, stdout, stderr = cli(*map(str, args))
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr and len(lines[0]) <= MAX_LINE, lines[0]
    assert stdout == ""
    if out is not None:
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def merge_refused(cli, cfg: Path, *extra) -> str:
    out = cfg.parent / "out"
    return refused(cli, "merge", cfg, "--out", out, "--device", "cpu", *extra, out=out)


@pytest.fixture
def fam(llama_fp32, tmp_path) -> dict[str, Path]:
    """A private copy of the tiny family (cases corrupt it) and a folder for the config."""
    root = tmp_path / "fam"
    shutil.copytree(llama_fp32["base"].parent, root)
    (tmp_path / "cfg").mkdir()
    return {name: root / name for name in ("base", "m1", "m2")} | {"cfg": tmp_path / "cfg"}


def mk(fam, body: str) -> str:
    """A mergekit TIES config over the family, with ``body`` appended."""
    return (f"merge_method: ties\nbase_model: {fam['base']}\n" + body).format(**fam)


def evo(fam, body: str = "") -> str:
    """An evomerge recipe over the family, with ``body`` appended."""
    return (f"base: {fam['base']}\nmodels: [{fam['m1']}, {fam['m2']}]\n"
            "merge: {{method: ties, parameters: {{weight: 0.5, density: 0.5}}}}\n" + body).format(**fam)


ONE = "models:\n - model: {m1}\n   parameters: {{weight: 0.5, density: 0.5}}\n"
BOMB = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9 if i else ["x"] * 9) + "]\n" for i in range(9))

RECIPES = {  # name -> (config text builder, words the message must contain)
    "empty weight list": (lambda f: mk(f, "models:\n - model: {m1}\n   parameters: {{weight: [], density: 0.5}}\n"), ["weight"]),
    "parameters is a string": (lambda f: mk(f, "models:\n - model: {m1}\n   parameters: abc\n"), ["parameters"]),
    "models is a number": (lambda f: mk(f, "models: 5\n"), ["models"]),
    "model entry without model": (lambda f: mk(f, "models:\n - parameters: {{weight: 1}}\n"), ["model"]),
    "top parameters is a string": (lambda f: mk(f, ONE + "parameters: abc\n"), ["parameters"]),
    "mergekit typo dtyp": (lambda f: mk(f, ONE + "dtyp: float16\n"), ["dtyp"]),
    "mergekit typo base_modle": (lambda f: f"merge_method: linear\nbase_modle: {f['base']}\n" + ONE.format(**f), ["base_modle"]),
    "weight true": (lambda f: mk(f, "models:\n - model: {m1}\n   parameters: {{weight: true, density: 0.5}}\n"), ["weight"]),
    "weight nan": (lambda f: mk(f, "models:\n - model: {m1}\n   parameters: {{weight: .nan, density: 0.5}}\n"), ["weight"]),
    "weight inf": (lambda f: mk(f, "models:\n - model: {m1}\n   parameters: {{weight: .inf, density: 0.5}}\n"), ["weight"]),
    "misspelt value": (lambda f: mk(f, "models:\n - model: {m1}\n   parameters: {{weight: 1, densty: 0.5}}\n"), ["densty"]),
    "duplicate key": (lambda f: evo(f, "name: a\nname: b\n"), ["duplicate key 'name'"]),
    "duplicate key in a flow map": (lambda f: mk(f, "models:\n - model: {m1}\n   parameters: {{weight: 1, weight: 2}}\n"), ["duplicate key 'weight'"]),
    "alias bomb in evaluator": (lambda f: evo(f, BOMB + "evaluator: {{kind: python, callable: 'm:f', options: {{x: *l8}}}}\n"), ["aliases"]),
    "recursive alias": (lambda f: evo(f, "evaluator: &e {{kind: python, callable: 'm:f', options: {{x: *e}}}}\n"), ["recursive alias"]),
    "20000-deep nesting": (lambda f: evo(f, "evaluator: " + "[" * 20000 + "]" * 20000 + "\n"), ["nested deeper"]),
    "python object tag": (lambda f: evo(f, "seed: !!python/object/apply:os.system ['touch /tmp/x']\n"), ["not a valid YAML"]),
    "unknown evaluator key": (lambda f: evo(f, "evaluator: {{kind: ja_math, data: {{path: x.jsonl}}, max_new_token: 5}}\n"), ["evaluator.max_new_token", "unknown key"]),
    "unknown evaluator data key": (lambda f: evo(f, "evaluator: {{kind: ja_math, data: {{path: x.jsonl, image_field: i}}}}\n"), ["evaluator.data.image_field"]),
    "loss data with a question field": (lambda f: evo(f, "evaluator: {{kind: loss, data: {{path: x.jsonl, question_field: q}}}}\n"), ["evaluator.data.question_field"]),
    "unknown evaluator kind": (lambda f: evo(f, "evaluator: {{kind: bleu}}\n"), ["bleu", "ja_math"]),
    "evaluator without data": (lambda f: evo(f, "evaluator: {{kind: ja_math}}\n"), ["data"]),
    "evaluator bool as string": (lambda f: evo(f, "evaluator: {{kind: ja_math, path: x.jsonl, chat: 'yes'}}\n"), ["evaluator.chat"]),
    "evaluator negative batch": (lambda f: evo(f, "evaluator: {{kind: ja_math, path: x.jsonl, batch_size: -1}}\n"), ["batch_size"]),
    "evaluator infinite weight": (lambda f: evo(f, "evaluator: {{kind: clip_score, prompts: [a], weight: .inf}}\n"), ["evaluator.weight"]),
    "python evaluator not module:function": (lambda f: evo(f, "evaluator: {{kind: python, callable: 'os.system(1)'}}\n"), ["evaluator.callable"]),
    "unknown baseline key": (lambda f: evo(f, "baselines: [{{nmae: x, source: m1}}]\n"), ["baselines.0.nmae"]),
    "baseline with two kinds": (lambda f: evo(f, "baselines: [{{name: x, source: m1, method: ties}}]\n"), ["baselines.0"]),
    "duplicate baseline names": (lambda f: evo(f, "baselines: [{{name: x, source: m1}}, {{name: x, source: m2}}]\n"), ["baselines"]),
    "unknown search key": (lambda f: evo(f, "search: {{trails: 5}}\n"), ["search.trails"]),
    "negative trials": (lambda f: evo(f, "search: {{trials: -5}}\n"), ["search.trials"]),
    "negative popsize": (lambda f: evo(f, "search: {{popsize: -1}}\n"), ["search.popsize"]),
    "unknown sdxl key": (lambda f: evo(f, "modality: sdxl\nsdxl: {{stepz: 3}}\n"), ["sdxl.stepz"]),
    "unknown dfs key": (lambda f: "dfs: {{model_a: {m1}, model_b: {m2}, repeat: 2}}\n".format(**f), ["dfs.repeat"]),
    "dfs model is a number": (lambda f: "dfs: {model_a: 5, model_b: x}\n", ["dfs.model_a"]),
    "models is a string": (lambda f: f"base: {f['base']}\nmodels: abc\nmerge: {{method: ties}}\n", ["models"]),
    "empty model name": (lambda f: f"base: {f['base']}\nmodels: ['']\nmerge: {{method: ties}}\n", ["models.0"]),
    "seed is text": (lambda f: evo(f, "seed: abc\n"), ["seed"]),
    "unknown method": (lambda f: mk(f, ONE).replace("ties", "frobnicate"), ["frobnicate"]),
    "top level list": (lambda f: "- a\n- b\n", ["mapping"]),
    "empty file": (lambda f: "", ["mapping"]),
    "search bounds reversed": (lambda f: evo(f).replace("parameters: {weight: 0.5, density: 0.5}", "search: {weight: [1, 0]}"), ["weight"]),
    "model folder missing": (lambda f: mk(f, "models: [{{model: /nonexistent/evomerge/x}}]\n"), ["/nonexistent/evomerge/x"]),
    "model is a file": (lambda f: mk(f, "models: [{{model: {base}/config.json}}]\n"), ["config.json"]),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_hostile_recipe(fam, evomerge_cli, case):
    build, words = RECIPES[case]
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(build(fam))
    msg = merge_refused(evomerge_cli, cfg)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("data", [b"\x00\x01\x02binary\xff", b"\xff\xfe\xfd not utf-8", b"a: 1\n" * 4_000_000])
def test_binary_or_huge_yaml(tmp_path, evomerge_cli, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(data)
    assert str(cfg) in merge_refused(evomerge_cli, cfg)


# -- corrupt model folders ---------------------------------------------------------------------


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(change):
    def apply(folder: Path) -> None:
        header, data = header_of(folder / "model.safetensors")
        name = next(k for k in header if k != "__metadata__")
        change(header, name)
        with_header(folder / "model.safetensors", header, data)
    return apply


def _overlap(h, name):
    other = next(k for k in h if k not in ("__metadata__", name) and h[k]["dtype"] == h[name]["dtype"]
                 and h[k]["shape"] == h[name]["shape"])
    h[other]["data_offsets"] = h[name]["data_offsets"]


def _write(name: str, text: str | bytes):
    def apply(folder: Path) -> None:
        (folder / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return apply


FOLDERS = {  # name -> (corruption of m1 (or of the model named third), words the message must contain)
    "config.json malformed": (_write("config.json", "{not json"), ["config.json"]),
    "config.json a list": (_write("config.json", "[1, 2]"), ["config.json", "list"]),
    "config.json deep": (_write("config.json", "[" * 100000 + "]" * 100000), ["config.json"]),
    "config.json binary": (_write("config.json", b"\x00\xff\x00"), ["config.json"]),
    "config.json layers text": (_write("config.json", json.dumps({"model_type": "llama", "num_hidden_layers": "x"})), ["num_hidden_layers"], "base"),
    "index malformed": (_write("model.safetensors.index.json", "{oops"), ["index"]),
    "index a list": (_write("model.safetensors.index.json", "[]"), ["index"]),
    "index escapes the folder": (_write("model.safetensors.index.json", json.dumps({"weight_map": {"a": "../base/model.safetensors"}})), ["weight_map"]),
    "entry not an object": (edit_header(lambda h, n: h.__setitem__(n, 5)), ["not an object"]),
    "entry without data_offsets": (edit_header(lambda h, n: h[n].pop("data_offsets")), ["data_offsets"]),
    "negative offsets": (edit_header(lambda h, n: h[n].__setitem__("data_offsets", [-4, h[n]["data_offsets"][1]])), ["data_offsets"]),
    "offsets reversed": (edit_header(lambda h, n: h[n].__setitem__("data_offsets", h[n]["data_offsets"][::-1])), ["data_offsets"]),
    "shape far larger than the file": (edit_header(lambda h, n: h[n].__setitem__("shape", [10**12, 10**6])), ["needs", "bytes"]),
    "negative shape": (edit_header(lambda h, n: h[n].__setitem__("shape", [-1, 4])), ["shape"]),
    "dtype inconsistent with offsets": (edit_header(lambda h, n: h[n].__setitem__("dtype", "F64")), ["needs", "bytes"]),
    "unknown dtype": (edit_header(lambda h, n: h[n].__setitem__("dtype", "F128")), ["dtype"]),
    "offsets past the end": (edit_header(lambda h, n: h[n].__setitem__("data_offsets", [10**9, 10**9 + 4])), ["end of the file"]),
    "overlapping tensors": (edit_header(_overlap), ["overlap"]),
    "header not an object": (lambda f: with_header(f / "model.safetensors", b"[1, 2, 3]", b""), ["not a JSON object"]),
    "header deeply nested": (lambda f: with_header(f / "model.safetensors", b"[" * 100000 + b"]" * 100000, b""), ["safetensors"]),
    "header length huge": (lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}"), ["header length"]),
    "header duplicate names": (lambda f: with_header(f / "model.safetensors", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8), ["twice"]),
    "empty file": (_write("model.safetensors", b""), ["safetensors"]),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_corrupt_model_folder(fam, evomerge_cli, case):
    corrupt, words, *target = FOLDERS[case]
    corrupt(fam[target[0] if target else "m1"])
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(mk(fam, ONE))
    msg = merge_refused(evomerge_cli, cfg)
    assert all(w in msg for w in words), msg


def test_symlink_out_of_the_model_folder_is_refused(fam, tmp_path, evomerge_cli):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (fam["m1"] / "notes.txt").symlink_to(secret)  # would be copied into the output
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n - model: {fam['m1']}\n   parameters: {{weight: 1.0}}\n")
    msg = merge_refused(evomerge_cli, cfg)
    assert "notes.txt" in msg and "outside the model folder" in msg


def test_symlinked_shard_out_of_the_folder_is_refused(fam, tmp_path, evomerge_cli):
    shard = fam["m1"] / "model.safetensors"
    shard.rename(tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(mk(fam, ONE))
    assert "outside the model folder" in merge_refused(evomerge_cli, cfg)


def test_links_inside_the_folder_are_fine(fam, evomerge_cli):
    (fam["m1"] / "model.safetensors").rename(fam["m1"] / "weights.bin.safetensors")
    (fam["m1"] / "model.safetensors").symlink_to("weights.bin.safetensors")
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(mk(fam, ONE))
    code, _, err = evomerge_cli("merge", cfg, "--out", fam["cfg"] / "out", "--device", "cpu")
    assert code == 0, err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_source_is_refused_by_name_unless_allowed(fam, evomerge_cli, bad):
    path = fam["m1"] / "model.safetensors"
    state = load_file(str(path))
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][3, 2] = bad
    save_file(state, str(path), metadata={"format": "pt"})
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(mk(fam, ONE))
    msg = merge_refused(evomerge_cli, cfg)
    assert "model m1" in msg and name in msg and "--allow-nonfinite" in msg
    code, _, err = evomerge_cli("merge", cfg, "--out", fam["cfg"] / "out", "--device", "cpu", "--allow-nonfinite")
    assert code == 0, err


# -- pickles: refused without --allow-pickle, and never unpickled -------------------------------


class WritesMarker:
    """Unpickling this creates ``path``: proof that a loader ran pickled code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def marker_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": WritesMarker(marker)}, f)
    return path


def test_pickle_model_is_refused_and_not_loaded(fam, tmp_path, evomerge_cli):
    marker = tmp_path / "pwned"
    (fam["m1"] / "model.safetensors").unlink()
    marker_pickle(fam["m1"] / "pytorch_model.bin", marker)
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(mk(fam, ONE))
    assert "--allow-pickle" in merge_refused(evomerge_cli, cfg)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["file", "weight_name"])
def test_pickle_lora_is_refused_and_not_loaded(tmp_path, how):
    from tiny import tiny_sdxl_unet_config

    from evomerge.errors import EvomergeError
    from evomerge.modalities.sdxl import lora_deltas
    from evomerge.recipe import LoraSpec

    marker = tmp_path / "pwned"
    lora = marker_pickle(tmp_path / "pytorch_lora_weights.bin", marker)
    spec = LoraSpec(path=str(lora)) if how == "file" else LoraSpec(path=str(tmp_path), weight_name=lora.name)
    with pytest.raises(EvomergeError, match="--allow-pickle"):
        lora_deltas(spec, tiny_sdxl_unet_config(), torch.float32)
    assert not marker.exists()


def test_pickle_clip_checkpoint_is_refused_and_not_loaded(tmp_path, evomerge_cli):
    from tiny import make_open_clip

    config, _ = make_open_clip(tmp_path / "clip")
    marker = tmp_path / "pwned"
    ckpt = marker_pickle(tmp_path / "clip.pt", marker)
    (tmp_path / "images").mkdir()
    (tmp_path / "prompts.txt").write_text("a\n")
    msg = refused(evomerge_cli, "score", "clip", "--images", tmp_path / "images", "--prompts", tmp_path / "prompts.txt",
                  "--model-config", config, "--checkpoint", ckpt, "--device", "cpu")
    assert "--allow-pickle" in msg and not marker.exists()


# -- evaluators and the other commands ---------------------------------------------------------


def test_infinite_reference_answer_makes_nothing_correct(tmp_path, evomerge_cli):
    from evomerge.evaluators.ja_math import is_correct

    assert not is_correct("答えは12です", math.inf) and not is_correct("答えは" + "9" * 400 + "です", math.inf)
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"response": "答えは12です", "answer": Infinity}\n')
    code, out, err = evomerge_cli("score", "ja-math", rows)
    assert code == 0 and json.loads(out)["accuracy"] == 0.0, err


@pytest.mark.parametrize("cmd", ["ja-math", "ja-rouge"])
def test_binary_jsonl_for_score(tmp_path, evomerge_cli, cmd):
    rows = tmp_path / "r.jsonl"
    rows.write_bytes(b"\x00\xff\xfe\x80binary" * 10)
    assert "r.jsonl" in refused(evomerge_cli, "score", cmd, rows)


@pytest.fixture
def recipe_file(fam) -> Path:
    cfg = fam["cfg"] / "r.yaml"
    cfg.write_text(evo(fam).replace("parameters: {weight: 0.5, density: 0.5}", "search: {weight: [0, 1]}, parameters: {density: 0.5}")
                   + "evaluator: {kind: python, callable: 'math:fsum'}\nsearch: {trials: 2}\n")
    return cfg


@pytest.mark.parametrize("args,words", [
    (["--device", "tpu9"], ["--device"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--storage", "nope://x"], ["--storage"]),
    (["--storage", "journal:/nonexistent/evomerge/j.log"], ["--storage"]),
    (["--sampler", "annealing"], ["--sampler"]),
    (["--trials", "-3"], ["--trials"]),
    (["--trials", "many"], ["--trials"]),
])
def test_bad_evolve_options(recipe_file, evomerge_cli, args, words):
    run = recipe_file.parent / "run"
    msg = refused(evomerge_cli, "evolve", recipe_file, "--run-dir", run, *(["--device", "cpu"] if "--device" not in args else []), *args)
    assert all(w in msg for w in words), msg
    assert not run.exists()


@pytest.mark.parametrize("args", [["--device", "quantum"], ["--bogus"], []])
def test_bad_merge_options(fam, evomerge_cli, args):
    cfg = fam["cfg"] / "c.yaml"
    cfg.write_text(mk(fam, ONE))
    out = [] if not args else ["--out", fam["cfg"] / "out"]
    refused(evomerge_cli, "merge", cfg, *out, *args)
