"""Few-step SDXL evolution end to end on a tiny pipeline, LoRA fusing, CLIP score, inspect.

Everything is built here from configs (tiny UNets with SDXL's text_time embedding, a tiny VAE,
CLIPTextModel + CLIPTextModelWithProjection of different widths, CLIPTokenizers from a vocabulary
written in code, a random open_clip model from a registered config): no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import load_evaluator
from evomerge.modalities.sdxl import SDXLAdapter, lora_deltas
from evomerge.pipelines.candidates import make_candidates
from evomerge.pipelines.evolve import Evolution
from evomerge.pipelines.merge import merge_to_folder, open_session
from evomerge.recipe import LoraSpec, load_recipe
from tests.test_sdxl import is_attn, sgm_block
from tests.tiny import (
    make_open_clip,
    make_sdxl_family,
    make_sdxl_pipeline,
    make_text_encoder_source,
    make_unet_lora,
    save_single_file,
    sdxl_unet_config,
)

PROMPTS = ["赤いりんごの写真", "夜の東京の街並み", "a red apple", "雪山と湖"]
SEARCH, FULL = 32, 64


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl_world")
    paths = make_sdxl_family(root, n=2)
    paths["pipeline"] = make_sdxl_pipeline(root, paths["base"])
    paths["lora"] = make_unet_lora(paths["base"], root / "lora")
    paths["je"] = make_text_encoder_source(root)
    paths["clip"], paths["clip_weights"] = make_open_clip(root / "clip")
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("# tiny prompts\n" + "\n".join(PROMPTS) + "\n", encoding="utf-8")
    return paths


def sdxl_block(world: dict[str, Path], **extra) -> dict:
    block = {"pipeline": str(world["pipeline"]), "lora": {"path": str(world["lora"]), "scale": 0.7},
             "height": FULL, "width": FULL, "search_height": SEARCH, "search_width": SEARCH}
    block.update(extra)
    return block


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


# --- LoRA ------------------------------------------------------------------------------------------


def diffusers_fused(world: dict[str, Path], unet_folder: Path, scale: float):
    """diffusers' own load_lora_weights + fuse_lora on a pipeline holding ``unet_folder``'s UNet."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = StableDiffusionXLPipeline.from_pretrained(world["pipeline"],
                                                     unet=UNet2DConditionModel.from_pretrained(unet_folder))
    pipe.load_lora_weights(world["lora"])
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return {k: v.detach() for k, v in pipe.unet.state_dict().items()}


def test_lora_fused_like_diffusers(tmp_path: Path, world: dict[str, Path]) -> None:
    expected = diffusers_fused(world, world["u1"], 0.7)
    raw = load_file(world["u1"] / "diffusion_pytorch_model.safetensors")
    deltas = lora_deltas(LoraSpec(path=str(world["lora"]), scale=0.7),
                         json.loads((world["u1"] / "config.json").read_text()), torch.float32)
    assert len(deltas) == sum(1 for n in raw if is_attn(n) and n.endswith(".weight"))
    changed = {n for n in raw if not torch.equal(raw[n], expected[n])}
    assert changed == set(deltas)

    # fused into a source (into: u1): a merge taking u1 alone gives diffusers' fused UNet
    recipe = {"modality": "sdxl", "models": [{"model": str(world["u1"]), "parameters": {"weight": 1.0}},
                                             {"model": str(world["u2"]), "parameters": {"weight": 0.0}}],
              "merge": {"method": "linear"}, "sdxl": sdxl_block(world, lora={"path": str(world["lora"]),
                                                                            "scale": 0.7, "into": "u1"})}
    session = open_session(load_recipe(write_recipe(tmp_path / "into_u1.yaml", recipe)))
    for name in raw:
        torch.testing.assert_close(session.sources[0].read(name), expected[name], rtol=0, atol=1e-6)

    # fused into the merge (into: merged): after every in-place merge, and in the export
    merged = dict(recipe, models=[str(world["u1"]), str(world["u2"])],
                  merge={"method": "linear", "search": {"weight": [0, 1]}},
                  sdxl=sdxl_block(world, lora={"path": str(world["lora"]), "scale": 0.7}, export="unet"))
    candidates = make_candidates(load_recipe(write_recipe(tmp_path / "merged.yaml", merged)))
    for _ in range(2):  # the LoRA is re-added after each merge, never accumulated
        candidates.apply({"u1/weight": 0.3, "u2/weight": 0.0})
        candidates.apply({"u1/weight": 1.0, "u2/weight": 0.0})
        live = candidates.session.adapter.parameters(candidates.runnable())
        for name in raw:
            torch.testing.assert_close(live[name].detach(), expected[name], rtol=0, atol=1e-6)
    out = candidates.export({"u1/weight": 1.0, "u2/weight": 0.0}, tmp_path / "unet_out", show_progress=False)
    from diffusers import UNet2DConditionModel

    reloaded = UNet2DConditionModel.from_pretrained(out).state_dict()
    for name in raw:
        torch.testing.assert_close(reloaded[name], expected[name], rtol=0, atol=1e-6)
    # a baseline (a source as it is) gets the LoRA too
    candidates.apply_baseline({"name": "u2", "source": "u2"})
    expected_u2 = diffusers_fused(world, world["u2"], 0.7)
    for name in list(raw)[:50]:
        torch.testing.assert_close(live[name].detach(), expected_u2[name], rtol=0, atol=1e-6)


def test_kohya_lora_gives_the_same_deltas(tmp_path: Path, world: dict[str, Path]) -> None:
    """SDXL-Lightning's LoRA file is kohya-style (lora_unet_*, lora_down/up, alpha)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft_state = load_file(world["lora"] / "pytorch_lora_weights.safetensors")
    kohya = convert_state_dict_to_kohya(peft_state)
    assert all(k.startswith("lora_unet_") for k in kohya)
    # the peft LoRA has lora_alpha 8 (in its metadata); kohya keeps alpha per module
    kohya = {k: torch.tensor(8.0) if k.endswith(".alpha") else v for k, v in kohya.items()}
    save_file(kohya, tmp_path / "kohya.safetensors")
    config = json.loads((world["u1"] / "config.json").read_text())
    a = lora_deltas(LoraSpec(path=str(world["lora"]), scale=0.5), config, torch.float32)
    b = lora_deltas(LoraSpec(path=str(tmp_path / "kohya.safetensors"), scale=0.5), config, torch.float32)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7)


def test_lora_into_unknown_label_is_refused(tmp_path: Path, world: dict[str, Path]) -> None:
    recipe = {"modality": "sdxl", "models": [str(world["u1"])], "merge": {"method": "linear"},
              "sdxl": sdxl_block(world, lora={"path": str(world["lora"]), "into": "nope"})}
    with pytest.raises(EvomergeError, match="sdxl.lora.into"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


# --- sources ---------------------------------------------------------------------------------------


def test_single_file_source(tmp_path: Path, world: dict[str, Path]) -> None:
    single = save_single_file(world["u2"], tmp_path / "u2-original.safetensors")
    raw = load_file(world["u2"] / "diffusion_pytorch_model.safetensors")
    adapter = SDXLAdapter(spec=load_recipe(write_recipe(tmp_path / "r.yaml", {
        "modality": "sdxl", "models": [str(single)], "merge": {"method": "linear"},
        "sdxl": sdxl_block(world)})).sdxl)
    source = adapter.open(str(single), "u2")
    assert set(source.names()) == set(raw)
    for name in raw:
        assert torch.equal(source.read(name), raw[name]), name
    # merged with a folder source, the result equals the all-folder merge
    out = {}
    for kind, ref in (("file", str(single)), ("folder", str(world["u2"]))):
        recipe = {"modality": "sdxl", "models": [{"model": str(world["u1"]), "parameters": {"weight": 0.4}},
                                                 {"model": ref, "name": "u2", "parameters": {"weight": 0.6}}],
                  "merge": {"method": "linear"}, "sdxl": {"pipeline": str(world["pipeline"]), "export": "unet"}}
        session = open_session(load_recipe(write_recipe(tmp_path / f"{kind}.yaml", recipe)))
        out[kind] = load_file(merge_to_folder(session, tmp_path / kind, show_progress=False)
                              / "diffusion_pytorch_model.safetensors")
    for name in out["folder"]:
        assert torch.equal(out["file"][name], out["folder"][name]), name
    with pytest.raises(EvomergeError, match="sdxl.pipeline"):
        SDXLAdapter().open(str(single), "u2")


# --- CLIP score ------------------------------------------------------------------------------------


def random_images(n: int, size: int = 40, seed: int = 0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def independent_clip_score(world: dict[str, Path], images, prompts: list[str]) -> float:
    """100 * max(cos, 0) averaged, from open_clip's own encoders and torch's cosine_similarity."""
    import open_clip

    open_clip.add_model_config(world["clip"])
    model, _, preprocess = open_clip.create_model_and_transforms(world["clip"].stem, pretrained=None)
    model.load_state_dict(torch.load(world["clip_weights"], weights_only=True))
    tokenizer = open_clip.get_tokenizer(world["clip"].stem)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(tokenizer(prompts))
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


def test_clip_score_matches_independent_cosine(tmp_path: Path, world: dict[str, Path], evomerge_cli) -> None:
    images = random_images(len(PROMPTS))
    for i, im in enumerate(images):
        im.save(tmp_path / f"img_{i}.png")
    expected = independent_clip_score(world, images, PROMPTS)
    code, out, err = evomerge_cli("score", "clip", "--images", tmp_path, "--prompts", world["prompts"],
                                  "--model-config", world["clip"], "--checkpoint", world["clip_weights"],
                                  "--device", "cpu")
    assert code == 0, err
    got = json.loads(out)
    assert got["n"] == len(PROMPTS)
    assert abs(got["clip_score"] - expected) < 1e-4

    # fewer images than prompts: matched by the index ending their names
    (tmp_path / "img_0.png").unlink()
    code, out, err = evomerge_cli("score", "clip", "--images", tmp_path, "--prompts", world["prompts"],
                                  "--model-config", world["clip"], "--checkpoint", world["clip_weights"],
                                  "--device", "cpu")
    assert code == 0, err
    assert abs(json.loads(out)["clip_score"] - independent_clip_score(world, images[1:], PROMPTS[1:])) < 1e-4
    code, out, err = evomerge_cli("score", "clip", "--images", tmp_path / "missing", "--prompts", world["prompts"],
                                  "--model-config", world["clip"])
    assert code == 2 and "not a folder" in err


# --- evolve end to end ---------------------------------------------------------------------------


def evolve_recipe(world: dict[str, Path]) -> dict:
    return {
        "name": "tiny-evosdxl", "modality": "sdxl", "grouping": "attn_other", "seed": 0,
        "models": [{"model": str(world[n]), "name": n} for n in ("base", "u1", "u2")],
        "merge": {"method": "linear", "search": {"weight": [0, 1]}, "granularity": "per_group"},
        "sdxl": sdxl_block(world, components={"text_encoder": str(world["je"]), "tokenizer": str(world["je"])}),
        "evaluator": {"kind": "clip_score", "prompts": str(world["prompts"]), "model_config": str(world["clip"]),
                      "checkpoint": str(world["clip_weights"]), "batch_size": 3, "seed": 7},
        "search": {"trials": 4, "popsize": 4},
    }


def test_evolve_generates_scores_and_exports(tmp_path: Path, world: dict[str, Path], evomerge_cli) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from PIL import Image

    recipe = write_recipe(tmp_path / "evo.yaml", evolve_recipe(world))
    evo = Evolution(recipe, run_dir=tmp_path / "run", device="cpu")
    assert len(evo.candidates.space) == 2 * 3  # (attn, other) x 3 sources
    pipe = evo.candidates.runnable()
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert not hasattr(pipe, "evomerge_sampling")  # the sampling settings travel as data
    assert evo.candidates.evaluator_settings["sampling"] == {"num_inference_steps": 4, "guidance_scale": 0.0,
                                                             "height": SEARCH, "width": SEARCH}
    assert evo.evaluator.recipe_sampling == evo.candidates.evaluator_settings
    outcome = evo.run(export_best=True, show_progress=False)
    assert outcome.best_value is not None and len(outcome.timings) == 4
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "trials").glob("*.json"))]
    assert len(records) == 4 and all("score" in r for r in records), records
    assert all(0 <= r["metrics"]["clip_score"] <= 100 for r in records)

    images = tmp_path / "run" / "images"
    with Image.open(images / "best.png") as grid:
        assert grid.format == "PNG" and grid.size == (2 * SEARCH, 2 * SEARCH)  # 4 prompts, 2x2
        assert len(set(grid.convert("L").tobytes())) > 10  # real pixels, not a blank canvas
    best_images = sorted((images / "best").glob("*.png"))
    assert len(best_images) == len(PROMPTS)

    # the best evaluation's images, re-scored by `evomerge score clip`, give the recorded score
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["score"] == json.loads((images / "best.json").read_text())["score"]
    code, out, err = evomerge_cli("score", "clip", "--images", images / "best", "--prompts", world["prompts"],
                                  "--model-config", world["clip"], "--checkpoint", world["clip_weights"],
                                  "--device", "cpu")
    assert code == 0, err
    assert abs(json.loads(out)["clip_score"] - best["metrics"]["clip_score"]) < 1e-4

    # the same values give the same images (fixed seed per prompt): the same score
    evaluator = evo.evaluator
    evo.candidates.apply(best["values"])
    assert abs(evaluator(pipe).score - best["score"]) < 1e-6

    # the exported pipeline: stock diffusers loads it and generates, with the named text encoder
    exported = tmp_path / "run" / "best"
    unet = UNet2DConditionModel.from_pretrained(exported / "unet")
    live = evo.candidates.session.adapter.parameters(pipe)
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, live[name].detach()), name
    loaded = StableDiffusionXLPipeline.from_pretrained(exported)
    je = load_file(world["je"] / "text_encoder" / "model.safetensors")
    te = load_file(exported / "text_encoder" / "model.safetensors")
    assert set(je) == set(te) and all(torch.equal(je[k], te[k]) for k in je)
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    image = loaded(prompt=PROMPTS[0], num_inference_steps=4, guidance_scale=0.0, height=FULL, width=FULL,
                   generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (FULL, FULL)
    assert "tiny-evosdxl" in (exported / "README.md").read_text()
    # the report shows the best trial's images, embedded in its page
    from evomerge.pipelines.report import write_report

    page = write_report(tmp_path / "run")["html"].read_text()
    assert "Images: best trial" in page and page.count("src='data:image/png;base64,") == 3


def test_full_resolution_and_reference_term(tmp_path: Path, world: dict[str, Path]) -> None:
    candidates = make_candidates(load_recipe(write_recipe(tmp_path / "r.yaml", evolve_recipe(world))))
    pipe = candidates.apply_baseline({"name": "u1", "source": "u1"})
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, im in enumerate(random_images(2, seed=3)):
        im.save(refs / f"{i}.png")
    spec = {"kind": "clip_score", "prompts": PROMPTS[:2], "model_config": str(world["clip"]), "resolution": "full",
            "references": [{"images": str(refs), "weight": 0.5}], "grid_dir": str(tmp_path / "grids")}
    result = load_evaluator(spec, settings=candidates.evaluator_settings)(pipe)
    m = result.metrics
    assert m["score"] == pytest.approx(m["clip_score"] + 0.5 * m["reference_0"])
    assert result.score == m["score"]
    from PIL import Image

    with Image.open(tmp_path / "grids" / "best" / "000.png") as im:
        assert im.size == (FULL, FULL)
    with pytest.raises(EvomergeError, match="SDXL pipeline"):
        load_evaluator(spec)(pipe.unet)


# --- inspect -------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["blocks", "attn_other", "blocks_attn_other"])
def test_inspect_tiny_unet_matches_adapter(world: dict[str, Path], evomerge_cli, grouping: str) -> None:
    code, out, err = evomerge_cli("inspect", world["pipeline"], "--json", "--grouping", grouping)
    assert code == 0, err
    groups = json.loads(out)["groups"]
    names = list(load_file(world["base"] / "diffusion_pytorch_model.safetensors"))
    adapter = SDXLAdapter(grouping)
    assert set(groups) == set(names)
    assert groups == {n: adapter.group(n) for n in names}
    code, out, err = evomerge_cli("inspect", world["u1"])
    assert code == 0 and "conv_in.weight" in out and "IN00" in out


def test_inspect_real_sdxl_structure(tmp_path: Path, evomerge_cli) -> None:
    """Every tensor name of the real SDXL UNet (built on the meta device), through inspect --json."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    folder = tmp_path / "sdxl_unet"
    folder.mkdir()
    names = list(unet.state_dict())
    # the names with placeholder tensors (inspect reads headers only)
    save_file({n: torch.zeros(1) for n in names}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **unet.config}))
    code, out, err = evomerge_cli("inspect", folder, "--json")
    assert code == 0, err
    groups = json.loads(out)["groups"]
    assert groups == {n: sgm_block(n) for n in names}
    code, out, err = evomerge_cli("inspect", folder, "--json", "--grouping", "blocks_attn_other")
    assert json.loads(out)["groups"] == {n: f"{sgm_block(n)}.{'attn' if is_attn(n) else 'other'}" for n in names}


def test_inspect_detects_modality(llama_fp32: dict[str, Path], evomerge_cli) -> None:
    code, out, err = evomerge_cli("inspect", llama_fp32["m1"], "--json")
    assert code == 0, err
    groups = json.loads(out)["groups"]
    assert groups["model.layers.1.mlp.down_proj.weight"] == "layers.1"


# --- recipe --------------------------------------------------------------------------------------


def test_evosdxl_recipe_loads() -> None:
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "evosdxl-jp.yaml")
    assert recipe.modality == "sdxl" and recipe.grouping == "attn_other"
    assert [m.label for m in recipe.models] == ["sdxl", "dpo", "juggernaut", "jsdxl"]
    assert recipe.sdxl.lora is not None and recipe.sdxl.lora.into == "merged"
    assert recipe.sdxl.components["text_encoder"] == "stabilityai/japanese-stable-diffusion-xl"
    assert recipe.evaluator["kind"] == "clip_score"
    prompts = (Path(__file__).parent.parent / recipe.evaluator["prompts"]).read_text(encoding="utf-8").splitlines()
    assert len([p for p in prompts if p and not p.startswith("#")]) >= 20


def test_evosdxl_plan_offline(tmp_path: Path) -> None:
    """`evomerge plan` on the shipped recipe, its Hub ids swapped for a folder with the real SDXL
    UNet config (plan builds on the meta device: no weights)."""
    from evomerge.pipelines.plan import make_plan

    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                            **sdxl_unet_config()}))
    data = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "evosdxl-jp.yaml").read_text(encoding="utf-8"))
    for m in data["models"]:
        m["model"] = str(folder)
    plan = make_plan(load_recipe(write_recipe(tmp_path / "r.yaml", data))).as_dict()
    assert plan["parameters"] == plan["merged_parameters"] == 2_567_463_684
    assert (plan["searched_values"], plan["groups"], plan["popsize"], plan["generations"]) == (8, 2, 10, 20)
    assert plan["resident_model_gb"] == pytest.approx(4.78, abs=0.01)
