"""The mini-world's pieces: tokenizer, generators, splits, a tiny smoke build, real scoring."""

from __future__ import annotations

import json
import random

import pytest

from evomerge.evaluators.ja_math import JaMathEvaluator, load_problems, score_responses
from evomerge.miniworld.build import BuildConfig, build_world, load_manifest, world_dir
from evomerge.miniworld.tasks import (
    PROMPT,
    SPLIT_SIZES,
    base_sampler,
    en_answer,
    is_carry,
    ja_answer,
    japanese_sampler,
    make_world,
    math_sampler,
    write_splits,
)
from evomerge.miniworld.tokenizer import build_tokenizer, save_tokenizer


def test_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    text = "23たす38は？\nこたえ: 61です。answer: 61"
    tok = build_tokenizer()
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    save_tokenizer(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text)["input_ids"] == ids and again.decode(ids) == text
    assert again.padding_side == "left"
    batch = again(["12", "1234"], padding=True)
    assert batch["input_ids"][0][:2] == [again.pad_token_id] * 2


def test_generators_are_deterministic_from_the_seed():
    a, b, c = make_world(0), make_world(0), make_world(1)
    assert a == b and a.splits != c.splits
    for sampler in (base_sampler, japanese_sampler, math_sampler):
        draw1, draw2 = sampler(a), sampler(b)
        r1, r2 = random.Random(5), random.Random(5)
        assert [draw1(r1) for _ in range(50)] == [draw2(r2) for _ in range(50)]


def test_splits_are_carry_sums_disjoint_from_each_other_and_training():
    world = make_world(3)
    sizes = {k: len(v) for k, v in world.splits.items()}
    assert sizes == SPLIT_SIZES and sizes["search"] >= 300 and sizes["test"] >= 500
    sets = {k: set(v) for k, v in world.splits.items()}
    assert sum(len(s) for s in sets.values()) == len(set().union(*sets.values()))  # disjoint
    assert all(is_carry(a, b) and 10 <= a <= 99 and 10 <= b <= 99 for s in sets.values() for a, b in s)
    train = set(world.train_carry) | set(world.train_plain)
    assert not train & set().union(*sets.values())
    # no training sampler can ever produce an evaluation question
    questions = {p["question"] for s in world.splits for p in world.problems(s)}
    rng = random.Random(0)
    for sampler in (base_sampler, japanese_sampler, math_sampler):
        draw = sampler(world)
        for _ in range(3000):
            prompt, _ = draw(rng)
            assert prompt.removesuffix("\n") not in questions


def test_splits_are_read_and_scored_by_the_real_ja_math_functions(tmp_path):
    paths = write_splits(make_world(0), tmp_path)
    problems = load_problems({"data": {"path": str(paths["test"]), "question_field": "question",
                                       "answer_field": "answer"}})
    assert len(problems) == 500 and problems[0]["question"].endswith("は？")
    p = problems[0]
    scored = score_responses([{"response": ja_answer(p["answer"]), "answer": p["answer"]},
                              {"response": en_answer(p["answer"]), "answer": p["answer"]},
                              {"response": ja_answer(p["answer"] + 1), "answer": p["answer"]}])
    assert scored["accuracy"] == pytest.approx(2 / 3) and scored["accuracy_ja"] == pytest.approx(1 / 3)


def test_smoke_build_writes_loadable_model_folders(tmp_path):
    from transformers import AutoModelForCausalLM

    config = BuildConfig(base_max_steps=4, probe_every=2, ja_steps=2, math_steps=2, batch_size=8)
    logs: list[str] = []
    manifest = build_world(7, tmp_path, config=config, log=logs.append)
    folder = world_dir(7, tmp_path)
    assert load_manifest(folder) is not None and not manifest["cached"]
    saved = json.loads((folder / "manifest.json").read_text())
    assert set(saved["models"]) == {"base", "japanese", "math"}
    assert 0 < saved["models"]["math"]["delta_ratio"] < 1
    model = AutoModelForCausalLM.from_pretrained(manifest["paths"]["math"])
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 900_000
    # the real evaluator runs on the built folders and the written split
    spec = {"kind": "ja_math", "data": {"path": manifest["data"]["search"], "limit": 8},
            "prompt": PROMPT, "max_new_tokens": 4, "batch_size": 8, "stop": []}
    result = JaMathEvaluator(spec, manifest["paths"]["base"])(model)
    assert result.metrics["n"] == 8 and 0 <= result.score <= 1
    assert build_world(7, tmp_path, config=config)["cached"]  # built once, then reused
