"""Tiny models of the real architectures, built from configs in code (no downloads)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    str(d) for d in range(10)] + list("+=?: ") + list("たすはこえでしてす。")


def tiny_tokenizer(extra_special: list[str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": extra_special})
    return fast


def llama_config(arch: str = "llama", vocab: int = 64, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if arch == "mistral" else LlamaConfig
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A 'fine-tune' of ``model``: the same weights plus small seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model


def make_llm_family(root: Path, *, arch: str = "llama", n: int = 3, dtype=torch.float32,
                    layers: int = 2, vocab: int = 64, seed: int = 0) -> dict[str, Path]:
    """A base and ``n`` perturbed variants saved as model folders with a tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = llama_config(arch, vocab=vocab, layers=layers)
    base = AutoModelForCausalLM.from_config(config).to(dtype)
    tok = tiny_tokenizer()
    paths = {}
    for i, name in enumerate(["base"] + [f"m{j}" for j in range(1, n + 1)]):
        model = base if i == 0 else perturbed(copy.deepcopy(base), seed * 100 + i)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


# --- vision-language (LLaVA / LLaVA-NeXT) ----------------------------------------------------

VLM_TEXT_VOCAB = 64  # the text LLMs' vocabulary; the VLM has VLM_EXTRA more rows
VLM_EXTRA = 8
VLM_IMAGE_SIZE = 32
VLM_PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def vlm_tokenizer():
    """The tiny tokenizer padded to the text vocabulary, then ``<image>`` (first extra row)."""
    tok = tiny_tokenizer()
    fillers = [f"<unused{i}>" for i in range(VLM_TEXT_VOCAB - len(tok))]
    if fillers:
        tok.add_special_tokens({"additional_special_tokens": fillers})
    tok.add_special_tokens({"additional_special_tokens": fillers + ["<image>"]})
    return tok


def _rename_legacy_to_current(name: str) -> str:
    for old, new in (("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("image_newline", "model.image_newline")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _rename_current_to_legacy(name: str) -> str:
    for old, new in (("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def rewrite_vlm_layout(folder: Path, layout: str) -> None:
    """Re-save a VLM folder's weights with ``legacy`` or ``current`` key names."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    rename = _rename_legacy_to_current if layout == "current" else _rename_current_to_legacy
    save_file({rename(k): v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def make_vlm_family(root: Path, *, kind: str = "llava", layout: str = "legacy",
                    seed: int = 0) -> dict[str, Path]:
    """A base Mistral, a text fine-tune of it and a LLaVA(-NeXT) whose LM is another fine-tune.

    The VLM's language model has ``VLM_EXTRA`` extra vocabulary rows (``<image>`` first);
    ``layout`` picks the key names written on disk for the VLM (legacy or current).
    """
    from transformers import (
        AutoModelForCausalLM,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tok = vlm_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    base = AutoModelForCausalLM.from_config(llama_config("mistral", vocab=VLM_TEXT_VOCAB))
    text = perturbed(copy.deepcopy(base), seed * 100 + 1)
    text_config = llama_config("mistral", vocab=VLM_TEXT_VOCAB + VLM_EXTRA)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=VLM_IMAGE_SIZE, patch_size=8,
                              projection_dim=16)
    common = dict(vision_config=vision, text_config=text_config, image_token_id=image_id,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if kind == "llava":
        vlm = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": VLM_IMAGE_SIZE}, crop_size={"height": VLM_IMAGE_SIZE, "width": VLM_IMAGE_SIZE})
        processor_cls = LlavaProcessor
    else:
        vlm = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=VLM_PINPOINTS))
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": VLM_IMAGE_SIZE}, crop_size={"height": VLM_IMAGE_SIZE, "width": VLM_IMAGE_SIZE},
            image_grid_pinpoints=VLM_PINPOINTS)
        processor_cls = LlavaNextProcessor
    # The VLM's language model: the base (shared rows) plus its own noise; extra rows random.
    lm = vlm.model.language_model
    with torch.no_grad():
        for name, p in base.model.state_dict().items():
            target = lm.state_dict()[name]
            target[: p.shape[0]].copy_(p) if name == "embed_tokens.weight" else target.copy_(p)
        vlm.lm_head.weight[:VLM_TEXT_VOCAB].copy_(base.lm_head.weight)
    perturbed(lm, seed * 100 + 2)
    perturbed(vlm.lm_head, seed * 100 + 3)
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    paths = {"base": root / "base", "text": root / "text", "vlm": root / kind}
    for name, model in (("base", base), ("text", text)):
        model.save_pretrained(paths[name])
        tiny_tokenizer().save_pretrained(paths[name])
    vlm.save_pretrained(paths["vlm"])
    processor.save_pretrained(paths["vlm"])
    rewrite_vlm_layout(paths["vlm"], layout)
    return paths


# --- SDXL-shaped UNets -------------------------------------------------------------------------

SDXL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
SDXL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]


def sdxl_unet_config() -> dict:
    """The real SDXL base UNet configuration (stabilityai/stable-diffusion-xl-base-1.0)."""
    return dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280],
                down_block_types=SDXL_DOWN, up_block_types=SDXL_UP, transformer_layers_per_block=[1, 2, 10],
                cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, layers_per_block=2)


TINY_TEXT_EMBEDS = 16
TINY_TIME_DIM = 8


def tiny_sdxl_unet_config() -> dict:
    """An SDXL-shaped UNet (same block types and embeddings) with tiny widths."""
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32, 32],
                down_block_types=SDXL_DOWN, up_block_types=SDXL_UP, transformer_layers_per_block=[1, 1, 1],
                cross_attention_dim=32, attention_head_dim=[2, 4, 4], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_DIM,
                projection_class_embeddings_input_dim=TINY_TIME_DIM * 6 + TINY_TEXT_EMBEDS,
                layers_per_block=2, norm_num_groups=8)


def make_sdxl_family(root: Path, *, n: int = 3, seed: int = 0,
                     pipeline_style: tuple[str, ...] = ()) -> dict[str, Path]:
    """A tiny SDXL-shaped UNet and ``n`` perturbed variants. Names in ``pipeline_style`` are saved
    as a pipeline folder (``unet/`` + model_index.json); the others as plain UNet folders."""
    import json

    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    base = UNet2DConditionModel(**tiny_sdxl_unet_config())
    paths = {}
    for i, name in enumerate(["base"] + [f"u{j}" for j in range(1, n + 1)]):
        model = base if i == 0 else perturbed(copy.deepcopy(base), seed * 100 + i)
        if name in pipeline_style:
            model.save_pretrained(root / name / "unet")
            (root / name / "model_index.json").write_text(json.dumps(
                {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
        else:
            model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


# --- tiny SDXL pipelines and CLIP models ----------------------------------------------------------

TINY_TE1_WIDTH = 12  # text_encoder (CLIPTextModel); + text_encoder_2's width = cross_attention_dim
TINY_TE2_WIDTH = 20
TINY_CLIP_VOCAB = 512 + 2  # byte-level characters (alone and word-final) + bos/eos


def tiny_clip_tokenizer(folder: Path):
    """A CLIPTokenizer from a vocab.json/merges.txt written here: every byte character, alone and
    word-final, so any text (Japanese included) tokenizes; a few merges."""
    import json

    from transformers import CLIPTokenizer

    # GPT-2's byte -> printable character table
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = ["#version: 0.2", "a t</w>", "t h", "i n"]
    for m in merges[1:]:
        vocab["".join(m.split())] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def make_sdxl_pipeline(root: Path, unet_folder: Path, *, seed: int = 0) -> Path:
    """A complete tiny StableDiffusionXLPipeline folder around a tiny UNet folder: tiny VAE,
    CLIPTextModel + CLIPTextModelWithProjection of different widths, two CLIPTokenizers, Euler."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(root / "_tok")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=TINY_TE1_WIDTH, intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       max_position_embeddings=77, **ids))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TINY_TE2_WIDTH, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=TINY_TEXT_EMBEDS, **ids))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def make_text_encoder_source(root: Path, *, seed: int = 1) -> Path:
    """A pipeline-shaped folder holding only another text_encoder (a 'Japanese' encoder)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(root / "je" / "tokenizer")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=TINY_TE1_WIDTH, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.eos_token_id))
    te.save_pretrained(root / "je" / "text_encoder")
    tok.save_pretrained(root / "je" / "tokenizer")
    (root / "je" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return root / "je"


def make_unet_lora(unet_folder: Path, out: Path, *, rank: int = 4, alpha: int = 8, seed: int = 5,
                   targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """A random LoRA for a tiny UNet made with peft and saved with diffusers' save_lora_weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                                unet_lora_adapter_metadata=config.to_dict())
    return out


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_open_clip(root: Path, name: str = "evomerge-tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip model (SimpleTokenizer): its config saved as NAME.json and random weights
    saved as NAME.safetensors; returns (config, checkpoint)."""
    import json

    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / f"{name}.safetensors")
    return path, root / f"{name}.safetensors"


RESNET_TO_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_name_to_sgm(name: str, has_attention: set[int]) -> str:
    """A diffusers SDXL UNet tensor name in the original (sgm) single-file layout, written out
    rule by rule from the block mapping; ``has_attention`` lists the up_blocks with attentions."""
    p = name.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([RESNET_TO_SGM[rest[0]], *rest[1:]])

    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head = ".".join(p[:2]) if p[0] in ("time_embedding", "add_embedding") else p[0]
    if head in fixed:
        out = ".".join([fixed[head], *p[len(head.split(".")):]])
    elif p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), p[3:]
        out = f"middle_block.{1 if kind == 'attentions' else 2 * j}." + (resnet(rest) if kind == "resnets" else ".".join(rest))
    elif p[0] == "down_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "downsamplers":
            out = f"input_blocks.{3 * i + 3}.0.op." + ".".join(rest[1:])
        else:
            out = f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}." + (
                resnet(rest) if kind == "resnets" else ".".join(rest))
    else:  # up_blocks
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "upsamplers":
            out = f"output_blocks.{3 * i + 2}.{2 if i in has_attention else 1}.conv." + ".".join(rest[1:])
        else:
            out = f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}." + (
                resnet(rest) if kind == "resnets" else ".".join(rest))
    return "model.diffusion_model." + out


def save_single_file(unet_folder: Path, path: Path) -> Path:
    """A diffusers UNet folder re-saved as an original-layout single-file SDXL checkpoint."""
    from safetensors.torch import load_file, save_file

    state = load_file(unet_folder / "diffusion_pytorch_model.safetensors")
    with_attention = {int(n.split(".")[1]) for n in state if n.startswith("up_blocks.") and ".attentions." in n}
    save_file({unet_name_to_sgm(n, with_attention): t.contiguous() for n, t in state.items()}, path)
    return path
