"""Build the mini-world once (a base and two specialists) and reuse it from a cache.

    <cache>/<version>/seed<k>/
        base/ japanese/ math/     ordinary Hugging Face model folders (config, safetensors, tokenizer)
        data/{search,test,dev}.jsonl
        manifest.json             what was built and the numbers measured on the dev split

The recipe that worked in the feasibility study (issue 4):

- base: pretraining on 50% sums (answered in Japanese 40% of the time) and 50% filler at lr 2e-3;
  the carry skill jumps sharply with the seed, so the base checkpoint is *chosen by measured carry
  accuracy* on the dev split: the first probe inside a target band (default 20-50%);
- A ("japanese"): a small fine-tune on filler and no-carry sums, always answered in Japanese;
- B ("math"): a small fine-tune on carry-heavy sums, answered in English;
- task vectors stay small (about 1-3% of the weight norm), so merges compose instead of
  destroying both skills.

Neither the search nor the test split is ever trained on or used here.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.atomic import swap_in
from evomerge.miniworld import VERSION
from evomerge.miniworld.tasks import (
    PROMPT,
    base_sampler,
    japanese_sampler,
    make_world,
    math_sampler,
    write_splits,
)
from evomerge.miniworld.tokenizer import build_tokenizer
from evomerge.miniworld.train import CharCodec, delta_ratio, new_model, new_optimizer, score, train

MODELS = ("base", "japanese", "math")


@dataclass
class BuildConfig:
    """How the world is trained (the defaults are the demo's)."""

    base_max_steps: int = 3000
    base_lr: float = 1e-3
    base_warmup: int = 100
    probe_every: int = 100
    band: tuple[float, float] = (0.2, 0.5)  # carry accuracy wanted of the base, on the dev split
    max_refinements: int = 3
    ja_steps: int = 150
    ja_lr: float = 5e-5
    math_steps: int = 200
    math_lr: float = 5e-5
    batch_size: int = 64
    threads: int | None = None  # torch threads while training (None: leave as is)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "miniworld"


def world_dir(seed: int, cache_dir: str | Path | None = None, version: str = VERSION) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / version / f"seed{seed}"


def load_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if all((folder / m / "config.json").exists() for m in MODELS):
        return manifest
    return None


def _save(model: torch.nn.Module, tokenizer, folder: Path) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def build_world(seed: int = 0, cache_dir: str | Path | None = None, *, config: BuildConfig | None = None,
                force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build (or load from the cache) the mini-world of ``seed``; returns its manifest, whose
    ``paths`` name the model folders and data files."""
    folder = world_dir(seed, cache_dir)
    if not force:
        manifest = load_manifest(folder)
        if manifest is not None:
            manifest["cached"] = True
            return manifest
    config = config or BuildConfig()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        manifest = _build(seed, folder, config, log)
    finally:
        torch.set_num_threads(threads)
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    manifest["cached"] = False
    return manifest


def _build(seed: int, folder: Path, config: BuildConfig, log: Callable[[str], None]) -> dict:
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    world = make_world(seed)
    write_splits(world, tmp / "data")
    dev = world.problems("dev")
    tokenizer = build_tokenizer()
    codec = CharCodec(tokenizer)
    t0 = time.perf_counter()

    # -- base: probe the carry accuracy on dev, keep the first checkpoint inside the band -----
    # The carry skill jumps within a few dozen steps; when a probe overshoots the band, training
    # goes back to the last probe below it and goes on at a quarter of the rate, probing 4x as often.
    lo, hi = config.band
    log(f"mini-world seed {seed}: training the base (target dev carry accuracy {lo:.0%}-{hi:.0%})")
    model = new_model(tokenizer, seed)
    rng = random.Random(seed)
    lr, every, step = config.base_lr, config.probe_every, 0
    optimizer = new_optimizer(model, lr)
    probes: list[dict] = []
    last = (0, copy.deepcopy(model.state_dict()), rng.getstate())
    chosen = None
    refinements = 0
    while step < config.base_max_steps:
        train(model, codec, base_sampler(world), steps=every, lr=lr, warmup=config.base_warmup,
              batch_size=config.batch_size, seed=seed, optimizer=optimizer, rng=rng, start_step=step)
        step += every
        metrics = score(model, codec, dev, PROMPT)
        probes.append({"step": step, "lr": lr, **metrics})
        log(f"  base step {step}: dev carry accuracy {metrics['accuracy']:.3f} "
            f"(Japanese-counted {metrics['accuracy_ja']:.3f}) [{time.perf_counter() - t0:.0f}s]")
        if lo <= metrics["accuracy"] <= hi:
            chosen = (step, metrics)
            break
        if metrics["accuracy"] > hi:
            if refinements >= config.max_refinements:
                chosen = (step, metrics)
                break
            refinements += 1
            step, state, rng_state = last
            model.load_state_dict(state)
            rng.setstate(rng_state)
            lr, every = lr / 4, max(every // 4, 5)
            optimizer = new_optimizer(model, lr)
            log(f"  overshot the band: back to step {step}, lr {lr:g}, probing every {every} steps")
            continue
        last = (step, copy.deepcopy(model.state_dict()), rng.getstate())
    if chosen is None:  # never reached the band: keep the last model
        chosen = (step, probes[-1] if probes else score(model, codec, dev, PROMPT))
    step, base_metrics = chosen
    model.eval()
    base_seconds = time.perf_counter() - t0
    manifest: dict = {
        "version": VERSION, "seed": seed, "config": asdict(config),
        "params": sum(p.numel() for p in model.parameters()),
        "paths": {"base": _save(model, tokenizer, tmp / "base")},
        "models": {"base": {"step": step, "dev": base_metrics,
                            "in_band": bool(lo <= base_metrics["accuracy"] <= hi),
                            "seconds": round(base_seconds, 1), "probes": probes}},
    }

    build_specialists(model, world, codec, tokenizer, config, tmp, manifest, log)

    # -- move into place -------------------------------------------------------------------------
    swap_in(tmp, folder)  # a cached world stays whole until the new one replaces it
    manifest["paths"] = {k: str(folder / k) for k in MODELS}
    manifest["data"] = {s: str(folder / "data" / f"{s}.jsonl") for s in world.splits}
    return manifest


def build_specialists(model: torch.nn.Module, world, codec: CharCodec, tokenizer, config: BuildConfig,
                      folder: Path, manifest: dict, log: Callable[[str], None] = print) -> None:
    """The two specialists: small fine-tunes of the chosen ``model``, saved under ``folder``
    and recorded in ``manifest``."""
    dev = world.problems("dev")
    seed = world.seed
    for name, draw, steps, lr in (("japanese", japanese_sampler(world), config.ja_steps, config.ja_lr),
                                  ("math", math_sampler(world), config.math_steps, config.math_lr)):
        t1 = time.perf_counter()
        tuned = copy.deepcopy(model)
        train(tuned, codec, draw, steps=steps, lr=lr, batch_size=config.batch_size, seed=seed * 1000 + steps)
        metrics = score(tuned, codec, dev, PROMPT)
        ratio = delta_ratio(tuned, model)
        log(f"  {name}: {steps} steps at lr {lr:g}: dev accuracy {metrics['accuracy']:.3f}, "
            f"Japanese-counted {metrics['accuracy_ja']:.3f}, Japanese responses {metrics['ja_share']:.0%}, "
            f"task vector {ratio:.1%} of the weight norm")
        manifest["paths"][name] = _save(tuned, tokenizer, folder / name)
        manifest["models"][name] = {"steps": steps, "lr": lr, "dev": metrics, "delta_ratio": ratio,
                                    "seconds": round(time.perf_counter() - t1, 1)}
