"""Agentic rollouts: the student writes, calls tools, reads their results, and continues, in one token sequence.

An episode is one row of token ids with a mask: 1 for tokens the student generated, 0 for the prompt and for the
tool results (and chat-template glue) the environment appended. `pack` turns the mask into `Batch.target_mask`
(position t predicts token t + 1), so the teacher scores the same sequence and the statistics, the selection and
the loss see only model tokens (SPEC section 1). Tool calls use the Hermes format of Qwen's chat templates:

    <tool_call>
    {"name": "lookup", "arguments": {"item": "apples"}}
    </tool_call>

A turn without a tool call is the final answer. An episode also ends at `agent.max_turns` turns or when the
sequence reaches `agent.max_tokens`; a call that cannot be parsed goes back to the model as an error tool message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from tip_cli.config.schema import AgentConfig, ConfigError, DatasetConfig, PairConfig
from tip_cli.envs.base import Environment, Episode, Task, ToolCall
from tip_cli.errors import DataError
from tip_cli.rollout.batch import Batch, Sampling, pack_masked
from tip_cli.seeds import derive_seed

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` block of a turn, in order; [] means the turn is a final answer.

    A block that is not closed, not JSON, not an object with a string `name`, or whose `arguments` are not an object
    (a JSON string holding one is accepted, as some models double-encode) comes back with `error` set.
    """
    calls = []
    for found in _BLOCK.finditer(text):
        body, closed = found.group(1).strip(), found.group(0).endswith(TOOL_CALL_CLOSE)
        if not closed:
            calls.append(ToolCall("", {}, f"the tool call is not closed with {TOOL_CALL_CLOSE}"))
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(ToolCall("", {}, f"the tool call is not valid JSON ({err.msg} at char {err.pos}): {body[:200]}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall("", {}, 'a tool call must be a JSON object {"name": ..., "arguments": {...}}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], {}, f"the arguments of {obj['name']} must be a JSON object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls


def render_chat(tok: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict], pair: PairConfig) -> list[int]:
    """Token ids of the opening conversation with its tools, ending with the assistant header."""
    text = tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False,
                                   **pair.chat_template_kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


_SENTINEL = "TIP-AGENT-TURN-END"


def tool_turn_ids(tok: PreTrainedTokenizerBase, results: list[str], pair: PairConfig) -> list[int]:
    """Token ids that follow an assistant turn's end-of-turn token: the tool messages and the next assistant header.

    The template renders a sentinel assistant turn followed by the tool messages; what comes after that turn's
    end-of-turn token is the delta, whatever the template's own tool format is.
    """
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL},
            *({"role": "tool", "content": r} for r in results)]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **pair.chat_template_kwargs)
    turn = text.find(_SENTINEL)
    end = text.find(tok.eos_token, turn) if turn >= 0 else -1
    if end < 0:
        raise ConfigError(
            f"the chat template does not end an assistant turn with the tokenizer's EOS {tok.eos_token!r}, so tool "
            "results cannot be appended after a turn; agent rollouts need a chat model whose turns end with its EOS "
            "(e.g. Qwen's <|im_end|>), or set pair.chat_template"
        )
    return tok(text[end + len(tok.eos_token):], add_special_tokens=False)["input_ids"]


@dataclass
class Trajectory:
    task: Task
    ids: list[int]  # prompt, then model turns and tool results interleaved
    model_mask: list[bool]  # [len(ids)] True where the student generated the token
    final: str = ""  # the last model turn's text
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    answered: bool = False  # ended with a turn without tool calls (not at a cap)
    metrics: dict[str, float] | None = None  # the environment's score

    @property
    def model_tokens(self) -> int:
        return sum(self.model_mask)


def rollout(engine, tok: PreTrainedTokenizerBase, env: Environment, tasks: list[Task], sampling: Sampling,
            agent: AgentConfig, pair: PairConfig, stop_ids: set[int]) -> list[Trajectory]:
    """`sampling.n` episodes per task ([t0s0, t0s1, ..., t1s0, ...]), their turns generated in batches, scored."""
    episodes: list[Episode] = [env.reset(t) for t in tasks for _ in range(sampling.n)]
    trajs = []
    for ep, task in zip(episodes, [t for t in tasks for _ in range(sampling.n)], strict=True):
        ids = render_chat(tok, ep.messages, ep.tools, pair)
        trajs.append(Trajectory(task, ids, [False] * len(ids)))
    active = [i for i, t in enumerate(trajs) if len(t.ids) < agent.max_tokens]
    for turn in range(agent.max_turns):
        if not active:
            break
        # each turn its own seed: reseeded with the call's seed, turn 2 would replay turn 1's noise
        seed = None if sampling.seed is None else derive_seed(sampling.seed, turn)
        turns = engine.generate([trajs[i].ids for i in active], replace(sampling, n=1, seed=seed)).tokens
        still = []
        for i, toks in zip(active, turns, strict=True):
            t, ep = trajs[i], episodes[i]
            toks = toks[: agent.max_tokens - len(t.ids)]
            t.ids += toks
            t.model_mask += [True] * len(toks)
            t.turns += 1
            ended = bool(toks) and toks[-1] in stop_ids
            t.final = tok.decode(toks[:-1] if ended else toks, skip_special_tokens=False)
            calls = parse_tool_calls(t.final)
            if not ended or not calls:
                t.answered = ended
                continue
            results = [ep.step(c) for c in calls]
            t.tool_calls += len(calls)
            t.tool_errors += sum(r.startswith("Error:") for r in results)
            delta = tool_turn_ids(tok, results, pair)
            if len(t.ids) + len(delta) >= agent.max_tokens:
                continue
            t.ids += delta
            t.model_mask += [False] * len(delta)
            still.append(i)
        active = still
    for t, ep in zip(trajs, episodes, strict=True):
        t.metrics = ep.score(t.final if t.answered else "")
    return trajs


def pack(trajs: list[Trajectory], pad_id: int) -> Batch:
    """Right-padded rows; target_mask[b, t] is True where token t + 1 was generated by the student."""
    return pack_masked([t.ids for t in trajs], [t.model_mask[1:] for t in trajs], pad_id)


def summarize(trajs: list[Trajectory], env: Environment) -> dict[str, float]:
    """Means over episodes of the environment's metrics (plus its aggregates) and of the episode shape."""
    n = len(trajs)
    out: dict[str, float] = {}
    for key in trajs[0].metrics or {}:
        out[key] = sum(t.metrics[key] for t in trajs) / n
    out |= env.aggregate(out)
    out |= {
        "turns": sum(t.turns for t in trajs) / n,
        "tool_calls": sum(t.tool_calls for t in trajs) / n,
        "tool_error_rate": sum(t.tool_errors for t in trajs) / max(1, sum(t.tool_calls for t in trajs)),
        "answered": sum(t.answered for t in trajs) / n,
        "response_len": sum(t.model_tokens for t in trajs) / n,
    }
    return out


def records(trajs: list[Trajectory], tok: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """One record per episode for results.json: the task, the whole conversation as text, the score."""
    return [{"id": t.task.id, "prompt": t.task.prompt, "transcript": tok.decode(t.ids, skip_special_tokens=False),
             "final": t.final, "turns": t.turns, "tool_calls": t.tool_calls, "answered": t.answered,
             "metrics": t.metrics} for t in trajs]


def rollout_metrics(trajs: list[Trajectory], env: Environment) -> dict[str, float]:
    """A training step's `rollout/*` metrics: SPEC's response_len (model tokens) and accuracy, plus the episode shape."""
    return {f"rollout/{k}": v for k, v in summarize(trajs, env).items()}


class TaskSource:
    """An environment's tasks as a training-prompt source: `rollout(engine, indices, sampling)` runs their episodes,
    each within `agent`'s turn and token limits, in `pair`'s chat template."""

    def __init__(self, data: DatasetConfig, agent: AgentConfig, pair: PairConfig, tok: PreTrainedTokenizerBase,
                 stop_ids: set[int], env: Environment):
        self.agent, self.pair, self.tok, self.stop_ids, self.env = agent, pair, tok, stop_ids, env
        self.tasks = self.env.tasks()
        if not self.tasks:
            raise DataError(f"data.env={data.env}: no tasks in split {data.split!r}")

    def __len__(self) -> int:
        return len(self.tasks)

    def rollout(self, engine, indices: list[int], sampling: Sampling) -> list[Trajectory]:
        return rollout(engine, self.tok, self.env, [self.tasks[i] for i in indices], sampling, self.agent,
                       self.pair, self.stop_ids)
