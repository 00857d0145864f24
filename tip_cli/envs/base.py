"""What an environment is: a task family whose episodes answer tool calls and score a final answer.

`Environment.reset(task)` opens one `Episode`: the opening messages, the tool schemas (OpenAI function format),
`step(call)` -> the tool's result as text, and `score(final)` -> metrics of the final answer (always `accuracy`).
The environments themselves, and `make_env`, are in tip_cli.envs.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# a model reference (HF id, path, toy://...) -> a loadable id or path: tip_cli.pairs.resolve_model, passed in by
# the caller so that environments do not import the embedded pairs (which are built from environments)
Resolve = Callable[[str], str]


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


def tool_schema(name: str, description: str, **params: str) -> dict[str, Any]:
    """An OpenAI function schema whose parameters are all required strings, described by `params`."""
    props = {k: {"type": "string", "description": v} for k, v in params.items()}
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": props, "required": list(params)}}}


def dumps(value: Any) -> str:
    """Tool results as compact JSON (non-ASCII kept, so Chinese databases stay readable to the model)."""
    return json.dumps(value, ensure_ascii=False)
