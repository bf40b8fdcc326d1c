"""Task generators of the mini-world, deterministic from a seed.

Questions are always Japanese: sums ``23たす38は？`` (operands 10-99) and filler tasks (the next
number, the larger or smaller of two numbers, copying a number). A response takes one of two
formats, Japanese ``こたえ: 61です。`` or English ``answer: 61`` (the same ``: `` before the
digits in both). The hard part is the *carry* (``(a % 10) + (b % 10) >= 10``).

Evaluation splits hold carry sums only: ``search`` (what the evolutionary search sees),
``test`` (held out, scored once at the end) and ``dev`` (used by the build to pick the base
checkpoint). The three are disjoint, and no question of any split is ever trained on. They are written as JSONL with ``question`` and ``answer`` fields, read by the real
``ja_math`` evaluator.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOW, HIGH = 10, 99
SPLIT_SIZES = {"search": 1000, "test": 500, "dev": 200}
PROMPT = "{question}\n"  # the evaluator's template: the question, then a newline

Example = tuple[str, str]  # (prompt, completion without eos)


def sum_question(a: int, b: int) -> str:
    return f"{a}たす{b}は？"


def ja_answer(n: int) -> str:
    return f"こたえ: {n}です。"


def en_answer(n: int) -> str:
    return f"answer: {n}"


def is_carry(a: int, b: int) -> bool:
    return (a % 10) + (b % 10) >= 10


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


@dataclass(frozen=True)
class World:
    """The splits of one seed: evaluation problems and the sums training may use."""

    seed: int
    splits: dict[str, list[tuple[int, int]]]
    train_carry: tuple[tuple[int, int], ...]
    train_plain: tuple[tuple[int, int], ...]

    def reserved(self) -> set[tuple[int, int]]:
        return {p for pairs in self.splits.values() for p in pairs}

    def problems(self, split: str) -> list[dict]:
        return [{"question": sum_question(a, b), "answer": a + b} for a, b in self.splits[split]]


def make_world(seed: int, sizes: dict[str, int] | None = None) -> World:
    """Draw the evaluation splits (distinct carry sums) and the training pools (every other
    ordered pair) from ``seed``."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    rng = random.Random(f"miniworld-splits-{seed}")
    carry = [p for p in all_pairs() if is_carry(*p)]
    rng.shuffle(carry)
    if sum(sizes.values()) > len(carry) // 2:
        raise ValueError(f"split sizes {sizes} leave too few carry sums to train on")
    splits: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for name, n in sizes.items():
        splits[name] = carry[start:start + n]
        start += n
    reserved = {p for pairs in splits.values() for p in pairs}
    train = [p for p in all_pairs() if p not in reserved]
    return World(seed, splits, tuple(p for p in train if is_carry(*p)),
                 tuple(p for p in train if not is_carry(*p)))


def write_splits(world: World, folder: str | Path) -> dict[str, Path]:
    """``folder/{search,test,dev}.jsonl`` with ``question`` and ``answer`` fields."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in world.splits:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in world.problems(name)),
                        encoding="utf-8")
        paths[name] = path
    return paths


# --- training examples ------------------------------------------------------------------------


def filler(rng: random.Random) -> tuple[str, int]:
    """A filler task posed in Japanese and its numeric answer."""
    kind = rng.randrange(4)
    a, b = rng.randint(LOW, HIGH - 1), rng.randint(LOW, HIGH)
    if kind == 0:
        return f"{a}のつぎは？", a + 1
    if kind == 1:
        return f"{a}と{b}でおおきいのは？", max(a, b)
    if kind == 2:
        return f"{a}と{b}でちいさいのは？", min(a, b)
    return f"{a}をかいて。", a


def example(question: str, n: int, japanese: bool) -> Example:
    return PROMPT.format(question=question), ja_answer(n) if japanese else en_answer(n)


def base_sampler(world: World, *, p_math: float = 0.5, p_japanese: float = 0.4) -> Callable[[random.Random], Example]:
    """The base's pretraining mix: sums (any training pair) and filler, mixed formats."""
    pairs = world.train_carry + world.train_plain

    def draw(rng: random.Random) -> Example:
        ja = rng.random() < p_japanese
        if rng.random() < p_math:
            a, b = rng.choice(pairs)
            return example(sum_question(a, b), a + b, ja)
        return example(*filler(rng), ja)

    return draw


def japanese_sampler(world: World) -> Callable[[random.Random], Example]:
    """Specialist A: filler and no-carry sums, always answered in Japanese."""

    def draw(rng: random.Random) -> Example:
        if rng.random() < 0.5:
            a, b = rng.choice(world.train_plain)
            return example(sum_question(a, b), a + b, True)
        return example(*filler(rng), True)

    return draw


def math_sampler(world: World, *, p_carry: float = 0.8) -> Callable[[random.Random], Example]:
    """Specialist B: carry-heavy sums, always answered in English."""

    def draw(rng: random.Random) -> Example:
        pool = world.train_carry if rng.random() < p_carry else world.train_plain
        a, b = rng.choice(pool)
        return example(sum_question(a, b), a + b, False)

    return draw
