"""Bad input through ``evomerge merge``: exit code 2, one line on stderr naming the culprit,
and no output folder left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

MISSING = "model.layers.1.mlp.up_proj.weight"


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ties_cfg(base, *models, **params) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5, **params}}
                       for m in models]}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refused(cli, cfg: Path, out: Path, *extra) -> str:
    """Run a merge that must fail; return its one-line message."""
    code, _, stderr = cli("merge", cfg, "--out", out, "--device", "cpu", *extra)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def test_different_hidden_size_names_the_tensor(llama_fp32, tmp_path, evomerge_cli):
    from tiny import llama_config
    from transformers import AutoModelForCausalLM

    wide = tmp_path / "wide"
    AutoModelForCausalLM.from_config(llama_config(hidden=48)).save_pretrained(wide)
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], llama_fp32["m1"], wide))
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert "model wide" in msg and "shape" in msg
    assert any(f"tensor {n} " in msg for n in load_file(str(wide / "model.safetensors")))


def test_different_model_type(llama_fp32, mistral_fp32, tmp_path, evomerge_cli):
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], llama_fp32["m1"], mistral_fp32["m2"]))
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert "different architectures" in msg and "mistral" in msg and "llama" in msg


def drop_tensor(folder: Path, name: str) -> None:
    state = load_file(str(folder / "model.safetensors"))
    del state[name]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_in_a_source(llama_fp32, tmp_path, evomerge_cli):
    broken = copy_model(llama_fp32["m1"], tmp_path / "broken")
    drop_tensor(broken, MISSING)
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], broken, llama_fp32["m2"]))
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert "model broken" in msg and MISSING in msg and "missing" in msg


def test_missing_tensor_in_the_base(llama_fp32, tmp_path, evomerge_cli):
    broken = copy_model(llama_fp32["base"], tmp_path / "broken")
    drop_tensor(broken, MISSING)
    cfg = write(tmp_path / "c.yaml", ties_cfg(broken, llama_fp32["m1"], llama_fp32["m2"]))
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert "model base" in msg and MISSING in msg and "missing" in msg


def test_unknown_method(llama_fp32, tmp_path, evomerge_cli):
    cfg = ties_cfg(llama_fp32["base"], llama_fp32["m1"])
    cfg["merge_method"] = "frobnicate"
    msg = refused(evomerge_cli, write(tmp_path / "c.yaml", cfg), tmp_path / "out")
    assert "frobnicate" in msg and "ties" in msg


def test_misspelt_value_name(llama_fp32, tmp_path, evomerge_cli):
    cfg = ties_cfg(llama_fp32["base"], llama_fp32["m1"])
    cfg["models"][0]["parameters"]["densty"] = 0.5
    msg = refused(evomerge_cli, write(tmp_path / "c.yaml", cfg), tmp_path / "out")
    assert "'densty'" in msg and "density" in msg and "models[m1].parameters" in msg


def test_value_out_of_range(llama_fp32, tmp_path, evomerge_cli):
    cfg = ties_cfg(llama_fp32["base"], llama_fp32["m1"], llama_fp32["m2"], density=1.5)
    msg = refused(evomerge_cli, write(tmp_path / "c.yaml", cfg), tmp_path / "out")
    assert "model m1" in msg and "density=1.5" in msg and "tensor " in msg


def test_unreadable_safetensors(llama_fp32, tmp_path, evomerge_cli):
    broken = copy_model(llama_fp32["m1"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x93garbage, not a checkpoint" * 10)
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], broken))
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert str(broken / "model.safetensors") in msg


def test_truncated_safetensors(llama_fp32, tmp_path, evomerge_cli):
    broken = copy_model(llama_fp32["m1"], tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], broken))
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert str(broken / "model.safetensors") in msg


@pytest.mark.parametrize("text", ["models: [unclosed\n  - : :", "just a string", "\x00\x01binary"])
def test_not_a_yaml_recipe(tmp_path, evomerge_cli, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert str(cfg) in msg


def test_recipe_field_error_names_the_field(llama_fp32, tmp_path, evomerge_cli):
    recipe = {"base": str(llama_fp32["base"]), "models": [{"model": str(llama_fp32["m1"])}],
              "merge": {"method": "ties", "tie_order": "random"}}
    msg = refused(evomerge_cli, write(tmp_path / "r.yaml", recipe), tmp_path / "out")
    assert "merge.tie_order" in msg


def test_pickle_only_needs_allow_pickle(llama_fp32, tmp_path, evomerge_cli):
    pickled = copy_model(llama_fp32["m1"], tmp_path / "pickled")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], pickled, llama_fp32["m2"]))
    msg = refused(evomerge_cli, cfg, tmp_path / "out")
    assert "model pickled" in msg and "--allow-pickle" in msg

    code, _, stderr = evomerge_cli("merge", cfg, "--out", tmp_path / "out", "--device", "cpu",
                                   "--allow-pickle")
    assert code == 0, stderr
    same = write(tmp_path / "s.yaml", ties_cfg(llama_fp32["base"], llama_fp32["m1"], llama_fp32["m2"]))
    code, _, stderr = evomerge_cli("merge", same, "--out", tmp_path / "ref", "--device", "cpu")
    assert code == 0, stderr
    got, expected = load_file(str(tmp_path / "out/model.safetensors")), load_file(str(tmp_path / "ref/model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_existing_output_needs_force(llama_fp32, tmp_path, evomerge_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], llama_fp32["m1"]))
    code, _, stderr = evomerge_cli("merge", cfg, "--out", out, "--device", "cpu")
    assert code == 2 and "--force" in stderr and len(stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    code, _, stderr = evomerge_cli("merge", cfg, "--out", out, "--device", "cpu", "--force")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_empty_existing_output_is_fine(llama_fp32, tmp_path, evomerge_cli):
    out = tmp_path / "out"
    out.mkdir()
    cfg = write(tmp_path / "c.yaml", ties_cfg(llama_fp32["base"], llama_fp32["m1"]))
    code, _, stderr = evomerge_cli("merge", cfg, "--out", out, "--device", "cpu")
    assert code == 0, stderr
    assert (out / "model.safetensors").exists()


def test_shared_value_out_of_range(llama_fp32, tmp_path, evomerge_cli):
    cfg = {"merge_method": "slerp", "base_model": str(llama_fp32["base"]),
           "models": [{"model": str(llama_fp32["base"])}, {"model": str(llama_fp32["m1"])}],
           "parameters": {"t": [0.5, 2.0]}}
    msg = refused(evomerge_cli, write(tmp_path / "c.yaml", cfg), tmp_path / "out")
    assert "merge.parameters" in msg and "t=2.0" in msg and ".layers.1." in msg
