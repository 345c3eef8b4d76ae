"""Word problems with verifiable answers: generated offline (arithmetic), or read from a user's JSONL.

Mind's Mirror is measured on SVAMP, CommonsenseQA and ANLI, none of which ships offline (``../shared/
BASELINES.md`` section 3). `make_problems` writes arithmetic word problems instead: five kinds (shopping, sharing,
speed and time, ages, collections), one or two steps each, with small numbers a small model can work with. Every
problem carries the equation it was built from, and its answer is that equation's value, a non-negative integer
by construction (a division is only written where it comes out even, a subtraction only where it stays
non-negative). The same seed gives the same problems.

`load_problems` reads the same `Problem` rows from a user's JSONL (``question`` and ``answer`` per line, e.g.
SVAMP, GSM8K or one's own data), so every source takes the same path; `split_problems` splits them into train
and test by seed, with no question text on both sides.

Examples:
    >>> ps = make_problems(3, seed=0)
    >>> [p.steps for p in ps], all(answers_match(p.answer, p.equation) for p in ps)
    ([1, 1, 2], True)
    >>> train, test = split_problems(make_problems(8), test_fraction=0.25)
    >>> len(train), len(test)
    (6, 2)
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .extract import answers_match, evaluate_expression, normalize_answer, normalize_number

__all__ = ["Problem", "make_problems", "split_problems", "load_problems", "ARITHMETIC", "KINDS",
           "DEFAULT_N_PROBLEMS"]

#: The source name of the generated problems in `load_problems`.
ARITHMETIC = "arithmetic"
#: The kinds of generated problems.
KINDS = ("shopping", "sharing", "speed", "ages", "collections")
#: Problems `load_problems("arithmetic")` makes without a ``limit``.
DEFAULT_N_PROBLEMS = 200


@dataclass(frozen=True)
class Problem:
    """A word problem with its verifiable answer.

    Attributes:
        question: the problem text (the user's question to the teacher and the student).
        answer: the gold answer as a normalised number string (``"12"``, ``"2.5"``).
        equation: an arithmetic expression whose value is the answer (``None`` where a user's data has none).
        steps: arithmetic operations the problem takes (``None`` where unknown).
        kind: what the problem is about (a generated problem's template family; ``None`` for a user's data).

    Examples:
        >>> Problem("How many legs do 2 cats have?", "8", "2 * 4", 1).answer
        '8'
    """

    question: str
    answer: str
    equation: str | None = None
    steps: int | None = None
    kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The problem as a JSON-ready dict (the fields)."""
        return asdict(self)


_NAMES = [("Mia", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
          ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lily", "she", "her"), ("Ravi", "he", "his"),
          ("Emma", "she", "her"), ("Sam", "he", "his"), ("Nina", "she", "her"), ("Tom", "he", "his"),
          ("Hana", "she", "her"), ("Ben", "he", "his"), ("Ella", "she", "her"), ("Kofi", "he", "his")]
_ITEMS = ["notebooks", "pencils", "apples", "comic books", "toy cars", "cupcakes", "bottles of juice", "candles",
          "rulers", "mugs"]
_EXTRAS = ["backpack", "lunch box", "pen case", "water bottle", "scarf", "hat"]
_THINGS = ["cookies", "marbles", "stickers", "grapes", "crayons", "cherries", "beads", "candies"]
_VEHICLES = ["train", "bus", "car", "truck", "tram", "boat"]
_RELATIVES = [("brother", "older"), ("sister", "older"), ("cousin", "older")]
_ELDERS = ["mother", "father", "aunt", "uncle"]
_COLLECTIBLES = ["stamps", "seashells", "trading cards", "coins", "postcards", "stickers", "badges"]

#: One template: ``rng -> (question, equation, steps, kind)``.
_Template = Callable[[random.Random], tuple[str, str, int, str]]


def _person(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(_NAMES)


def _other(rng: random.Random, name: str) -> str:
    return rng.choice([n for n, _, _ in _NAMES if n != name])


def _shopping_1(rng: random.Random) -> tuple[str, str, int, str]:
    (name, he, _), item = _person(rng), rng.choice(_ITEMS)
    a, p = rng.randint(2, 9), rng.randint(2, 12)
    return (f"{name} buys {a} {item} that cost {p} dollars each. How many dollars does {he} spend?",
            f"{a} * {p}", 1, "shopping")


def _shopping_2(rng: random.Random) -> tuple[str, str, int, str]:
    (name, he, _), item = _person(rng), rng.choice(_ITEMS)
    a, p = rng.randint(2, 8), rng.randint(2, 10)
    if rng.random() < 0.5:
        extra, q = rng.choice(_EXTRAS), rng.randint(3, 25)
        return (f"{name} buys {a} {item} at {p} dollars each and a {extra} for {q} dollars. How many dollars does "
                f"{he} spend in total?", f"{a} * {p} + {q}", 2, "shopping")
    bill = next(b for b in (20, 50, 100) if b >= a * p)
    return (f"{name} has {bill} dollars. {he.capitalize()} buys {a} {item} at {p} dollars each. How many dollars "
            f"does {he} have left?", f"{bill} - {a} * {p}", 2, "shopping")


def _sharing_1(rng: random.Random) -> tuple[str, str, int, str]:
    name, _, _ = _person(rng)
    thing, k, each = rng.choice(_THINGS), rng.randint(2, 9), rng.randint(2, 12)
    return (f"{name} has {k * each} {thing} and shares them equally among {k} friends. How many {thing} does each "
            "friend get?", f"{k * each} / {k}", 1, "sharing")


def _sharing_2(rng: random.Random) -> tuple[str, str, int, str]:
    (name, he, _), thing = _person(rng), rng.choice(_THINGS)
    k, each = rng.randint(2, 6), rng.randint(2, 10)
    total = k * each
    divisors = [d for d in range(2, 10) if total % d == 0]  # k itself divides the total
    bags = rng.choice([d for d in divisors if d != k] or divisors)
    per = total // bags
    return (f"{name} has {bags} bags with {per} {thing} in each bag. {he.capitalize()} shares all the {thing} "
            f"equally among {k} friends. How many {thing} does each friend get?", f"{bags} * {per} / {k}", 2,
            "sharing")


def _speed_1(rng: random.Random) -> tuple[str, str, int, str]:
    vehicle, v, t = rng.choice(_VEHICLES), rng.choice(range(10, 70, 5)), rng.randint(2, 5)
    return (f"A {vehicle} travels at {v} kilometres per hour for {t} hours. How many kilometres does it travel?",
            f"{v} * {t}", 1, "speed")


def _speed_2(rng: random.Random) -> tuple[str, str, int, str]:
    vehicle = rng.choice(_VEHICLES)
    v1, v2 = rng.sample(range(10, 70, 10), 2)
    t1, t2 = rng.randint(1, 4), rng.randint(1, 3)
    return (f"A {vehicle} travels at {v1} kilometres per hour for {t1} hours and then at {v2} kilometres per hour "
            f"for {t2} hours. How many kilometres does it travel in total?", f"{v1} * {t1} + {v2} * {t2}", 2,
            "speed")


def _ages_1(rng: random.Random) -> tuple[str, str, int, str]:
    (name, _, his), (rel, _) = _person(rng), rng.choice(_RELATIVES)
    x, d = rng.randint(5, 15), rng.randint(1, 9)
    if rng.random() < 0.5:
        return (f"{name} is {x} years old. {his.capitalize()} {rel} is {d} years older. How old is {his} {rel}?",
                f"{x} + {d}", 1, "ages")
    x = max(x, d + 1)
    return (f"{name} is {x} years old. {his.capitalize()} {rel} is {d} years younger. How old is {his} {rel}?",
            f"{x} - {d}", 1, "ages")


def _ages_2(rng: random.Random) -> tuple[str, str, int, str]:
    name, _, his = _person(rng)
    x, y = rng.randint(4, 12), rng.randint(2, 10)
    if rng.random() < 0.5:
        rel, _ = rng.choice(_RELATIVES)
        d = rng.randint(1, 9)
        return (f"{name} is {x} years old. {his.capitalize()} {rel} is {d} years older. How old will {his} {rel} be "
                f"in {y} years?", f"{x} + {d} + {y}", 2, "ages")
    elder, f = rng.choice(_ELDERS), rng.randint(3, 5)
    return (f"{name} is {x} years old. {his.capitalize()} {elder} is {f} times as old as {name}. How old will "
            f"{his} {elder} be in {y} years?", f"{x} * {f} + {y}", 2, "ages")


def _collections_1(rng: random.Random) -> tuple[str, str, int, str]:
    (name, he, _), things = _person(rng), rng.choice(_COLLECTIBLES)
    a, b = rng.randint(10, 60), rng.randint(2, 30)
    if rng.random() < 0.5:
        return (f"{name} has {a} {things}. {he.capitalize()} gets {b} more from a friend. How many {things} does "
                f"{he} have now?", f"{a} + {b}", 1, "collections")
    b = min(b, a)
    return (f"{name} has {a} {things}. {he.capitalize()} gives {b} of them to {_other(rng, name)}. How many "
            f"{things} does {he} have left?", f"{a} - {b}", 1, "collections")


def _collections_2(rng: random.Random) -> tuple[str, str, int, str]:
    (name, he, _), things = _person(rng), rng.choice(_COLLECTIBLES)
    a, b = rng.randint(10, 50), rng.randint(2, 20)
    c = rng.randint(1, a + b)
    return (f"{name} has {a} {things}. {he.capitalize()} buys {b} more and then gives {c} to {_other(rng, name)}. "
            f"How many {things} does {he} have now?", f"{a} + {b} - {c}", 2, "collections")


_TEMPLATES: dict[int, list[_Template]] = {
    1: [_shopping_1, _sharing_1, _speed_1, _ages_1, _collections_1],
    2: [_shopping_2, _sharing_2, _speed_2, _ages_2, _collections_2],
}


def make_problems(n: int, *, seed: int = 0, steps: Sequence[int] = (1, 2)) -> list[Problem]:
    """``n`` distinct arithmetic word problems with verified non-negative integer answers.

    The templates (five kinds times the asked step counts) take turns in a seeded order, so even a few problems
    cover several kinds; the numbers are drawn from the seeded generator.

    Args:
        n: how many problems.
        seed: the same seed gives the same problems.
        steps: the step counts to draw from: ``(1,)``, ``(2,)`` or ``(1, 2)``.

    Returns:
        `Problem` rows with ``equation``, ``steps`` and ``kind`` set; no question text twice.

    Examples:
        >>> make_problems(2, steps=(1,))[0].steps
        1
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}.")
    chosen = sorted(set(steps))
    if not chosen or any(s not in _TEMPLATES for s in chosen):
        raise ValueError(f"steps must be a non-empty subset of {sorted(_TEMPLATES)}, got {tuple(steps)!r}.")
    rng = random.Random(f"icon2_lens.distill.problems:{seed}")
    pool = [t for s in chosen for t in _TEMPLATES[s]]
    out: list[Problem] = []
    seen: set[str] = set()
    order: list[_Template] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 100:
            raise RuntimeError(f"Could only make {len(out)} distinct problems of {n}; ask for fewer.")
        if not order:
            order = rng.sample(pool, len(pool))
        question, equation, n_steps, kind = order.pop()(rng)
        if question in seen:
            continue
        value = evaluate_expression(equation)
        if value is None or value.denominator != 1 or value < 0:  # never: the templates build whole answers
            raise AssertionError(f"Template {kind} made {equation!r}, whose value is not a non-negative integer.")
        seen.add(question)
        out.append(Problem(question, normalize_number(value), equation, n_steps, kind))
    return out


def _key(question: str) -> str:
    return " ".join(question.lower().split())


def split_problems(problems: Sequence[Problem], *, test_fraction: float = 0.25,
                   seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Split into train and test by seed; a question text (case and spacing ignored) is never on both sides.

    Distinct question texts are shuffled with the seed and the first ``round(test_fraction * n)`` go to test
    (at least one on each side when there are two or more); repeated questions follow their text. Each split
    keeps the input's order.

    Examples:
        >>> train, test = split_problems(make_problems(10), test_fraction=0.3, seed=1)
        >>> len(test), {p.question for p in train} & {p.question for p in test}
        (3, set())
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    keys = list(dict.fromkeys(_key(p.question) for p in problems))
    if len(keys) < 2:
        raise ValueError(f"Need at least two distinct questions to split, got {len(keys)}.")
    n_test = min(max(round(test_fraction * len(keys)), 1), len(keys) - 1)
    shuffled = random.Random(f"icon2_lens.distill.split:{seed}").sample(keys, len(keys))
    test_keys = set(shuffled[:n_test])
    train = [p for p in problems if _key(p.question) not in test_keys]
    test = [p for p in problems if _key(p.question) in test_keys]
    return train, test


_FORMAT = ("write one JSON object per line with 'question' (text) and 'answer' (a number, or a GSM8K-style solution "
           "ending '#### <number>'), and optionally 'equation' and 'steps'")


def _parse_row(row: Any, where: str) -> Problem:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}; {_FORMAT}.")
    missing = [k for k in ("question", "answer") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}; {_FORMAT}.")
    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string.")
    raw = row["answer"]
    if isinstance(raw, str) and "####" in raw:  # GSM8K: the solution, then '#### <answer>'
        raw = raw.rsplit("####", 1)[1]
    answer = None if isinstance(raw, bool) or not isinstance(raw, (str, int, float)) else normalize_answer(raw)
    if answer is None:
        raise ValueError(f"{where}: 'answer' {row['answer']!r} is not a number (answers are checked numerically).")
    equation = row.get("equation")
    if equation is not None and not isinstance(equation, str):
        raise ValueError(f"{where}: 'equation' must be a string, got {equation!r}.")
    if equation is not None and evaluate_expression(equation) is not None and not answers_match(equation, answer):
        raise ValueError(f"{where}: 'equation' {equation!r} does not give the answer {answer}.")
    steps = row.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"{where}: 'steps' must be a non-negative integer, got {steps!r}.")
    kind = row.get("kind")
    return Problem(question.strip(), answer, equation, steps, str(kind) if kind is not None else None)


def load_problems(source: str | os.PathLike[str] | Sequence[Problem] | Sequence[Mapping[str, Any]], *,
                  limit: int | None = None, seed: int = 0) -> list[Problem]:
    """Problems from the generator, a user's JSONL file, or rows in memory.

    Args:
        source: ``"arithmetic"`` (`make_problems`: ``limit`` problems, `DEFAULT_N_PROBLEMS` without one), a
            ``.jsonl`` file (one object per line: ``question``, ``answer``, optional ``equation``, ``steps``,
            ``kind``; a GSM8K answer is read after its ``####``), a list of such dicts, or a list of `Problem`.
        limit: keep the first ``limit``.
        seed: the generator's seed (``"arithmetic"`` only).

    Returns:
        `Problem` rows, answers normalised (``"1,200"`` -> ``"1200"``).

    Examples:
        >>> len(load_problems("arithmetic", limit=5))
        5
        >>> load_problems([{"question": "What is 2 + 3?", "answer": 5}])[0].answer
        '5'
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer (or None), got {limit!r}.")
    problems: list[Problem]
    if isinstance(source, str) and source == ARITHMETIC:
        return make_problems(limit or DEFAULT_N_PROBLEMS, seed=seed)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Problem file {path} does not exist; pass '{ARITHMETIC}' for generated "
                                    f"problems, or a JSONL file: {_FORMAT}.")
        problems = []
        for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {i}: not JSON ({exc.msg}); {_FORMAT}.") from None
            problems.append(_parse_row(row, f"{path}, line {i}"))
            if limit is not None and len(problems) >= limit:
                break
    else:
        rows = list(source)
        problems = [r if isinstance(r, Problem) else _parse_row(r, f"row {i}") for i, r in enumerate(rows)]
    problems = problems[:limit] if limit is not None else problems
    if not problems:
        raise ValueError(f"No problems in {source if isinstance(source, (str, os.PathLike)) else 'the given rows'}.")
    return problems
