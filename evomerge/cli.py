"""The ``evomerge`` command. Thin: parse, call a pipeline, print. Input errors exit with 2."""

from __future__ import annotations

import sys
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


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="evomerge recipe or mergekit YAML (fixed values)")],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty output folder")] = False,
    device: Device = "",
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
) -> None:
    """Merge models once, with the values the recipe fixes, into a folder stock loaders read."""
    from evomerge.pipelines.merge import merge_to_folder, open_session
    from evomerge.recipe import load_recipe

    recipe = load_recipe(config)
    session = open_session(recipe, device=device or default_device(), allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    merge_to_folder(session, out, force=force)
    typer.echo(f"wrote {out}")


@recipe_app.command("export")
def recipe_export(
    recipe_path: Annotated[Path, typer.Argument(help="a recipe file")],
    mergekit: Annotated[bool, typer.Option("--mergekit", help="write mergekit's YAML")] = True,
) -> None:
    """Print a parameter-space recipe as mergekit YAML."""
    from evomerge.recipe import load_recipe, to_mergekit

    recipe = load_recipe(recipe_path)
    typer.echo(yaml.safe_dump(to_mergekit(recipe), sort_keys=False, allow_unicode=True), nl=False)


@app.command()
def demo() -> None:
    """Build the CPU mini-world and watch evolution beat its sources (not yet available)."""
    typer.echo("evomerge demo: not yet (the mini-world lands with its own issue)")


def main() -> None:
    try:
        app()
    except EvomergeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
