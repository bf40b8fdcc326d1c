"""CLIP score of generated images: how well a text-to-image pipeline follows (Japanese) prompts.

The score follows torchmetrics' convention: for each (image, prompt) pair
``100 * max(cos(image embedding, text embedding), 0)``, averaged over the prompts. Embeddings come
from an open_clip model: a name and pretrained tag (``xlm-roberta-base-ViT-B-32`` +
``laion5b_s13b_b90k`` reads Japanese), an ``hf-hub:`` id (``hf-hub:llm-jp/llm-jp-clip-vit-base-patch16``),
or a local model config JSON (+ optional checkpoint) registered with ``open_clip.add_model_config``.

The pure functions work on their own, e.g. to score saved images (``evomerge score clip``)::

    clip = load_clip("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k")
    scores = clip_scores(clip, images, prompts)      # one 100*max(cos, 0) per pair
    print(sum(scores) / len(scores))

:class:`ClipScoreEvaluator` generates one image per prompt with the runnable SDXL pipeline (the
recipe's scheduler; steps, guidance and search resolution as the SDXL adapter's settings, handed
to the evaluator as data), a fixed seed per prompt (a ``torch.Generator`` each, so an image does
not depend on batching and trials are comparable), batched prompts; scores it, optionally adds
weighted extra terms (similarity to reference images), and saves an image grid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError, describe
from evomerge.evaluators.base import Result, ScoresItems

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ClipModel:
    """An open_clip model with its image preprocessing and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    name: str


def load_clip(model: str | None = None, pretrained: str | None = None, *, model_config: str | Path | None = None,
              checkpoint: str | Path | None = None, device: str = "cpu", allow_pickle: bool = False) -> ClipModel:
    """An open_clip model: ``model`` + ``pretrained`` tag, an ``hf-hub:`` id, or a local
    ``model_config`` JSON (its file stem is the model name) with an optional ``checkpoint``.
    Local weight files must be safetensors unless ``allow_pickle``."""
    import open_clip

    if model_config is not None:
        path = Path(model_config)
        if not path.is_file():
            raise EvomergeError(f"clip model_config {str(path)!r}: no such file")
        open_clip.add_model_config(path)
        model = model or path.stem
    if not model:
        raise EvomergeError("clip: give a model (open_clip name or hf-hub: id) or a model_config")
    if model.startswith("hf-hub:"):  # the Hub repo holds its weights: no pretrained tag
        pretrained = None
    weights = str(checkpoint) if checkpoint is not None else pretrained
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise EvomergeError(f"clip checkpoint {str(checkpoint)!r}: no such file")
    if weights and Path(weights).is_file() and Path(weights).suffix != ".safetensors" and not allow_pickle:
        raise EvomergeError(f"clip checkpoint {weights!r}: a pickle file; pickles can run code when loaded. "
                            "Convert it to safetensors, or pass --allow-pickle if you trust it")
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights or None, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as e:
        raise EvomergeError(f"clip model {model!r} ({weights or 'random weights'}): cannot load "
                            f"({describe(e)})") from None
    net.eval()
    return ClipModel(net, preprocess, tokenizer, device, model)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def image_embeddings(clip: ClipModel, images: list[Any], batch_size: int = 16) -> torch.Tensor:
    """Unit-length image embeddings (N, D) of PIL images."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([clip.preprocess(im.convert("RGB")) for im in images[i:i + batch_size]])
        out.append(_normalized(clip.model.encode_image(batch.to(clip.device))))
    return torch.cat(out).cpu()


@torch.no_grad()
def text_embeddings(clip: ClipModel, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length text embeddings (N, D)."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(texts[i:i + batch_size])
        out.append(_normalized(clip.model.encode_text(tokens.to(clip.device))))
    return torch.cat(out).cpu()


def clip_score_values(image_emb: torch.Tensor, text_emb: torch.Tensor) -> list[float]:
    """``100 * max(cos, 0)`` of each row pair (embeddings need not be normalised)."""
    cos = (_normalized(image_emb) * _normalized(text_emb)).sum(-1)
    return (100 * cos.clamp_min(0)).tolist()


def clip_scores(clip: ClipModel, images: list[Any], texts: list[str]) -> list[float]:
    """CLIP score of each (image, text) pair."""
    if len(images) != len(texts):
        raise EvomergeError(f"clip score: {len(images)} images but {len(texts)} prompts")
    return clip_score_values(image_embeddings(clip, images), text_embeddings(clip, texts))


def reference_similarity(image_emb: torch.Tensor, reference_emb: torch.Tensor) -> list[float]:
    """``100 * max(cos, 0)`` of each image to the mean direction of the reference images."""
    centre = _normalized(_normalized(reference_emb).mean(0, keepdim=True))
    return clip_score_values(image_emb, centre.expand_as(image_emb))


# -- files ---------------------------------------------------------------------------------------


def read_prompts(source: str | Path | list[str]) -> list[str]:
    """Prompts from a list, or a text file with one prompt per line (blank lines and lines
    starting with ``#`` skipped)."""
    if isinstance(source, list):
        prompts = [str(p) for p in source]
    else:
        path = Path(source)
        if not path.is_file():
            raise EvomergeError(f"prompts {str(path)!r}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise EvomergeError(f"prompts {source!r}: empty")
    return prompts


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def match_images(folder: str | Path, prompts: list[str]) -> list[tuple[Path, int]]:
    """(image, prompt index) pairs: images in natural sorted order against the prompts when the
    counts agree; otherwise by the number ending each file name (0-based prompt index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvomergeError(f"images {str(folder)!r}: not a folder")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise EvomergeError(f"images {str(folder)!r}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) == len(prompts):
        return [(p, i) for i, p in enumerate(files)]
    pairs = []
    for p in files:
        m = re.search(r"(\d+)$", p.stem)
        if m is None or int(m.group(1)) >= len(prompts):
            raise EvomergeError(f"images: {len(files)} images for {len(prompts)} prompts, and {p.name} does not "
                                "end in a prompt index (0-based); name images 000.png, 001.png... or give one per prompt")
        pairs.append((p, int(m.group(1))))
    return pairs


def score_folder(images: str | Path, prompts: str | Path | list[str], clip: ClipModel) -> dict:
    """``{"clip_score": mean, "n": pairs}`` of the images in a folder against their prompts."""
    from PIL import Image

    texts = read_prompts(prompts)
    pairs = match_images(images, texts)
    loaded = []
    for path, _ in pairs:
        with Image.open(path) as im:
            loaded.append(im.convert("RGB"))
    values = clip_scores(clip, loaded, [texts[i] for _, i in pairs])
    return {"clip_score": sum(values) / len(values), "n": len(values)}


def image_grid(images: list[Any], *, columns: int | None = None, cell: int | None = 256) -> Any:
    """One PIL image with ``images`` tiled row by row (cells resized to ``cell`` px on the long side)."""
    from PIL import Image

    if not images:
        raise EvomergeError("image grid: no images")
    if cell:
        images = [im.copy() for im in images]
        for im in images:
            im.thumbnail((cell, cell))
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    cols = columns or min(len(images), max(1, round(len(images) ** 0.5 + 0.49)))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    return grid


# -- generation ----------------------------------------------------------------------------------


def generate_images(pipe: Any, prompts: list[str], *, seed: int = 0, batch_size: int = 4,
                    sampling: dict[str, Any] | None = None, numbers: list[int] | None = None) -> list[Any]:
    """One image per prompt; prompt ``i`` always uses seed ``seed + i`` (its own CPU generator),
    so the same weights give the same image whatever the batching. ``numbers`` give the
    prompts' places in a longer list (a subset keeps the seeds of the whole)."""
    kwargs = dict(sampling or {})
    numbers = list(range(len(prompts))) if numbers is None else numbers
    images: list[Any] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in numbers[start:start + batch_size]]
        with torch.no_grad():
            out = pipe(prompt=batch, generator=generators, output_type="pil", **kwargs)
        images.extend(out.images)
    return images


SAMPLING_KEYS = {"steps": "num_inference_steps", "guidance_scale": "guidance_scale", "height": "height",
                 "width": "width"}


class ClipScoreEvaluator(ScoresItems):
    """CLIP score of a text-to-image pipeline on a prompt list.

    Spec keys:

    - ``prompts``: a text file (one prompt per line) or a list; ``limit`` keeps the first N.
    - ``model`` + ``pretrained``, or ``model: hf-hub:...``, or ``model_config`` (+ ``checkpoint``):
      the open_clip model (see :func:`load_clip`); ``device`` (default: the pipeline's).
    - ``seed`` (0): prompt ``i`` uses seed ``seed + i``; ``batch_size`` (4) prompts per call.
    - ``steps``, ``guidance_scale``, ``height``, ``width``: override the recipe's sdxl sampling;
      ``resolution: full`` samples at the recipe's full size instead of the search size.
    - ``weight`` (1.0) of the CLIP score, and ``references``: extra terms
      ``[{images: DIR, weight: w}]`` adding ``w * mean 100*max(cos(image, mean reference), 0)``.
    - ``grid_dir``: where image grids go (default: ``RUN/images`` under evolve); ``save: best``
      (default: ``best.png`` and its images whenever the score improves, plus ``latest.png``),
      ``all`` (also ``eval-NNNNN.png`` for every evaluation) or ``none``; ``grid_cell`` (256) px.
    """

    name = "clip_score"

    def __init__(self, spec: dict, tokenizer_source: str | Path | None = None, *,
                 settings: dict[str, Any] | None = None):
        """``settings``: the SDXL adapter's pipeline(...) arguments, ``sampling`` (search size)
        and ``final_sampling`` (full size), which the spec's own keys override."""
        self.spec = dict(spec)
        self.recipe_sampling = {k: dict((settings or {}).get(k) or {}) for k in ("sampling", "final_sampling")}
        self.prompts = read_prompts(spec.get("prompts") or [])
        if spec.get("limit"):
            self.prompts = self.prompts[: int(spec["limit"])]
        self.seed = int(spec.get("seed", 0))
        self.batch_size = int(spec.get("batch_size", 4))
        if self.batch_size < 1:
            raise EvomergeError("evaluator clip_score: batch_size must be >= 1")
        self.sampling = {SAMPLING_KEYS[k]: spec[k] for k in SAMPLING_KEYS if k in spec}
        self.full_resolution = spec.get("resolution", "search") == "full"
        self.weight = float(spec.get("weight", 1.0))
        self.save = spec.get("save", "best")
        if self.save not in ("best", "all", "none"):
            raise EvomergeError(f"evaluator clip_score: save {self.save!r}: use best, all or none")
        self.cell = int(spec.get("grid_cell", 256))
        self.grid_dir: Path | None = Path(spec["grid_dir"]) if spec.get("grid_dir") else None
        self.device = spec.get("device")
        self._clip: ClipModel | None = None
        self._references: list[tuple[float, torch.Tensor]] | None = None
        self.best: float | None = None
        self.calls = 0

    def set_run_dir(self, run_dir: Path) -> None:
        """Evolve's run folder: grids go to RUN/images unless the spec names a folder."""
        if self.grid_dir is None:
            self.grid_dir = Path(run_dir) / "images"
        state = self.grid_dir / "best.json"
        if state.exists():  # a resumed run keeps its best
            self.best = json.loads(state.read_text()).get("score")

    def clip(self, device: str) -> ClipModel:
        if self._clip is None:
            s = self.spec
            self._clip = load_clip(s.get("model"), s.get("pretrained"), model_config=s.get("model_config"),
                                   checkpoint=s.get("checkpoint"), device=self.device or device)
        return self._clip

    def references(self, clip: ClipModel) -> list[tuple[float, torch.Tensor]]:
        if self._references is None:
            from PIL import Image

            self._references = []
            for ref in self.spec.get("references") or []:
                if not isinstance(ref, dict) or "images" not in ref:
                    raise EvomergeError("evaluator clip_score: references: give [{images: DIR, weight: w}]")
                folder = Path(ref["images"])
                files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                if not files:
                    raise EvomergeError(f"evaluator clip_score: references {str(folder)!r}: no images")
                ims = []
                for p in files:
                    with Image.open(p) as im:
                        ims.append(im.convert("RGB"))
                self._references.append((float(ref.get("weight", 1.0)), image_embeddings(clip, ims)))
        return self._references

    @property
    def n_items(self) -> int:
        return len(self.prompts)

    def score_items(self, runnable: Any, indices: Iterable[int]) -> Result:
        """Sample and score the prompts at ``indices`` only (racing, estimated fitness); grids
        are saved for whole-list evaluations only, so ``best.png`` compares like with like."""
        indices = list(indices)
        prompts = [self.prompts[i] for i in indices]
        if not hasattr(runnable, "unet") or not callable(runnable):
            raise EvomergeError("evaluator clip_score: needs an SDXL pipeline to sample from; set sdxl.pipeline "
                                "in the recipe (what completes the UNet)")
        sampling = {**self.recipe_sampling["final_sampling" if self.full_resolution else "sampling"],
                    **self.sampling}
        images = generate_images(runnable, prompts, seed=self.seed, batch_size=self.batch_size,
                                 sampling=sampling, numbers=indices)
        device = str(getattr(runnable, "device", "cpu"))
        clip = self.clip(device)
        image_emb = image_embeddings(clip, images)
        per_prompt = clip_score_values(image_emb, text_embeddings(clip, prompts))
        clip_score = sum(per_prompt) / len(per_prompt)
        metrics = {"clip_score": clip_score, "n": float(len(per_prompt))}
        values = [self.weight * v for v in per_prompt]  # each prompt's share of the score
        for k, (weight, ref_emb) in enumerate(self.references(clip)):
            similarity = reference_similarity(image_emb, ref_emb)
            metrics[f"reference_{k}"] = sum(similarity) / len(images)
            values = [v + weight * r for v, r in zip(values, similarity, strict=True)]
        score = sum(values) / len(values)
        metrics["score"] = score
        grid = self._save(images, score) if len(indices) == self.n_items else None
        items = [{"prompt": p, "seed": self.seed + i, "clip_score": v, "output": grid or "", "correct": None}
                 for i, p, v in zip(indices, prompts, per_prompt, strict=True)]
        return Result(score=score, metrics=metrics, items=items, values=values)

    def _save(self, images: list[Any], score: float) -> str | None:
        """Write the grids; returns the path of this evaluation's grid (or None)."""
        self.calls += 1
        if self.grid_dir is None or self.save == "none":
            return None
        self.grid_dir.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images, cell=self.cell)
        grid.save(self.grid_dir / "latest.png")
        path = self.grid_dir / "latest.png"
        if self.save == "all":
            path = self.grid_dir / f"eval-{self.calls:05d}.png"
            grid.save(path)
        if self.best is None or score > self.best:
            self.best = score
            grid.save(self.grid_dir / "best.png")
            best_images = self.grid_dir / "best"
            best_images.mkdir(exist_ok=True)
            for i, im in enumerate(images):
                im.save(best_images / f"{i:03d}.png")
            (self.grid_dir / "best.json").write_text(json.dumps(
                {"score": score, "evaluation": self.calls, "prompts": self.prompts}, ensure_ascii=False, indent=1))
            if self.save == "best":
                path = self.grid_dir / "best.png"
        return str(path)
