"""The adapter contract and the defaults decided in one place: merge and plan choose the same
reference and dtype, and a pipeline never has to ask an adapter what it can do."""

from __future__ import annotations

import inspect

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.modalities import get_adapter
from evomerge.modalities.base import Adapter
from evomerge.pipelines.merge import open_session
from evomerge.pipelines.plan import make_plan
from evomerge.recipe import Recipe


def recipe(family: dict, **extra) -> Recipe:
    return Recipe.model_validate({
        "name": "contract", "base": str(family["base"]),
        "models": [{"model": str(family[k]), "name": k} for k in ("m1", "m2")],
        "merge": {"method": "task_arithmetic", "search": {"weight": [0, 1]}}, **extra})


@pytest.mark.parametrize("modality", ["causal_lm", "vlm", "sdxl"])
def test_every_adapter_is_a_complete_adapter(modality):
    adapter = get_adapter(modality)  # an abstract hook left out would fail here
    assert isinstance(adapter, Adapter)
    assert adapter.modality == modality and adapter.library in ("transformers", "diffusers")


def test_the_contract_declares_what_pipelines_call():
    hooks = {n for n, _ in inspect.getmembers(Adapter, inspect.isfunction)}
    assert {"is_vocab", "after_merge", "finish_tensor", "default_reference", "evaluator_settings",
            "merge_role", "empty_model", "build", "parameters", "save_extras"} <= hooks


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_plan_and_merge_agree_on_dtype(llama_bf16, dtype):
    r = recipe(llama_bf16, **({"dtype": dtype} if dtype else {}))
    session = open_session(r)
    assert session.engine.dtype == (torch.float16 if dtype else torch.bfloat16)  # stored bf16
    assert make_plan(r).dtype == str(session.engine.dtype).removeprefix("torch.")


def test_plan_refuses_an_unknown_reference_as_merge_does(llama_fp32):
    r = recipe(llama_fp32, reference="nope")
    for run in (open_session, make_plan):
        with pytest.raises(EvomergeError, match="reference: no model labelled 'nope'"):
            run(r)


def test_plan_and_merge_take_the_named_reference(llama_fp32):
    r = recipe(llama_fp32, reference="m2")
    assert open_session(r).reference.folder == llama_fp32["m2"]
    from evomerge.pipelines.plan import plan_reference

    assert plan_reference(r, get_adapter("causal_lm")).folder == llama_fp32["m2"]


def test_pipelines_call_the_contract_without_probing():
    """No ``getattr``/``hasattr`` probe of an adapter and no branch on the modality name in the
    engine and the merge pipelines: what differs per modality is a hook."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1] / "evomerge"
    files = [root / "merging" / "engine.py"] + [root / "pipelines" / f"{n}.py" for n in (
        "merge", "candidates", "plan", "dfs", "dfs_plan")]
    for path in files:
        text = path.read_text()
        assert not re.search(r"(get|has)attr\([^)]*adapter", text), path
        assert not re.search(r"modality\s*[!=]=", text), path


def test_the_modality_settings_reach_the_evaluator_as_data(tmp_path, monkeypatch):
    """A modality's evaluator settings (SDXL: sampling) are handed to the evaluator when it is
    built: a python scorer that takes ``settings`` receives them; one that does not is unaffected."""
    from evomerge.evaluators.base import load_evaluator

    (tmp_path / "scorer_with_settings.py").write_text(
        "def score(model, settings=None):\n    return float(settings['sampling']['num_inference_steps'])\n"
        "def plain(model):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = get_adapter("sdxl").evaluator_settings()
    assert set(settings) == {"sampling", "final_sampling"}
    ev = load_evaluator({"kind": "python", "callable": "scorer_with_settings:score"}, settings=settings)
    assert ev(None).score == settings["sampling"]["num_inference_steps"]
    assert load_evaluator({"kind": "python", "callable": "scorer_with_settings:plain"}, settings=settings)(None).score == 1.0
    assert get_adapter("causal_lm").evaluator_settings() == {}
