"""VLM merges: a LLaVA / LLaVA-NeXT language model merged with a text LLM of a smaller vocabulary.

Tiny models built in code (tests/tiny.py). The merge goes through the recipe -> session ->
folder path; the result is reloaded with the stock transformers classes and generates from an
image. Expected tensors are computed independently from the raw safetensors files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.pipelines.merge import merge_to_folder, open_session
from evomerge.recipe import load_recipe
from tests import reference
from tests.reference import raw_vlm
from tests.tiny import VLM_TEXT_VOCAB, make_vlm_family

V = VLM_TEXT_VOCAB


def merged_and_sources(out: Path, paths: dict[str, Path], kind: str):
    """The merged VLM's tensors and its sources', after checking keys and the kept vision parts."""
    merged = raw_vlm(out)
    vlm, base, text = raw_vlm(paths["vlm"]), load_file(paths["base"] / "model.safetensors"), \
        load_file(paths["text"] / "model.safetensors")
    assert set(merged) == set(vlm)
    assert_vision_kept(merged, vlm, kind)
    return merged, vlm, base, text


def write_recipe(tmp: Path, paths: dict[str, Path], merge: dict, **extra) -> Path:
    recipe = {"name": "vlm-test", "modality": "vlm", "base": str(paths["base"]),
              "models": [{"model": str(paths["vlm"]), "name": "vlm"},
                         {"model": str(paths["text"]), "name": "text"}],
              "merge": merge, **extra}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def reload_and_generate(out: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=image(), text="<image>ab", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    return model


def assert_vision_kept(merged: dict[str, torch.Tensor], vlm: dict[str, torch.Tensor], kind: str) -> None:
    kept = [k for k in vlm if k.startswith(("vision_tower.", "multi_modal_projector.", "image_newline"))]
    assert any(k.startswith("vision_tower.") for k in kept) and any(k.startswith("multi_modal_projector.") for k in kept)
    assert ("image_newline" in kept) == (kind == "llava_next")
    for k in kept:
        assert torch.equal(merged[k], vlm[k]), k


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_llava_task_arithmetic(tmp_path: Path, layout: str) -> None:
    paths = make_vlm_family(tmp_path, kind="llava", layout=layout)
    w_vlm, w_text = 0.7, 0.45
    recipe = load_recipe(write_recipe(tmp_path, paths, {"method": "task_arithmetic", "parameters": {}},
                                      dtype="float32"))
    recipe.models[0].parameters["weight"] = w_vlm
    recipe.models[1].parameters["weight"] = w_text
    session = open_session(recipe, device="cpu")
    assert session.reference.label == "vlm"
    out = merge_to_folder(session, tmp_path / "out", show_progress=False)

    merged_model = reload_and_generate(out)
    merged, vlm, base, text = merged_and_sources(out, paths, "llava")

    def expected(vlm_t: torch.Tensor, base_t: torch.Tensor, text_t: torch.Tensor) -> torch.Tensor:
        return base_t + w_vlm * (vlm_t - base_t) + w_text * (text_t - base_t)

    for legacy, plain in (("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
                          ("language_model.lm_head.weight", "lm_head.weight")):
        got, src = merged[legacy], vlm[legacy]
        assert got.shape == src.shape and src.shape[0] > V
        torch.testing.assert_close(got[:V], expected(src[:V], base[plain], text[plain]), rtol=0, atol=1e-6)
        assert torch.equal(got[V:], src[V:])  # the image token and padding rows stay the VLM's
    for suffix in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight", "norm.weight"):
        torch.testing.assert_close(
            merged["language_model.model." + suffix],
            expected(vlm["language_model.model." + suffix], base["model." + suffix], text["model." + suffix]),
            rtol=0, atol=1e-6)
    # the stock class loaded exactly those tensors
    live = merged_model.state_dict()
    assert torch.equal(live["model.language_model.layers.1.mlp.down_proj.weight"],
                       merged["language_model.model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(live["lm_head.weight"], merged["language_model.lm_head.weight"])

    # the trial path (resident model rewritten in place) gives the same tensors as the export
    runnable = session.adapter.build(session.reference, torch.float32, "cpu")
    session.engine.merge_into(session.adapter.parameters(runnable), session.table())
    resident = runnable.state_dict()
    for name, tensor in live.items():
        assert torch.equal(resident[name], tensor), name


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_llava_next_ties_via_cli(tmp_path: Path, layout: str) -> None:
    from typer.testing import CliRunner

    from evomerge.cli import app

    paths = make_vlm_family(tmp_path, kind="llava_next", layout=layout, seed=3)
    density, weights = 0.6, [1.0, 0.5]
    recipe = yaml.safe_load(write_recipe(tmp_path, paths, {"method": "ties", "parameters": {"density": density}},
                                         dtype="float32").read_text())
    for spec, w in zip(recipe["models"], weights, strict=True):
        spec["parameters"] = {"weight": w}
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"

    reload_and_generate(out)
    merged, vlm, base, text = merged_and_sources(out, paths, "llava_next")

    def expected(vlm_t: torch.Tensor, base_t: torch.Tensor, text_t: torch.Tensor) -> torch.Tensor:
        return reference.ties(base_t, [vlm_t, text_t], weights, [density] * 2).float()

    emb = "language_model.model.embed_tokens.weight"
    torch.testing.assert_close(merged[emb][:V], expected(vlm[emb][:V], base["model.embed_tokens.weight"],
                                                         text["model.embed_tokens.weight"]), rtol=0, atol=1e-6)
    assert torch.equal(merged[emb][V:], vlm[emb][V:])
    head = "language_model.lm_head.weight"
    assert torch.equal(merged[head][V:], vlm[head][V:])
    for suffix in ("layers.0.self_attn.k_proj.weight", "layers.1.mlp.up_proj.weight"):
        torch.testing.assert_close(
            merged["language_model.model." + suffix],
            expected(vlm["language_model.model." + suffix], base["model." + suffix], text["model." + suffix]),
            rtol=0, atol=1e-6)


def test_vlm_needs_a_llava_model(tmp_path: Path) -> None:
    paths = make_vlm_family(tmp_path, kind="llava")
    paths["vlm"] = paths["text"]
    recipe = load_recipe(write_recipe(tmp_path, paths, {"method": "task_arithmetic", "parameters": {"weight": 0.5}}))
    recipe.models[0].name = "other"
    with pytest.raises(EvomergeError, match="LLaVA"):
        open_session(recipe, device="cpu")


def test_text_llm_with_tied_embeddings(tmp_path: Path) -> None:
    """A tied text LLM has no lm_head.weight on disk; its head is its embedding."""
    from transformers import AutoModelForCausalLM

    paths = make_vlm_family(tmp_path, kind="llava", layout="current", seed=5)
    text = AutoModelForCausalLM.from_pretrained(paths["text"])
    text.config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(text.config)
    tied.load_state_dict(text.state_dict(), strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    paths["text"] = tmp_path / "tied"

    recipe = load_recipe(write_recipe(tmp_path, paths, {"method": "task_arithmetic", "parameters": {"weight": 0.5}}))
    out = merge_to_folder(open_session(recipe, device="cpu"), tmp_path / "out", show_progress=False)
    merged, vlm = raw_vlm(out), raw_vlm(paths["vlm"])
    base, text_sd = load_file(paths["base"] / "model.safetensors"), load_file(tmp_path / "tied" / "model.safetensors")
    head = "language_model.lm_head.weight"
    expected = base["lm_head.weight"] + 0.5 * (vlm[head][:V] - base["lm_head.weight"]) \
        + 0.5 * (text_sd["model.embed_tokens.weight"] - base["lm_head.weight"])
    torch.testing.assert_close(merged[head][:V], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged[head][V:], vlm[head][V:])
    reload_and_generate(out)


def test_llava_with_a_tied_head_merges_with_tied_text_llms(tmp_path: Path) -> None:
    """The reference (LLaVA) ties its text head: nothing is missing from it, and the output's
    head is its merged embedding."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    paths = make_vlm_family(tmp_path, kind="llava", layout="current", seed=6)
    for key in ("vlm", "text", "base"):
        cls = AutoModelForImageTextToText if key == "vlm" else AutoModelForCausalLM
        model = cls.from_pretrained(paths[key])
        config = model.config.text_config if key == "vlm" else model.config
        config.tie_word_embeddings = True
        model.config.tie_word_embeddings = True
        tied = cls.from_config(model.config)
        tied.load_state_dict(model.state_dict(), strict=False)
        tied.tie_weights()
        tied.save_pretrained(tmp_path / f"tied-{key}")
        paths[key] = tmp_path / f"tied-{key}"
    recipe = load_recipe(write_recipe(tmp_path, paths, {"method": "task_arithmetic", "parameters": {"weight": 0.5}}))
    out = merge_to_folder(open_session(recipe, device="cpu"), tmp_path / "out", show_progress=False)
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
    assert not any(k.endswith("lm_head.weight") for k in raw_vlm(out))
