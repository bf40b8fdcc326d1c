"""The report of a finished tiny run, and of a demo-like run with a held-out split."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from evomerge.pipelines.demo import write_test_split
from evomerge.pipelines.evolve import Evolution
from evomerge.pipelines.report import write_report

# Scores a fixed token sequence's likelihood; the 6th call (a trial: 2 baselines come first)
# fails, and every result carries two readings of the same score, as ja_math's sakana/robust do.
EVALUATOR = '''
import torch
import torch.nn.functional as F

TEXT = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 30, 11, 4, 8, 2]])
CALLS = [0]


def score(model):
    CALLS[0] += 1
    if CALLS[0] == 6:
        raise RuntimeError("failed on purpose")
    with torch.no_grad():
        logits = model(TEXT).logits.float()
    v = -F.cross_entropy(logits[0, :-1], TEXT[0, 1:]).item()
    return {"score": v, "sakana": v, "robust": round(v, 2)}
'''


@pytest.fixture(scope="module")
def tiny_run(llama_fp32, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    (root / "report_tiny_score.py").write_text(EVALUATOR)
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-report", "base": str(llama_fp32["base"]), "seed": 4,
        "models": [{"model": str(llama_fp32[k]), "name": k} for k in ("m1", "m2")],
        "merge": {"method": "ties", "search": {"weight": [0, 1], "density": [0.1, 1]}, "granularity": "per_group"},
        "evaluator": {"kind": "python", "callable": "report_tiny_score:score"},
        "baselines": [{"name": "m1", "source": "m1"},
                      {"name": "average", "method": "linear", "parameters": {"weight": 1.0}}],
        "search": {"trials": 12, "popsize": 4}}))
    Evolution(recipe, run_dir=root / "run").run(show_progress=False)
    return root / "run"


def embedded_pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_report_of_a_finished_run(tiny_run, evomerge_cli):
    code, out, err = evomerge_cli("report", tiny_run)
    assert code == 0, err
    assert "summary.html" in out
    page = (tiny_run / "report" / "summary.html").read_text()
    md = (tiny_run / "report" / "summary.md").read_text()
    for text in (page, md):
        for section in ("Results (search split)", "Sources", "Figures", "Best values (trial", "Time and cost", "Recipe"):
            assert section in text, section
        # the metric is named, and every metric of the baselines and best trial has a column
        assert "report_tiny_score:score: sakana" in text and "robust" in text
        assert "baseline: m1" in text and "baseline: average" in text and "evolved (trial" in text
        assert "1 failed" in text and "11 complete" in text
        assert "Held-out test split" not in text  # this run has none
    # every image is inside the page: history, values, generations, importance
    assert "<img" in page and not re.search(r"<img[^>]+src='(?!data:)", page)
    images = embedded_pngs(page)
    assert len(images) == 4 and all(im.format == "PNG" and im.size[0] > 300 for im in images)
    assert "<style>" in page and "<link" not in page
    best = json.loads((tiny_run / "best.json").read_text())
    assert f"trial {best['trial']} with {best['score']:.4f}" in page
    assert f"| `layers.0/m1/weight` | {best['values']['layers.0/m1/weight']:.4f} |" in md


def test_report_rerun_keeps_the_held_out_split(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    rows = {"m1": {"kind": "source", "search": {"accuracy": 0.5, "accuracy_ja": 0.125},
                   "test": {"accuracy": 0.375, "accuracy_ja": 0.0625}},
            "evolved": {"kind": "evolved", "search": {"accuracy": 0.75, "accuracy_ja": 0.625},
                        "test": {"accuracy": 0.6875, "accuracy_ja": 0.5625}}}
    write_test_split(run, rows)
    for _ in range(2):  # the demo writes the report, then a user rebuilds it
        files = write_report(run)
        md, page = files["summary"].read_text(), files["html"].read_text()
        for text in (md, page):
            assert "Held-out test split" in text and "test accuracy_ja" in text
            assert "0.5625" in text and "0.0625" in text
    assert "| **evolved** | **evolved** | **0.7500** | **0.6875** | **0.6250** | **0.5625** |" in md
