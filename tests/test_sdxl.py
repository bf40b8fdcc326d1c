"""SDXL UNets: block grouping on the real SDXL structure, and merges of tiny SDXL-shaped UNets.

The grouping is checked against an independent table written out here by hand from the
diffusers -> sgm conversion rules (REFERENCE.md, "SDXL UNet blocks"); the merges are reloaded
with diffusers and compared with values computed independently from the raw safetensors files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.modalities.sdxl import BLOCKS, SDXLAdapter
from evomerge.pipelines.merge import merge_to_folder, open_session
from evomerge.recipe import load_recipe
from tests import reference
from tests.tiny import TINY_TEXT_EMBEDS, make_sdxl_family, sdxl_unet_config

ATTN = {"to_q", "to_k", "to_v"}


# Every diffusers module of the SDXL UNet and its 20-block label, written out by hand from the
# diffusers -> sgm rules and the block names (REFERENCE.md, "SDXL UNet blocks"). SDXL's down
# blocks have 2 resnets (+ attentions in blocks 1 and 2, a downsampler in 0 and 1); its up blocks
# 3 resnets (+ attentions in 0 and 1, an upsampler in 0 and 1).
SDXL_BLOCKS = {
    "time_embedding": "BASE", "add_embedding": "BASE", "conv_in": "IN00",
    "down_blocks.0.resnets.0": "IN01", "down_blocks.0.resnets.1": "IN02",
    "down_blocks.0.downsamplers.0": "IN03",
    "down_blocks.1.resnets.0": "IN04", "down_blocks.1.attentions.0": "IN04",
    "down_blocks.1.resnets.1": "IN05", "down_blocks.1.attentions.1": "IN05",
    "down_blocks.1.downsamplers.0": "IN06",
    "down_blocks.2.resnets.0": "IN07", "down_blocks.2.attentions.0": "IN07",
    "down_blocks.2.resnets.1": "IN08", "down_blocks.2.attentions.1": "IN08",
    "mid_block": "M00",
    "up_blocks.0.resnets.0": "OUT00", "up_blocks.0.attentions.0": "OUT00",
    "up_blocks.0.resnets.1": "OUT01", "up_blocks.0.attentions.1": "OUT01",
    "up_blocks.0.resnets.2": "OUT02", "up_blocks.0.attentions.2": "OUT02",
    "up_blocks.0.upsamplers.0": "OUT02",
    "up_blocks.1.resnets.0": "OUT03", "up_blocks.1.attentions.0": "OUT03",
    "up_blocks.1.resnets.1": "OUT04", "up_blocks.1.attentions.1": "OUT04",
    "up_blocks.1.resnets.2": "OUT05", "up_blocks.1.attentions.2": "OUT05",
    "up_blocks.1.upsamplers.0": "OUT05",
    "up_blocks.2.resnets.0": "OUT06", "up_blocks.2.resnets.1": "OUT07", "up_blocks.2.resnets.2": "OUT08",
    "conv_norm_out": "OUT08", "conv_out": "OUT08",
}


def sgm_block(name: str) -> str:
    """The 20-block label of a UNet tensor, looked up in the table above."""
    for depth in (4, 1):  # blocks.i.kind.j, else a top-level module (mid_block, conv_in...)
        module = ".".join(name.split(".")[:depth])
        if module in SDXL_BLOCKS:
            return SDXL_BLOCKS[module]
    raise AssertionError(f"unexpected UNet tensor {name}")


def is_attn(name: str) -> bool:
    parts = name.split(".")
    return parts[-2] in ATTN or parts[-3:-1] == ["to_out", "0"]


@pytest.fixture(scope="module")
def sdxl_names() -> list[str]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    state = unet.state_dict()
    assert sum(t.numel() for t in state.values()) > 2.5e9  # the real 2.6B-parameter UNet
    names = list(state)
    return names


def test_real_sdxl_blocks(sdxl_names: list[str]) -> None:
    adapter = SDXLAdapter("blocks")
    for name in sdxl_names:
        assert adapter.group(name) == sgm_block(name), name
    assert adapter.groups(sdxl_names) == BLOCKS and len(BLOCKS) == 20
    spot = {"conv_in.weight": "IN00", "time_embedding.linear_1.weight": "BASE",
            "add_embedding.linear_2.bias": "BASE",
            "down_blocks.0.resnets.0.conv1.weight": "IN01",
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight": "IN08",
            "down_blocks.0.downsamplers.0.conv.weight": "IN03",
            "down_blocks.1.downsamplers.0.conv.weight": "IN06",
            "mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight": "M00",
            "mid_block.resnets.1.conv2.weight": "M00",
            "up_blocks.0.resnets.2.conv1.weight": "OUT02",
            "up_blocks.0.upsamplers.0.conv.weight": "OUT02",
            "up_blocks.1.attentions.0.proj_in.weight": "OUT03",
            "up_blocks.2.resnets.2.conv_shortcut.weight": "OUT08",
            "conv_norm_out.weight": "OUT08", "conv_out.bias": "OUT08"}
    for name, block in spot.items():
        assert name in sdxl_names, name
        assert adapter.group(name) == block, name
    # transformer depth per block, as the real SDXL has it
    depth = {b: len({n.split("transformer_blocks.")[1].split(".")[0] for n in sdxl_names
                     if "transformer_blocks." in n and adapter.group(n) == b}) for b in BLOCKS}
    assert depth == {**dict.fromkeys(BLOCKS, 0), "IN04": 2, "IN05": 2, "IN07": 10, "IN08": 10, "M00": 10,
                     "OUT00": 10, "OUT01": 10, "OUT02": 10, "OUT03": 2, "OUT04": 2, "OUT05": 2}


def test_real_sdxl_attn_other(sdxl_names: list[str]) -> None:
    adapter = SDXLAdapter("attn_other")
    for name in sdxl_names:
        assert adapter.group(name) == ("attn" if is_attn(name) else "other"), name
    assert adapter.groups(sdxl_names) == ["attn", "other"]
    attn = [n for n in sdxl_names if adapter.group(n) == "attn"]
    # 70 transformer blocks x 2 attentions x (q, k, v, out weight, out bias)
    assert len(attn) == 70 * 2 * 5
    assert adapter.group("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias") == "attn"
    assert adapter.group("down_blocks.1.attentions.0.transformer_blocks.0.norm1.weight") == "other"
    assert adapter.group("down_blocks.1.attentions.0.proj_out.weight") == "other"

    split = SDXLAdapter("blocks_attn_other")
    for name in sdxl_names:
        assert split.group(name) == f"{sgm_block(name)}.{'attn' if is_attn(name) else 'other'}", name
    groups = split.groups(sdxl_names)
    with_attn = ["IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
    assert len(groups) == 20 + len(with_attn)
    assert groups == [g for b in BLOCKS for g in (f"{b}.attn", f"{b}.other")
                      if g.endswith(".other") or g.split(".")[0] in with_attn]
    with pytest.raises(EvomergeError, match="grouping"):
        SDXLAdapter("layers")


# --- merges of tiny SDXL-shaped UNets -----------------------------------------------------------


def unet_file(folder: Path) -> dict[str, torch.Tensor]:
    sub = folder / "unet" if (folder / "unet").is_dir() else folder
    return load_file(sub / "diffusion_pytorch_model.safetensors")


def reload_and_run(out: Path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out).eval()
    with torch.no_grad():
        sample = unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 5, 32),
                      added_cond_kwargs={"text_embeds": torch.randn(1, TINY_TEXT_EMBEDS),
                                         "time_ids": torch.randn(1, 6)}).sample
    assert sample.shape == (1, 4, 16, 16) and torch.isfinite(sample).all()
    return unet


def assert_loaded(unet, merged: dict[str, torch.Tensor]) -> None:
    live = unet.state_dict()
    assert set(live) == set(merged)
    for name in merged:
        assert torch.equal(live[name], merged[name]), name


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    # u1 is a pipeline folder (unet/ + model_index.json), the others plain UNet folders
    return make_sdxl_family(tmp_path_factory.mktemp("sdxl"), n=3, pipeline_style=("u1",))


def write(tmp: Path, recipe: dict) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_linear_with_filtered_per_model_values(tmp_path: Path, family: dict[str, Path]) -> None:
    weights = {"u1": [{"filter": "attentions", "value": 0.2}, {"value": 1.0}],
               "u2": [{"filter": "to_q", "value": 0.0}, {"value": 0.5}], "u3": 0.3}
    recipe = write(tmp_path, {"modality": "sdxl", "models": [
        {"model": str(family[n]), "name": n, "parameters": {"weight": weights[n]}} for n in ("u1", "u2", "u3")],
        "merge": {"method": "linear"}})
    session = open_session(load_recipe(recipe), device="cpu")
    out = merge_to_folder(session, tmp_path / "out", show_progress=False)
    assert (out / "config.json").exists() and (out / "diffusion_pytorch_model.safetensors").exists()

    merged = unet_file(out)
    src = {n: unet_file(family[n]) for n in ("u1", "u2", "u3")}
    assert set(merged) == set(src["u1"])
    for name in merged:
        w = {"u1": 0.2 if "attentions" in name else 1.0, "u2": 0.0 if "to_q" in name else 0.5, "u3": 0.3}
        expected = sum(w[n] * src[n][name] for n in w) / sum(w.values())
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert_loaded(reload_and_run(out), merged)


def test_linear_per_group_values(tmp_path: Path, family: dict[str, Path]) -> None:
    recipe = write(tmp_path, {"modality": "sdxl", "grouping": "blocks_attn_other",
                              "models": [str(family["u2"]), str(family["u1"])],
                              "merge": {"method": "linear", "search": {"weight": [0, 1]}, "granularity": "per_group"}})
    session = open_session(load_recipe(recipe), device="cpu")
    groups = session.space.groups
    assert len(groups) == 20 + 11  # every block, and the 11 with attention split in two
    values = {}
    for k, g in enumerate(groups):
        values[f"{g}/u2/weight"] = 0.1 + 0.8 * k / len(groups)
        values[f"{g}/u1/weight"] = 0.5
    assert sorted(values) == sorted(session.space.names)
    out = merge_to_folder(session, tmp_path / "out", values, show_progress=False)

    merged, a, b = unet_file(out), unet_file(family["u2"]), unet_file(family["u1"])
    for name in merged:
        group = f"{sgm_block(name)}.{'attn' if is_attn(name) else 'other'}"
        wa, wb = values[f"{group}/u2/weight"], values[f"{group}/u1/weight"]
        torch.testing.assert_close(merged[name], (wa * a[name] + wb * b[name]) / (wa + wb), rtol=0, atol=1e-6)
    unet = reload_and_run(out)
    assert_loaded(unet, merged)

    # the trial path writes the same tensors into a resident UNet
    runnable = session.adapter.build(session.reference, torch.float32, "cpu")
    session.engine.merge_into(session.adapter.parameters(runnable), session.table(values))
    assert_loaded(runnable, merged)


def test_ties_from_pipeline_base(tmp_path: Path, family: dict[str, Path]) -> None:
    # the base given as a pipeline folder (model_index.json + unet/)
    pipeline_base = tmp_path / "pipe"
    (pipeline_base / "unet").mkdir(parents=True)
    for p in family["base"].iterdir():
        (pipeline_base / "unet" / p.name).write_bytes(p.read_bytes())
    (pipeline_base / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    weights, density = [1.0, 0.6, 0.8], 0.5
    recipe = write(tmp_path, {"modality": "sdxl", "base": str(pipeline_base), "models": [
        {"model": str(family[n]), "parameters": {"weight": w}} for n, w in zip(("u1", "u2", "u3"), weights, strict=True)],
        "merge": {"method": "ties", "parameters": {"density": density}}})
    session = open_session(load_recipe(recipe), device="cpu")
    out = merge_to_folder(session, tmp_path / "out", show_progress=False)

    merged, base = unet_file(out), unet_file(family["base"])
    src = [unet_file(family[n]) for n in ("u1", "u2", "u3")]
    for name in merged:
        expected = reference.ties(base[name], [s[name] for s in src], weights, [density] * 3).float()
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    reload_and_run(out)


def test_sdxl_rejects_a_non_unet(tmp_path: Path, family: dict[str, Path]) -> None:
    vae = tmp_path / "vae"
    vae.mkdir()
    for p in family["u2"].iterdir():
        (vae / p.name).write_bytes(p.read_bytes())
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(EvomergeError, match="not a UNet"):
        SDXLAdapter().open(str(vae), "vae")
