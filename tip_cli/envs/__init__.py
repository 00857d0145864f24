"""Tool-use environments for agentic OPD and evaluation.

An environment holds a task family (its tasks and whatever database its tools query). `reset(task)` opens one
episode: the opening messages, the tool schemas (OpenAI function format), `step(call)` -> the tool's result as text,
and `score(final)` -> metrics of the final answer. Every `score` returns `accuracy`, the benchmark's per-task headline
(toy: the answer is right; shopping: the cart is the answer key; travel: case_acc), so training logs
`rollout/accuracy` for any environment.

| name | what | needs |
|---|---|---|
| `toy_agent` | price lookups in a generated table + a calculator (tip_cli.envs.toy_agent) | nothing |
| `deepplanning_shopping` | DeepPlanning shopping (tip_cli.envs.deepplanning.shopping) | the `Qwen/DeepPlanning` database |
| `deepplanning_travel` | DeepPlanning travel (tip_cli.envs.deepplanning.travel) | the `Qwen/DeepPlanning` database |
"""

from __future__ import annotations

from collections.abc import Callable

from tip_cli.config.schema import ENVS, ConfigError, DatasetConfig, PairConfig
from tip_cli.envs.base import Environment, Resolve
from tip_cli.envs.deepplanning.shopping import ShoppingEnv
from tip_cli.envs.deepplanning.travel import TravelEnv
from tip_cli.envs.toy_agent import ToyAgentEnv

REGISTRY: dict[str, Callable[[DatasetConfig, PairConfig, Resolve | None], Environment]] = {
    "toy_agent": ToyAgentEnv, "deepplanning_shopping": ShoppingEnv, "deepplanning_travel": TravelEnv,
}
assert tuple(REGISTRY) == ENVS, "tip_cli.config.ENVS lists the environments this registry holds"


def make_env(cfg: DatasetConfig, pair: PairConfig, resolve: Resolve | None = None) -> Environment:
    """The environment `cfg.env` names, over `cfg`'s tasks and database (`pair`: for a scorer that needs a model,
    whose reference `resolve` turns into a path)."""
    if cfg.env not in REGISTRY:
        raise ConfigError(f"{cfg.name}.env={cfg.env!r} is not valid; expected one of: {', '.join(REGISTRY)}")
    return REGISTRY[cfg.env](cfg, pair, resolve)
