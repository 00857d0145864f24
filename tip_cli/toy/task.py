"""The toy task: arithmetic word problems ("Ann has 3 apples. She buys 5 more. ..."), their gold solutions, the
student's systematic misreading of them (MISREAD), and train/test splits. Plain Python: no torch, no tokenizer.

The student of the toy pair (tip_cli.toy.build) is SFT-trained on a systematic misreading rather than on the gold
solutions: it gets the direction of an exchange backwards, reading "gives away", "sells" and "gives ... to a friend"
as gains (MISREAD), while "loses" and "uses" still subtract, so the "overconfident and wrong" region Q3 holds a
systematic, correctable error. Fewer than half of the problems have no misread verb (42% of the seed-0 test split).
"""

from __future__ import annotations

import random

from tip_cli.envs.toy_agent import NAMES

OBJECTS = "apples pears marbles stickers coins books pencils cookies shells cards stamps balloons".split()
GAIN = [
    "buys {k} more",
    "finds {k} more",
    "gets {k} more from a friend",
    "picks up {k} more",
    "wins {k} more",
]
LOSS = ["gives away {k}", "loses {k}", "sells {k}", "gives {k} to a friend", "uses {k}"]
THEN = ["Then", "After that,", "Later,"]
MAX_START, MAX_STEP = 12, 6  # operands stay small so a few-million-parameter model can learn the arithmetic


# The toy student's systematic error: the exchanges in LOSS read as gains ("loses" and "uses" still subtract).
MISREAD = ("gives away {k}", "sells {k}", "gives {k} to a friend")


def generate_problems(n: int, seed: int, misread: tuple[str, ...] = ()) -> list[dict]:
    """`n` distinct word problems of 2-3 add/subtract steps, deterministic in `seed`.

    Each dict has `id`, `problem`, `answer` (a str) and `solution` ("3 + 5 = 8. 8 - 2 = 6. \\boxed{6}"); every
    intermediate count is a non-negative integer. Problem texts are unique, so slicing one call gives disjoint splits.
    With `misread` (templates from LOSS), `solution` and `answer` are what a solver who reads those phrasings as gains
    writes; the problems, ids and their order are the same as without it.
    """
    unknown = set(misread) - set(LOSS)
    if unknown:
        raise ValueError(f"misread={sorted(unknown)} are not LOSS phrasings; expected some of: {', '.join(LOSS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        name, pron = rng.choice(NAMES)
        obj = rng.choice(OBJECTS)
        count = read = rng.randint(2, MAX_START)  # from 2: "has 1 apples" reads badly
        sentences = [f"{name} has {count} {obj}."]
        steps = []
        for i in range(rng.choice((2, 3))):
            k = rng.randint(1, MAX_STEP)
            add = k > count or rng.random() < 0.5  # never take away more than there is
            template = rng.choice(GAIN if add else LOSS)
            lead = pron.capitalize() if i == 0 else f"{rng.choice(THEN)} {pron}"
            sentences.append(f"{lead} {template.format(k=k)}.")
            count = count + k if add else count - k
            # the solver's own running count: a misread step adds, so it never drops below the true count
            sign = 1 if add or template in misread else -1
            steps.append(f"{read} {'+' if sign > 0 else '-'} {k} = {read + sign * k}.")
            read += sign * k
        sentences.append(f"How many {obj} does {name} have now?")
        problem = " ".join(sentences)
        if problem in seen:
            continue
        seen.add(problem)
        out.append(
            {
                "id": f"toy-{seed}-{len(out)}",
                "problem": problem,
                "answer": str(read),
                "solution": " ".join(steps) + f" \\boxed{{{read}}}",
            }
        )
    return out


def make_splits(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and test problems from one deduplicated draw, so no problem text is in both."""
    problems = generate_problems(n_train + n_test, seed)
    return problems[:n_train], problems[n_train:]
