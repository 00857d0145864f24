"""The embedded tool-use task: a shopper pays for items whose prices only a tool knows.

"Ann buys 3 apples and 2 pears. How much does she pay?" Each task has its own price list (hidden from the model), so
the answer needs `lookup(item)` for every item and, for the total, `calculator(expression)`; the final answer is
`\\boxed{N}`. Small enough for a tiny model to learn on CPU (tip_cli.toy.agent_pair builds the pair).
"""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Any

from tip_cli.config.schema import ConfigError, DatasetConfig, PairConfig
from tip_cli.envs.base import Environment, Episode, Resolve, Task, tool_schema
from tip_cli.seeds import stream_seed

TOOLS = [
    tool_schema("lookup", "The price of one item in this shop.", item="the item, e.g. apples"),
    tool_schema("calculator", "Evaluate an arithmetic expression of integers with + - * and parentheses.",
                expression="e.g. 3 * 4 + 2 * 7"),
]
SPLITS = {"train": (0, 2000), "test": (2000, 2200)}  # task index ranges of one seeded draw: disjoint by construction
MAX_QTY, MAX_PRICE = 5, 9
ITEMS = ("apples", "pears", "coins", "books")  # few, so a tiny model learns to look up the ones the question names


NAMES = [  # (name, pronoun)
    tuple(w.split("/"))
    for w in (
        "Ann/she Ben/he Cara/she Dan/he Eva/she Finn/he Gina/she Hugo/he Iris/she Jack/he "
        "Kate/she Leo/he Mia/she Nick/he Olga/she Paul/he Rosa/she Sam/he Tina/she Omar/he"
    ).split()
]


def generate_tasks(n: int, seed: int, start: int = 0) -> list[Task]:
    """Tasks `start..start+n-1` of the seed's stream: 1 or 2 of the ITEMS bought, each task with its own prices."""
    out = []
    for i in range(start, start + n):
        rng = random.Random(stream_seed(seed, i))
        name, pron = rng.choice(NAMES)
        listed = rng.sample(ITEMS, len(ITEMS))
        prices = {item: rng.randint(1, MAX_PRICE) for item in listed}
        bought = [(item, rng.randint(1, MAX_QTY)) for item in listed[: rng.choice((1, 2))]]
        items = " and ".join(f"{q} {item}" for item, q in bought)
        prompt = f"{name} buys {items}. How much does {pron} pay?"
        answer = sum(q * prices[item] for item, q in bought)
        out.append(Task(f"toy-agent-{seed}-{i}", prompt, {"prices": prices, "bought": bought, "answer": answer}))
    return out


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> int:
    """Integer arithmetic with + - * and parentheses; anything else raises ValueError."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"cannot evaluate {expression!r}: only integers, + - * and parentheses")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse {expression!r}") from err
    return ev(tree.body)


BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


class ToyAgentEpisode(Episode):
    def __init__(self, task: Task):
        self.task, self.tools = task, TOOLS
        self.messages = [{"role": "user", "content": task.prompt}]

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        if name == "lookup":
            item = str(arguments["item"]).strip()
            if item not in self.task.meta["prices"]:
                return f"Error: no price for {item!r} in this shop"
            return str(self.task.meta["prices"][item])
        return str(calculate(str(arguments["expression"])))

    def score(self, final: str) -> dict[str, float]:
        found = BOXED.findall(final)
        return {"accuracy": float(bool(found) and int(found[-1]) == self.task.meta["answer"])}


class ToyAgentEnv(Environment):
    """`path: toy_agent://train|test` (seed from the path's `?seed=N`, default 0)."""

    def __init__(self, cfg: DatasetConfig, pair: PairConfig | None = None, resolve: Resolve | None = None):
        path = cfg.path or ""
        found = re.fullmatch(r"toy_agent://(\w+)(?:\?seed=(\d+))?", path)
        if not found or found.group(1) not in SPLITS:
            raise ConfigError(f"{cfg.name}.path={path!r}: the toy_agent env takes toy_agent://train or toy_agent://test")
        lo, hi = SPLITS[found.group(1)]
        self._tasks = generate_tasks(hi - lo, int(found.group(2) or 0), start=lo)

    def tasks(self) -> list[Task]:
        return self._tasks

    def reset(self, task: Task) -> ToyAgentEpisode:
        return ToyAgentEpisode(task)
