"""Tool-use environments for agentic OPD and evaluation.

An environment holds a task family (its tasks and whatever database its tools query). `reset(task)` opens one
episode: the opening messages, the tool schemas (OpenAI function format), `step(call)` -> the tool's result as text,
and `score(final)` -> metrics of the final answer. Every `score` returns `accuracy`, the benchmark's per-task headline
(toy: the answer is right; shopping: the cart is the answer key; travel: case_acc), so training logs
`rollout/accuracy` for any environment.

| name | what | needs |
|---|---|---|
| `toy_agent` | price lookups in a generated table + a calculator (tip_cli.envs.toy_agent) | nothing |
| `deepplanning_shopping` | DeepPlanning shopping (tip_cli.envs.shopping) | the `Qwen/DeepPlanning` database |
| `deepplanning_travel` | DeepPlanning travel (tip_cli.envs.travel) | the `Qwen/DeepPlanning` database |
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tip_cli.config import ConfigError, DatasetConfig, PairConfig


@dataclass
class Task:
    id: str
    prompt: str  # the user's request
    meta: dict[str, Any] = field(default_factory=dict)  # what the env needs to run and score it


@dataclass
class ToolCall:
    """One call parsed from the model's output; `error` says why it could not be parsed (then name may be "")."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None


class Episode(ABC):
    """One rollout's state: the opening conversation, tool execution, and the score of the final answer."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]

    @abstractmethod
    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Run a tool whose name is in `tools`; bad arguments raise TypeError/ValueError/KeyError."""

    @abstractmethod
    def score(self, final: str) -> dict[str, float]:
        """Metrics of the final answer (and of the state the episode's tools left behind); includes `accuracy`."""

    def step(self, call: ToolCall) -> str:
        """The tool result for `call`, or an error message for the model: never raises on what the model wrote."""
        if call.error:
            return f"Error: {call.error}"
        names = [t["function"]["name"] for t in self.tools]
        if call.name not in names:
            return f"Error: unknown tool {call.name!r}; available tools: {', '.join(names)}"
        try:
            return self.call(call.name, call.arguments)
        except (TypeError, ValueError, KeyError) as err:
            return f"Error: {call.name} failed: {err}"


class Environment(ABC):
    """A task family: its tasks and a factory of episodes over one loaded database."""

    @abstractmethod
    def tasks(self) -> list[Task]:
        """The tasks of the configured split."""

    @abstractmethod
    def reset(self, task: Task) -> Episode:
        """A fresh episode of `task`."""

    def aggregate(self, means: dict[str, float]) -> dict[str, float]:
        """Benchmark-level metrics derived from the episode means (e.g. a ratio of totals); none by default."""
        return {}


def _registry() -> dict[str, Callable[[DatasetConfig, PairConfig], Environment]]:
    from tip_cli.envs.shopping import ShoppingEnv
    from tip_cli.envs.toy_agent import ToyAgentEnv
    from tip_cli.envs.travel import TravelEnv

    return {"toy_agent": ToyAgentEnv, "deepplanning_shopping": ShoppingEnv, "deepplanning_travel": TravelEnv}


ENVS = ("toy_agent", "deepplanning_shopping", "deepplanning_travel")


def make_env(cfg: DatasetConfig, pair: PairConfig) -> Environment:
    """The environment `cfg.env` names, over `cfg`'s tasks and database (`pair`: for a scorer that needs a model)."""
    registry = _registry()
    if cfg.env not in registry:
        raise ConfigError(f"{cfg.name}.env={cfg.env!r} is not valid; expected one of: {', '.join(registry)}")
    return registry[cfg.env](cfg, pair)


def tool_schema(name: str, description: str, **params: str) -> dict[str, Any]:
    """An OpenAI function schema whose parameters are all required strings, described by `params`."""
    props = {k: {"type": "string", "description": v} for k, v in params.items()}
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": props, "required": list(params)}}}


def dumps(value: Any) -> str:
    """Tool results as compact JSON (non-ASCII kept, so Chinese databases stay readable to the model)."""
    return json.dumps(value, ensure_ascii=False)
