"""The ``evomerge`` command. Thin: parse, call a pipeline, print. Input errors exit with 2."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
import yaml

from evomerge.errors import EvomergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Breed models by merging: evolutionary search over merge recipes.")
recipe_app = typer.Typer(no_args_is_help=True, help="Work with recipes.")
app.add_typer(recipe_app, name="recipe")

Device = Annotated[str, typer.Option(help="where merges run: cpu, cuda, cuda:1 (default: cuda if available)")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="load .bin/.pt pickle checkpoints (can run code)")]
TrustCode = Annotated[bool, typer.Option("--trust-remote-code", help="allow model code from the Hub")]


class TieOrder(str, Enum):
    """How TIES breaks magnitude ties at the top-k threshold."""

    index = "index"
    mergekit = "mergekit"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def recipe_and_values(path: Path):
    """A recipe file (its fixed values), or a run folder (its recipe and best values)."""
    from evomerge.recipe import load_recipe

    if path.is_dir():
        from evomerge.pipelines.evolve import best_values

        return load_recipe(path / "recipe.yaml"), best_values(path)
    return load_recipe(path), {}


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="evomerge recipe or mergekit YAML (fixed values)")],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty output folder")] = False,
    device: Device = "",
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
    tie_order: Annotated[TieOrder | None, typer.Option(
        "--tie-order", help="TIES magnitude ties at the top-k threshold: lowest index first "
        "(index) or as mergekit breaks them (mergekit); overrides the recipe")] = None,
) -> None:
    """Merge models once, with the values the recipe fixes, into a folder stock loaders read."""
    from evomerge.pipelines.merge import merge_to_folder, open_session

    recipe, values = recipe_and_values(config)
    if recipe.dfs is not None:  # a DFS run folder: write its best path as a stock checkpoint
        from evomerge.merging.dfs import DFSCandidates

        if not values:
            raise EvomergeError(f"{config}: a dfs recipe fixes no path; pass the run folder evolve wrote")
        candidates = DFSCandidates(recipe, device=device or default_device(), allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code)
        candidates.export(values, out, force=force)
        typer.echo(f"wrote {out}")
        return
    if tie_order is not None:
        recipe.merge.tie_order = tie_order.value
    session = open_session(recipe, device=device or default_device(), allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    merge_to_folder(session, out, values, force=force)
    typer.echo(f"wrote {out}")


@recipe_app.command("export")
def recipe_export(
    recipe_path: Annotated[Path, typer.Argument(help="a recipe file")],
    mergekit: Annotated[bool, typer.Option("--mergekit", help="write mergekit's YAML")] = True,
) -> None:
    """Print a parameter-space recipe as mergekit YAML."""
    from evomerge.recipe import to_mergekit

    recipe, values = recipe_and_values(recipe_path)
    typer.echo(yaml.safe_dump(to_mergekit(recipe, values), sort_keys=False, allow_unicode=True), nl=False)


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="which mini-world (and search seed)")] = 0,
    run_dir: Annotated[Path, typer.Option(help="run folder")] = Path("runs/miniworld"),
    cache_dir: Annotated[Path | None, typer.Option(help="built worlds (default ~/.cache/evomerge/miniworld)")] = None,
    trials: Annotated[int | None, typer.Option(help="trials (default: the recipe's)")] = None,
) -> None:
    """The mini-world: an evolved merge beats its sources and fixed merges on held-out data, on a CPU."""
    from evomerge.pipelines.demo import run_demo

    run_demo(seed=seed, run_dir=run_dir, cache_dir=cache_dir, trials=trials)


@app.command()
def evolve(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="evomerge recipe with merge.search and evaluator")],
    trials: Annotated[int | None, typer.Option(help="total finished trials to reach (resumes)")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="run folder (default runs/<recipe name>)")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage: a database URL, or journal:PATH (default: SQLite in the run folder)")] = None,
    sampler: Annotated[str | None, typer.Option(help="cmaes (default), random or tpe")] = None,
    export_best: Annotated[bool, typer.Option("--export-best", help="write the best model to RUN/best")] = False,
    device: Device = "",
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
) -> None:
    """Search merge values with CMA-ES, scoring each trial's merged model; rerun to resume."""
    from evomerge.pipelines.evolve import Evolution

    evo = Evolution(recipe_path, run_dir=run_dir, storage=storage, sampler=sampler,
                    device=device or default_device(), allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code)
    outcome = evo.run(trials, export_best=export_best)
    typer.echo(f"best score {outcome.best_value} in {outcome.run_dir} (values in best.json)")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder written by evolve")]) -> None:
    """Plots and tables of a run: history, chosen values, summary, dashboard command."""
    from evomerge.pipelines.report import write_report

    files = write_report(run_dir)
    for key in ("history", "values", "summary", "html"):
        typer.echo(f"{key}: {files[key]}")
    typer.echo(f"dashboard: optuna-dashboard {files['storage']}")


@app.command()
def plan(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """What a recipe costs, from configs only: searched values, population, memory."""
    import json

    from rich.console import Console
    from rich.table import Table

    from evomerge.pipelines.plan import make_plan
    from evomerge.recipe import load_recipe

    p = make_plan(load_recipe(recipe_path)).as_dict()
    if as_json:
        typer.echo(json.dumps(p, indent=2))
        return
    table = Table(title=f"plan: {p['recipe']}", show_header=False)
    for k, v in p.items():
        table.add_row(k.replace("_", " "), str(v))
    Console().print(table)


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
def score_ja_math(path: Annotated[Path, typer.Argument(metavar="FILE.jsonl", help="lines with response and answer")],
                  metric: MetricOption = Metric.robust) -> None:
    """Accuracy of saved responses: last number, and Japanese-only (the paper's score)."""
    import json

    from evomerge.evaluators.ja_math import score_file

    typer.echo(json.dumps(score_file(path, metric=metric.value)))


@score_app.command("ja-rouge")
def score_ja_rouge(path: Annotated[Path, typer.Argument(metavar="FILE.jsonl", help="lines with prediction and reference")],
                   metric: MetricOption = Metric.robust) -> None:
    """Mean ROUGE-L (F x 100, MeCab words) of saved VQA answers; non-Japanese answers score 0."""
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
) -> None:
    """CLIP score of existing images: mean of 100 x max(cos(image, prompt), 0)."""
    import json

    from evomerge.evaluators.clip_score import load_clip, score_folder

    if model_config is not None:  # a local config names its own model; no pretrained tag
        model, pretrained = None, None
    clip = load_clip(model, pretrained, model_config=model_config, checkpoint=checkpoint,
                     device=device or default_device())
    typer.echo(json.dumps(score_folder(images, prompts, clip)))


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="model folder, Hub id or SDXL single file")],
    as_json: Annotated[bool, typer.Option("--json", help='print {"groups": {tensor: group}}')] = False,
    modality: Annotated[str | None, typer.Option(help="causal_lm, vlm or sdxl (default: from the config)")] = None,
    grouping: Annotated[str, typer.Option(help="sdxl: blocks, attn_other or blocks_attn_other")] = "blocks",
    allow_pickle: AllowPickle = False,
) -> None:
    """Every tensor of a model with its shape and merge group, before writing a recipe."""
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


def main() -> None:
    try:
        app()
    except EvomergeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
