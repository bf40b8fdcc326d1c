"""A run folder and what it records (``run.json``), so that a rerun resumes the same study.

    RUN/recipe.yaml    the recipe (its folder pinned as ``root:``)
    RUN/run.json       storage, study name, sampler and its settings, seed, recipe hash
    RUN/trials/        one JSON record per trial
    RUN/baselines.json, best.json, fitness.json, rescored.json

The study in its storage is the source of truth; ``run.json`` says where it is. A rerun without
flags uses what run.json recorded; a flag that contradicts it is refused (one line saying how to
start a new run). Paths inside the run folder are written relative to it (``{run}/study.db``), so
a moved or copied run folder keeps working.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.atomic import write_json_atomic, write_text_atomic
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

RUNS = Path("runs")
RUN_TOKEN = "{run}"  # stands for the run folder inside run.json's storage URL
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the run folder, or one line saying it is corrupt."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvomergeError(f"{path}: corrupt {what} ({e.__class__.__name__}); restore it or use a new --run-dir") from None


def run_folder(recipe: Recipe, run_dir: str | Path | None) -> Path:
    """``--run-dir``, else ``runs/<name>``: a recipe's name is a name, never a path."""
    if run_dir is not None:
        return Path(run_dir)
    if not NAME.fullmatch(recipe.name):
        raise EvomergeError(f"name {recipe.name!r}: use letters, digits, '-', '_' and '.' (the run goes to "
                            "runs/<name>; pass --run-dir to put it elsewhere)")
    return RUNS / recipe.name


def recipe_data(text: str) -> dict:
    data = yaml.safe_load(text) or {}
    data.pop("root", None)
    return data


def recipe_hash(text: str) -> str:
    """What identifies a recipe's search: everything but its folder and its trial total
    (raising ``search.trials`` continues the same study)."""
    data = recipe_data(text)
    if isinstance(data.get("search"), dict):
        data["search"] = {k: v for k, v in data["search"].items() if k != "trials"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_study_name(recipe: Recipe, text: str) -> str:
    """The recipe's name and hash: two recipes sharing a name are two studies in one storage."""
    return f"{recipe.name}-{recipe_hash(text)}"


@dataclass
class RunPaths:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def best(self) -> Path:
        return self.root / "best.json"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines.json"

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    def default_storage(self) -> str:
        return f"sqlite:///{RUN_TOKEN}/study.db"

    def recorded(self) -> dict:
        return read_json(self.info, "run.json") if self.info.exists() else {}

    def storage(self) -> str:
        """The storage the run recorded, with the run folder's own files found where it is now."""
        return self.expand(self.recorded().get("storage") or self.default_storage())

    def study_name(self, recipe: Recipe) -> str:
        return self.recorded().get("study") or recipe.name

    def expand(self, url: str) -> str:
        return url.replace(RUN_TOKEN, str(self.root.resolve()))

    def contract(self, url: str) -> str:
        """A storage URL as run.json keeps it: a file inside the run folder relative to it."""
        for prefix in ("sqlite:///", "journal:"):
            if url.startswith(prefix):
                path = Path(url[len(prefix):]).expanduser()
                try:
                    return f"{prefix}{RUN_TOKEN}/{path.resolve().relative_to(self.root.resolve()).as_posix()}"
                except ValueError:
                    return f"{prefix}{path.resolve()}"
        return url


@dataclass
class RunSettings:
    """What a run is: where its study lives and how it samples. Compared with run.json on rerun."""

    storage: str  # as recorded ({run}/... inside the run folder)
    study: str
    sampler: str
    popsize: int | None
    separable: bool
    seed: int
    recipe_hash: str

    def as_json(self) -> dict:
        return {"storage": self.storage, "study": self.study,
                "sampler": {"kind": self.sampler, "popsize": self.popsize, "separable": self.separable},
                "seed": self.seed, "recipe_hash": self.recipe_hash, "version": 2}


def settle(paths: RunPaths, recipe: Recipe, text: str, *, storage: str | None, study: str | None,
           sampler: str | None, new_command: str, started: bool = True) -> RunSettings:
    """The run's settings: run.json's when it has them, the flags' (or defaults) otherwise. A flag
    that contradicts run.json is refused, saying how to start a new run instead. A run that
    never scored anything takes the flags given as new settings, and run.json's for the rest (a
    worker joining while the first one still loads its models must find the same study)."""
    old = paths.recorded()
    wanted = RunSettings(
        storage=paths.contract(storage) if storage else (old.get("storage") or paths.default_storage()),
        study=study or old.get("study") or default_study_name(recipe, text),
        sampler=sampler or (old.get("sampler") or {}).get("kind") or recipe.search.sampler,
        popsize=recipe.search.popsize, separable=recipe.search.separable, seed=recipe.seed,
        recipe_hash=recipe_hash(text))
    if not old or not started:
        return wanted
    recorded_storage = old.get("storage") and paths.contract(paths.expand(old["storage"]))
    for flag, given, recorded in (("--storage", storage and wanted.storage, recorded_storage),
                                  ("--study-name", study, old.get("study")),
                                  ("--sampler", sampler, (old.get("sampler") or {}).get("kind"))):
        if given and recorded and given != recorded:
            shown = paths.expand(recorded) if flag == "--storage" else recorded
            raise EvomergeError(f"{flag} {given}: {paths.root} is a run with {flag} {shown}; drop {flag} to "
                                f"resume it, or start a new run with {new_command}")
    return wanted


def claim_run_dir(paths: RunPaths, recipe_path: Path, text: str, settings: RunSettings, *,
                  started: bool) -> None:
    """Create the run folder with the recipe and run.json, or check it holds the same recipe. A
    changed ``search.trials`` is a new total (the copy is updated); a run that never scored
    anything takes the corrected recipe; any other change needs a new run folder."""
    paths.trials.mkdir(parents=True, exist_ok=True)
    if paths.recipe.exists() and recipe_path.resolve() != paths.recipe.resolve():
        old = paths.recipe.read_text()
        if recipe_hash(old) != recipe_hash(text) and started:
            raise EvomergeError(f"{paths.root} holds a run of a different recipe; pass --run-dir for a new run")
        if recipe_data(old) != recipe_data(text):
            write_text_atomic(paths.recipe, text)
    elif not paths.recipe.exists():
        write_text_atomic(paths.recipe, text)
    if paths.recorded() != settings.as_json():
        write_json_atomic(paths.info, settings.as_json())


def json_safe(value: Any) -> Any:
    """What an evaluator returned, as JSON can hold it: tensors and arrays as lists or numbers,
    anything else unknown as its text (a record must never stop a run, nor a resume)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    for convert in ("tolist", "item"):
        if callable(getattr(value, convert, None)):
            try:
                return json_safe(getattr(value, convert)())
            except Exception:  # noqa: BLE001 - fall back to text below
                break
    return str(value)[:1000]


def failure_kind(error: str) -> str:
    """Failures of one kind differ only in numbers (CUDA out of memory, tried to allocate N)."""
    return re.sub(r"\d+(\.\d+)?", "#", error)
