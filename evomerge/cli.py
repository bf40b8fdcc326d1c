"""The ``evomerge`` command. Thin: parse, call a pipeline, print. Input errors exit with 2.

One file over 400 lines on purpose: it is only the subcommands' option declarations (typer
reads them from the signatures), kept side by side so shared flags read the same everywhere;
the work of each command lives in ``evomerge.pipelines``.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
import yaml

from evomerge.errors import EvomergeError
from evomerge.hub import require_hub

# plain click help: flags read --force/--no-force, and logs get no box drawing
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Breed models by merging: evolutionary search over merge recipes.")
recipe_app = typer.Typer(no_args_is_help=True, help="Work with recipes.")
app.add_typer(recipe_app, name="recipe")

Device = Annotated[str, typer.Option(help="where merges run: cpu, cuda, cuda:1 (default: cuda if available)")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle/--no-allow-pickle", help="load .bin/.pt pickle checkpoints (can run code)")]
PushToHub = Annotated[str | None, typer.Option(
    metavar="repo", help="then upload the folder to this Hub model repo (owner/name; HF_TOKEN)")]
TrustCode = Annotated[bool, typer.Option("--trust-remote-code/--no-trust-remote-code", help="allow model code from the Hub")]
AllowNonfinite = Annotated[bool, typer.Option("--allow-nonfinite/--no-allow-nonfinite", help="merge sources holding NaN/inf values")]


class Sampler(str, Enum):
    """The search's sampler (a recipe's search.sampler)."""

    cmaes = "cmaes"
    random = "random"
    tpe = "tpe"


class TieOrder(str, Enum):
    """How TIES breaks magnitude ties at the top-k threshold."""

    index = "index"
    mergekit = "mergekit"


def resolve_device(device: str) -> str:
    """``--device`` checked against this machine (default: cuda when there is a GPU, else cpu)."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise EvomergeError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise EvomergeError(f"--device {device}: no such CUDA GPU here ({torch.cuda.device_count()} visible); "
                            "use --device cpu or another index")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise EvomergeError(f"--device {device}: MPS is not available here; use --device cpu")
    return device


def recipe_and_values(path: Path):
    """A recipe file (its fixed values), or a run folder (its recipe and best values)."""
    from evomerge.recipe import load_recipe

    if path.is_dir():
        from evomerge.pipelines.evolve import best_values

        return load_recipe(path / "recipe.yaml"), best_values(path)
    return load_recipe(recipe_file(path)), {}


def recipe_file(path: Path) -> Path:
    from evomerge.shipped import recipe_file as shipped_or_given

    return shipped_or_given(path)


def parse_size(text: str) -> int:
    """mergekit's sizes: a number with an optional K, M or B (thousand, million, billion) suffix."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use a number of bytes, e.g. 5B, 500M or 2000000") from None
    if value < 1:
        raise typer.BadParameter(f"{text!r}: the shard size must be positive")
    return int(value)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="evomerge recipe, mergekit YAML or run folder")],
    out_path: Annotated[Path | None, typer.Argument(metavar="[OUT]", help="output folder (or --out)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder")] = None,
    force: Annotated[bool, typer.Option("--force/--no-force", help="replace a non-empty output folder")] = False,
    device: Device = "",
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
    push_to_hub: PushToHub = None,
    allow_nonfinite: AllowNonfinite = False,
    tie_order: Annotated[TieOrder | None, typer.Option(
        "--tie-order", help="TIES magnitude ties at the top-k threshold: lowest index first "
        "(index) or as mergekit breaks them (mergekit); overrides the recipe")] = None,
    out_shard_size: Annotated[str | None, typer.Option(
        "--out-shard-size", help="bytes per output shard, e.g. 5B (default) or 500M")] = None,
    copy_tokenizer: Annotated[bool, typer.Option(
        "--copy-tokenizer/--no-copy-tokenizer", help="write the tokenizer files beside the weights")] = True,
    random_seed: Annotated[int | None, typer.Option(
        "--random-seed", help="seed of random drops (DARE), overrides the recipe's seed")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="log more (repeat for more)")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Merge models once, with the values the recipe fixes, into a folder stock loaders read.

    Example: evomerge merge examples/ties.yaml merged/ (or a run folder: its best values)
    """
    from evomerge.atomic import check_output
    from evomerge.recipe import input_paths

    if out_path is not None and out is not None and out_path != out:
        raise EvomergeError(f"two output folders ({out_path} and --out {out}): give one")
    out = out or out_path
    if out is None:
        raise EvomergeError("no output folder: evomerge merge CONFIG OUT (or --out OUT)")
    if verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO)
    recipe, values = recipe_and_values(config)  # a bad recipe is refused before torch is imported
    source = config / "recipe.yaml" if config.is_dir() else recipe_file(config)  # RUN/best is a fine --out
    check_output(out, force=force, inputs=[source, *input_paths(recipe)])  # before any model loads
    if push_to_hub:
        require_hub(f"--push-to-hub {push_to_hub}")
    if tie_order is not None:
        recipe.merge.tie_order = tie_order.value
    if random_seed is not None:
        recipe.seed = random_seed
    from evomerge.pipelines.merge import merge_recipe

    merge_recipe(recipe, out, values, device=resolve_device(device), allow_pickle=allow_pickle,
                 trust_remote_code=trust_remote_code, allow_nonfinite=allow_nonfinite, force=force,
                 show_progress=not quiet, shard_bytes=parse_size(out_shard_size) if out_shard_size else None,
                 copy_tokenizer=copy_tokenizer)
    typer.echo(f"wrote {out}")
    pushed(out, push_to_hub)


def pushed(folder: Path, repo: str | None) -> None:
    if repo:
        from evomerge.hub import push_folder

        typer.echo(f"pushed to {push_folder(folder, repo)}")


@recipe_app.command("export")
def recipe_export(
    recipe_path: Annotated[Path, typer.Argument(metavar="RUN_OR_RECIPE", help="a run folder or a recipe file")],
    mergekit: Annotated[bool, typer.Option("--mergekit/--no-mergekit", help="mergekit's YAML, or (--no-mergekit) "
                                           "the evomerge recipe with the run's values fixed")] = True,
    allow_pickle: AllowPickle = False,
) -> None:
    """Print a recipe with a run's chosen values fixed, as mergekit or evomerge YAML.

    Example: evomerge recipe export runs/evollm-jp-ps > best-mergekit.yaml
    """
    from evomerge.mergekit_export import export_recipe, fill_values, recipe_groups

    recipe, values = recipe_and_values(recipe_path)
    grouped = any(v.count("/") == 2 or (v.count("/") == 1 and v.split("/")[0] not in
                                        {m.label for m in recipe.models}) for v in values)
    groups = recipe_groups(recipe, allow_pickle=allow_pickle) if grouped else None
    fixed = fill_values(recipe, values, groups)
    data = export_recipe(fixed) if mergekit else fixed.model_dump(mode="json", exclude_defaults=True)
    typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="which mini-world (and search seed)")] = 0,
    run_dir: Annotated[Path, typer.Option(help="run folder")] = Path("runs/miniworld"),
    cache_dir: Annotated[Path | None, typer.Option(help="built worlds (default ~/.cache/evomerge/miniworld)")] = None,
    trials: Annotated[int | None, typer.Option(help="trials (default: the recipe's)")] = None,
    fitness: Annotated[str, typer.Option(help="fast: each trial scored on 250 of the 1000 problems, the 8 "
                                              "best re-scored on all; full: every trial on every problem")] = "fast",
) -> None:
    """The mini-world: an evolved merge beats its sources and fixed merges on held-out data, on a CPU.

    Example: evomerge demo --seed 1 --run-dir runs/mw1
    """
    from evomerge.pipelines.demo import run_demo

    run_demo(seed=seed, run_dir=run_dir, cache_dir=cache_dir, trials=trials, fitness=fitness)


@app.command()
def evolve(
    recipe_path: Annotated[Path, typer.Argument(metavar="recipe", help="evomerge recipe with merge.search and evaluator")],
    trials: Annotated[int | None, typer.Option(min=0, help="total finished trials to reach (resumes)")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="run folder (default runs/<recipe name>)")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage: a database URL (postgresql://... for several "
                                                     "machines), or journal:PATH (default: SQLite in the run folder)")] = None,
    study_name: Annotated[str | None, typer.Option(help="the study's name in its storage (default: recipe name + hash)")] = None,
    sampler: Annotated[Sampler | None, typer.Option(help="the recipe's by default (cmaes unless it says)")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="start this many local workers on the study (CPU)")] = None,
    devices: Annotated[str | None, typer.Option(help="start one local worker per device, e.g. cuda:0,cuda:1")] = None,
    export_best: Annotated[bool, typer.Option("--export-best/--no-export-best", help="write the best model to RUN/best")] = False,
    push_to_hub: PushToHub = None,
    device: Device = "",
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
) -> None:
    """Search merge values with CMA-ES, scoring each trial's merged model; rerun to resume, start
    again (on any machine sharing --storage) to add a worker.

    Example: evomerge evolve recipes/evollm-jp-ps.yaml --trials 200 --export-best
    """
    from evomerge.pipelines.workers import evolve_command

    if push_to_hub and not export_best:
        raise EvomergeError("--push-to-hub uploads the exported best model: add --export-best")
    if push_to_hub:
        require_hub(f"--push-to-hub {push_to_hub}")
    outcome = evolve_command(
        recipe_file(recipe_path), trials=trials, run_dir=run_dir, storage=storage, study_name=study_name,
        sampler=sampler.value if sampler else None, workers=workers, devices=devices, export_best=export_best,
        device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, resolve_device=resolve_device)
    if push_to_hub and outcome is not None and outcome.best_values:
        pushed(outcome.run_dir / "best", push_to_hub)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder written by evolve")]) -> None:
    """Plots and tables of a run: history, chosen values, summary, dashboard command.

    Example: evomerge report runs/miniworld (then open runs/miniworld/report/summary.html)
    """
    from evomerge.pipelines.report import write_report

    files = write_report(run_dir)
    typer.echo(f"report: {files['html']} (self-contained; Markdown: {files['summary']})")
    if files["cmaes_use"] is not None:
        unused, complete = files["cmaes_use"]
        typer.echo(f"complete trials CMA-ES did not use: {unused} of {complete} ({unused / max(complete, 1):.1%})")
    typer.echo(f"dashboard: optuna-dashboard {files['storage']}")


@app.command()
def plan(
    recipe_path: Annotated[Path, typer.Argument(metavar="recipe")],
    as_json: Annotated[bool, typer.Option("--json/--no-json", help="print JSON")] = False,
) -> None:
    """What a recipe costs, from configs only: searched values, population, memory.

    Example: evomerge plan recipes/evollm-jp-ps.yaml (or a shipped recipe by name: evollm-jp-ps)
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from evomerge.pipelines.plan import make_plan
    from evomerge.recipe import load_recipe

    p = make_plan(load_recipe(recipe_file(recipe_path))).as_dict()
    if as_json:
        typer.echo(json.dumps(p, indent=2))
        return
    table = Table(title=f"plan: {p['recipe']}", show_header=False)
    for k, v in p.items():
        table.add_row(*plan_row(k, v))
    Console().print(table)


def plan_row(key: str, value) -> tuple[str, str]:
    """A plan entry for people: parameter counts in K/M/B, memory in GiB, notes one per line."""
    label = key.removesuffix("_gb").replace("_", " ")
    if key.endswith("_gb"):
        return label, f"{value:,.2f} GiB" if value >= 1 else f"{value * 1024:.1f} MiB"
    if "parameters" in key and isinstance(value, int):
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= size:
                return label, f"{value / size:.1f} {unit} params"
        return label, f"{value} params"
    if isinstance(value, list):
        return label, "\n".join(map(str, value)) or "-"
    if isinstance(value, bool):
        return label, "yes" if value else "no"
    return label, str(value)


score_app = typer.Typer(no_args_is_help=True, help="Re-score saved outputs without a model.")
app.add_typer(score_app, name="score")


class Metric(str, Enum):
    """How saved Japanese outputs are read: the paper's published scoring or evomerge's."""

    sakana = "sakana"
    robust = "robust"


MetricOption = Annotated[Metric, typer.Option(
    "--metric", help="sakana: Sakana's published scoring (comparable with the paper); "
    "robust: evomerge's reading (NFKC numbers, character language rule, plain mean)")]


@score_app.command("ja-math")
def score_ja_math(path: Annotated[Path, typer.Argument(metavar="file.jsonl", help="lines with response and answer")],
                  metric: MetricOption = Metric.robust) -> None:
    """Accuracy of saved responses: last number, and Japanese-only (the paper's score).

    Example: evomerge score ja-math responses.jsonl --metric sakana
    """
    import json

    from evomerge.evaluators.ja_math import score_file

    typer.echo(json.dumps(score_file(path, metric=metric.value)))


@score_app.command("ja-rouge")
def score_ja_rouge(path: Annotated[Path, typer.Argument(metavar="file.jsonl", help="lines with prediction and reference")],
                   metric: MetricOption = Metric.robust) -> None:
    """Mean ROUGE-L (F x 100, MeCab words) of saved VQA answers; non-Japanese answers score 0.

    Example: evomerge score ja-rouge answers.jsonl
    """
    import json

    from evomerge.evaluators.ja_rouge import score_file as score_rouge_file

    typer.echo(json.dumps(score_rouge_file(path, metric=metric.value), ensure_ascii=False))


@score_app.command("clip")
def score_clip(
    images: Annotated[Path, typer.Option("--images", help="folder of images (sorted order, or NNN index names)")],
    prompts: Annotated[Path, typer.Option("--prompts", help="text file, one prompt per line")],
    model: Annotated[str | None, typer.Option(help="open_clip model name or hf-hub: id")] = "xlm-roberta-base-ViT-B-32",
    pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag or checkpoint")] = "laion5b_s13b_b90k",
    model_config: Annotated[Path | None, typer.Option(help="local open_clip model config JSON")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="weights for --model-config")] = None,
    device: Annotated[str, typer.Option(help="where CLIP runs (default: cuda if available)")] = "",
    allow_pickle: AllowPickle = False,
) -> None:
    """CLIP score of existing images: mean of 100 x max(cos(image, prompt), 0).

    Example: evomerge score clip --images runs/evosdxl-jp/images/best --prompts recipes/prompts/ja-prompts.txt
    """
    import json

    from evomerge.evaluators.clip_score import load_clip, score_folder

    if model_config is not None:  # a local config names its own model; no pretrained tag
        model, pretrained = None, None
    clip = load_clip(model, pretrained, model_config=model_config, checkpoint=checkpoint,
                     device=resolve_device(device), allow_pickle=allow_pickle)
    typer.echo(json.dumps(score_folder(images, prompts, clip)))


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(metavar="model", help="model folder, Hub id or SDXL single file")],
    as_json: Annotated[bool, typer.Option("--json/--no-json", help='print {"groups": {tensor: group}}')] = False,
    modality: Annotated[str | None, typer.Option(help="causal_lm, vlm or sdxl (default: from the config)")] = None,
    grouping: Annotated[str, typer.Option(help="sdxl: blocks, attn_other or blocks_attn_other")] = "blocks",
    allow_pickle: AllowPickle = False,
) -> None:
    """Every tensor of a model with its shape and merge group, before writing a recipe.

    Example: evomerge inspect stabilityai/stable-diffusion-xl-base-1.0 --grouping attn_other
    """
    import json

    from evomerge.pipelines.inspect import inspect_model

    info = inspect_model(model, modality=modality, grouping=grouping, allow_pickle=allow_pickle)
    if as_json:
        typer.echo(json.dumps({"groups": info.groups}, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model} ({info.modality}, {len(info.groups)} tensors, {len(set(info.groups.values()))} groups)")
    table.add_column("tensor", overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("group", no_wrap=True)
    for name, group in info.groups.items():
        table.add_row(name, "x".join(map(str, info.shapes[name])) or "scalar", group)
    Console().print(table)


def _print_version(value: bool) -> None:
    if value:
        from evomerge import __version__

        typer.echo(f"evomerge {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="print the version and exit")] = False) -> None:
    """Breed models by merging: evolutionary search over merge recipes."""


def quiet_progress_bars() -> None:
    """No third-party progress bars (model loading, downloads) in logs: a bar redrawn with \r
    is one unreadable line in a file."""
    import os

    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub, transformers
        os.environ.setdefault("TQDM_DISABLE", "1")  # datasets and other tqdm users


def main() -> None:
    import signal

    quiet_progress_bars()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # unwind (removing temporary folders)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code = app(standalone_mode=False)
    except EvomergeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not hasattr(e, "format_message"):  # click's own exceptions (typer vendors click)
            raise
        message = e.format_message()
        if type(e).__name__ != "NoArgsIsHelpError":  # one line instead of click's framed usage block
            ctx = getattr(e, "ctx", None)
            message = f"error: {' '.join(message.split())}" + (f" (see {ctx.command_path} --help)" if ctx else "")
        print(message, file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
