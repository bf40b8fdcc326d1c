"""Racing and estimated fitness: the pure pieces on constructed problem sets, then the evolve
loop on tiny models with the loss evaluator (stopped trials, resume, re-scoring the winner)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from evomerge.evaluators.base import ItemEvaluator, Result
from evomerge.pipelines.evolve import Evolution
from evomerge.pipelines.fitness import (
    Fitness,
    cannot_win,
    item_order,
    merge_results,
    paired_estimate,
    search_cost,
    worse_p_value,
)
from evomerge.pipelines.report import write_report


class Answers:
    """A constructed problem set: the 'model' is its list of per-item scores (1 right, 0 wrong),
    so every trial's true full-set score is known."""

    name = "answers"

    def __init__(self, n: int):
        self.n_items = n
        self.scored = 0

    def __call__(self, model) -> Result:
        return self.score_items(model, range(self.n_items))

    def score_items(self, model, indices) -> Result:
        values = [float(model[i]) for i in indices]
        self.scored += len(values)
        accuracy = sum(values) / len(values)
        return Result(accuracy, {"accuracy": accuracy, "n": float(len(values))}, [{} for _ in values], values)


def model_with(accuracy: float, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.random() < accuracy) for _ in range(n)]


def test_wilcoxon_p_value_by_hand():
    # 8 items lost, 5 tied (dropped): under "no worse" each of the 8 signs is a fair coin, so the
    # exact one-sided p is the chance that all 8 fall negative, 2^-8
    assert worse_p_value([-1.0] * 8 + [0.0] * 5) == pytest.approx(2 ** -8)
    # 7 lost and 1 won: 9 sign patterns of 256 are this extreme (signed ranks all tie at 4.5)
    assert worse_p_value([-1.0] * 7 + [1.0]) == pytest.approx(9 / 256)
    assert worse_p_value([0.0, 0.0]) == 1.0
    assert worse_p_value([-1.0, 1.0] * 6) > 0.4
    assert not cannot_win([1, 1, 0, 0], [0, 0, 1, 1], 0.05)  # equal means never stop
    assert cannot_win([0] * 10, [1] * 10, 0.05)


def test_item_order_is_a_stratified_permutation():
    difficulty = [0.0] * 50 + [1.0] * 50
    order = item_order(100, seed=1, difficulty=difficulty, strata=2)
    assert sorted(order) == list(range(100))
    assert order == item_order(100, seed=1, difficulty=difficulty, strata=2)
    for k in (10, 20, 40):
        hard = sum(difficulty[i] for i in order[:k])
        assert abs(hard - k / 2) <= 1, (k, hard)
    assert item_order(100, seed=2) != item_order(100, seed=3)


def test_racing_stops_a_clearly_worse_trial_early():
    n = 400
    evaluator = Answers(n)
    fitness = Fitness(evaluator, "racing", chunk=40, seed=0)
    best = fitness.score(model_with(0.8, n, seed=1))
    assert best.full and best.value == pytest.approx(sum(model_with(0.8, n, 1)) / n)
    fitness.adopt(0, best)
    worse_model = model_with(0.4, n, seed=2)
    worse = fitness.score(worse_model)
    assert worse.stopped and not worse.full
    assert len(worse.items) == 40  # one chunk was enough
    assert worse.items == fitness.order[:40]
    assert worse.values == [float(worse_model[i]) for i in worse.items]
    # its value ranks it below the incumbent, and estimates its real score
    assert worse.value < best.value
    assert worse.value == pytest.approx(sum(worse_model) / n, abs=0.1)


def test_racing_never_stops_the_eventual_best():
    n, trials = 300, 40
    evaluator = Answers(n)
    fitness = Fitness(evaluator, "racing", chunk=30, seed=0)
    rng = random.Random(5)
    # a climbing search: each model is a noisy copy of a pattern that gets right more items
    models = []
    for t in range(trials):
        target = 0.3 + 0.5 * t / trials + rng.uniform(-0.1, 0.1)
        models.append([int(rng.random() < target) for _ in range(n)])
    true = [sum(m) / n for m in models]
    for number, model in enumerate(models):
        fitness.adopt(number, fitness.score(model))
    winner = max(range(trials), key=lambda t: true[t])
    assert fitness.incumbent.trial == winner
    assert fitness.incumbent.score == pytest.approx(true[winner])
    assert evaluator.scored < 0.8 * n * trials  # and it saved items


def test_estimate_equals_full_score_when_the_subset_is_the_full_set():
    n = 50
    model = model_with(0.6, n, seed=3)
    full = Answers(n)(model)
    scored = Fitness(Answers(n), "estimated", anchors=n, seed=0).score(model)
    assert scored.full and scored.value == full.score and sorted(scored.items) == list(range(n))
    values = [float(v) for v in model]
    other = [float(v) for v in model_with(0.3, n, seed=4)]
    assert paired_estimate(sum(other) / n, values, other) == pytest.approx(full.score, abs=1e-12)
    parts = [Answers(n).score_items(model, range(k, min(k + 7, n))) for k in range(0, n, 7)]
    merged = merge_results(parts, [v for p in parts for v in p.values])
    assert merged.score == pytest.approx(full.score)
    assert merged.metrics == pytest.approx(full.metrics)


def test_modes_need_an_item_evaluator():
    class Plain:
        name = "plain"

        def __call__(self, model):
            return Result(1.0)

    assert isinstance(Answers(3), ItemEvaluator) and not isinstance(Plain(), ItemEvaluator)
    with pytest.raises(Exception, match="does not score single items"):
        Fitness(Plain(), "racing")
    with pytest.raises(Exception, match="use one of"):
        Fitness(Answers(3), "fast")


# -- the evolve loop ----------------------------------------------------------------------------


def write_texts(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 99), rng.randrange(10, 99)
        rows.append({"text": f"{a}+{b}={a + b} " + "".join(rng.choice("abcdefgh") for _ in range(6))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def loss_recipe(tmp_path: Path, family: dict, fitness: dict, trials: int) -> Path:
    recipe = {
        "name": "fit", "base": str(family["base"]),
        "models": [{"model": str(family[k]), "name": k} for k in ("m1", "m2")],
        "merge": {"method": "ties", "search": {"weight": [0, 1], "density": [0.1, 1]}, "granularity": "per_source"},
        "evaluator": {"kind": "loss", "data": {"path": str(write_texts(tmp_path / "texts.jsonl"))}, "batch_size": 40},
        "search": {"sampler": "random", "trials": trials, "fitness": fitness}, "seed": 3,
        "baselines": [{"name": "m1", "source": "m1"}, {"name": "base", "source": "base"}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def records(run: Path) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in (run / "trials").glob("*.json")}


def test_racing_run_records_stopped_trials_and_resumes_the_same_comparison(llama_fp32, tmp_path):
    recipe = loss_recipe(tmp_path, llama_fp32, {"mode": "racing", "chunk": 5}, trials=6)
    run = tmp_path / "run"
    Evolution(recipe, run_dir=run).run(show_progress=False)
    first = records(run)
    full = {n: r for n, r in first.items() if r["fitness"]["full"]}
    incumbent = max(full, key=lambda n: first[n]["score"])

    resumed = Evolution(recipe, run_dir=run)
    study = resumed.study()
    resumed.fitness.prepare(run)
    resumed._recover_incumbent(study)
    assert resumed.fitness.incumbent.trial == incumbent
    rec = first[incumbent]["fitness"]
    assert [resumed.fitness.incumbent.values[i] for i in rec["items"]] == rec["values"]
    assert resumed.fitness.order == json.loads((run / "fitness.json").read_text())["order"]

    outcome = resumed.run(trials=14, show_progress=False)
    everything = records(run)
    assert len(everything) == 14
    stopped = [r for r in everything.values() if r["fitness"]["stopped"]]
    assert stopped, "no trial was stopped early"
    order = resumed.fitness.order
    for r in stopped:
        seen = r["fitness"]["items"]
        assert 0 < len(seen) < 40 and seen == order[:len(seen)] and len(r["fitness"]["values"]) == len(seen)
        assert r["score"] < outcome.best_value
    best = json.loads((run / "best.json").read_text())
    assert best["metrics"]["fitness_full"] and best["score"] == max(r["score"] for r in everything.values())
    study = resumed.study()
    attrs = [t.user_attrs for t in study.trials]
    assert sum(a["items_scored"] for a in attrs) == sum(len(r["fitness"]["items"]) for r in everything.values())
    assert search_cost(attrs, run)["items_scored"] < 14 * 40
    report = write_report(run)["summary"].read_text()
    t = study.trials[max(n for n, r in everything.items() if r["fitness"]["stopped"])]
    assert f" {t.number}:{t.user_attrs['items_scored']}* " in report + " "


def test_estimated_run_rescores_the_best_on_every_item(llama_fp32, tmp_path):
    recipe = loss_recipe(tmp_path, llama_fp32, {"mode": "estimated", "anchors": 10, "rescore": 3}, trials=6)
    run = tmp_path / "run"
    evo = Evolution(recipe, run_dir=run)
    outcome = evo.run(show_progress=False)
    rescored = json.loads((run / "rescored.json").read_text())
    assert len(rescored) == 3
    for r in records(run).values():
        assert len(r["fitness"]["items"]) == 10 and r["fitness"]["items"] == evo.fitness.order[:10]
    best = json.loads((run / "best.json").read_text())
    assert str(best["trial"]) in rescored
    # the exported score is a real full-set score of the winner's merge
    real = evo.evaluator(evo.candidates.apply(best["values"]))
    assert best["score"] == pytest.approx(real.score, rel=1e-5) and outcome.best_value == best["score"]
    assert best["metrics"]["loglik"] == pytest.approx(real.score, rel=1e-5)
    assert best["metrics"]["perplexity"] == pytest.approx(real.metrics["perplexity"], rel=0.05)  # mean of chunks'
    assert best["metrics"]["n"] == 40
    assert best["score"] == max(e["score"] for e in rescored.values() if e["full"])
    study = evo.study()
    cost = search_cost([t.user_attrs for t in study.trials], run)
    assert cost["items_scored"] == 6 * 10 + sum(e["items_scored"] for e in rescored.values())
    # a rerun finds the re-scores done and scores nothing more
    again = Evolution(recipe, run_dir=run).run(show_progress=False)
    assert again.best_value == outcome.best_value
    assert json.loads((run / "rescored.json").read_text()) == rescored
    summary = write_report(run)["summary"].read_text()
    assert f"trial {best['trial']} with {best['score']:.4f}" in summary
    assert f"{best['trial']}:30" in summary.split("re-scored on every item")[1].splitlines()[0]


def test_demo_fitness_choice_is_recorded_in_its_recipe(tmp_path):
    from evomerge.errors import EvomergeError
    from evomerge.pipelines.demo import concrete_recipe
    from evomerge.recipe import load_recipe

    for choice, mode in (("full", "full"), ("fast", "estimated")):
        path = tmp_path / f"{choice}.yaml"
        path.write_text(concrete_recipe(tmp_path / "world", 0, fitness=choice))
        assert load_recipe(path).search.fitness.mode == mode
    with pytest.raises(EvomergeError, match="--fitness 'quick': use full or fast"):
        concrete_recipe(tmp_path / "world", 0, fitness="quick")
