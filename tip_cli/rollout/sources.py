"""Where a training step's rollouts come from, and the batch they become.

`PromptSource`: single-turn prompts (tip_cli.data.Problem, read by the trainer: its prompt and gold answer), one
response per sample, graded with math-verify. `EpisodeSource`: the tool-use episodes of an environment (data.env,
tip_cli.rollout.agent), whose batch trains on the student's own tokens only. Both `generate` on an engine and `pack`
the result into a `Rollout`; `rollout_source` picks the one a run uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tip_cli.config.schema import AgentConfig, DatasetConfig, PairConfig
from tip_cli.envs.base import Resolve
from tip_cli.grading import grade
from tip_cli.models import Pair, render_prompt
from tip_cli.rollout.batch import Batch, Sampling, eos_ids, pack


@dataclass
class Rollout:
    """One step's rollouts as a training batch; `metrics()` gives their rollout/* metrics (after the update: grading
    is not part of the step's time) and the number of model tokens generated."""

    batch: Batch
    metrics: Callable[[], tuple[dict[str, float], int]]


class PromptSource:
    """Single-turn prompts: one response per sample, graded against the problem's answer (math-verify)."""

    def __init__(self, problems: list, tok, pair_cfg: PairConfig):
        self.problems, self.tok = problems, tok
        self.prompts = [render_prompt(tok, p.prompt, pair_cfg) for p in problems]

    def __len__(self) -> int:
        return len(self.prompts)

    def generate(self, engine, idx: list[int], sampling: Sampling):
        return engine.generate([self.prompts[i] for i in idx], sampling).tokens

    def pack(self, responses, idx: list[int], sampling: Sampling, device: torch.device) -> Rollout:
        rows = [i for i in idx for _ in range(sampling.n)]
        batch = pack([self.prompts[i] for i in rows], responses, self.tok.pad_token_id).to(device)

        def metrics() -> tuple[dict[str, float], int]:
            texts = self.tok.batch_decode(responses, skip_special_tokens=True)
            correct = sum(grade(t, self.problems[i].answer).correct for t, i in zip(texts, rows, strict=True))
            return {"rollout/response_len": sum(map(len, responses)) / len(responses),
                    "rollout/accuracy": correct / len(rows)}, sum(map(len, responses))

        return Rollout(batch, metrics)


class EpisodeSource:
    """Tool-use episodes of an environment (data.env); the batch's target_mask holds the student's own tokens only,
    never the prompt or tool results."""

    def __init__(self, tasks):
        self.tasks, self.tok = tasks, tasks.tok

    def __len__(self) -> int:
        return len(self.tasks)

    def generate(self, engine, idx: list[int], sampling: Sampling):
        return self.tasks.rollout(engine, idx, sampling)

    def pack(self, trajs, idx: list[int], sampling: Sampling, device: torch.device) -> Rollout:
        from tip_cli.rollout import agent

        def metrics() -> tuple[dict[str, float], int]:
            m = agent.rollout_metrics(trajs, self.tasks.env)
            return m, m["rollout/response_len"] * len(trajs)

        return Rollout(agent.pack(trajs, self.tok.pad_token_id).to(device), metrics)


def rollout_source(
    data: DatasetConfig, pair_cfg: PairConfig, agent_cfg: AgentConfig, pair: Pair, problems: list | None,
    resolve: Resolve,
) -> PromptSource | EpisodeSource:
    """Where a step's rollouts come from: tool-use episodes with data.env, single-turn prompts otherwise; prompts
    and episodes are rendered with `pair_cfg`'s chat template. `resolve` turns a model reference into a local path
    for an environment that runs a model of its own (tip_cli.pairs.resolve_model, which sits above rollout)."""
    if not data.env:
        return PromptSource(problems, pair.tokenizer, pair_cfg)
    from tip_cli.envs import make_env
    from tip_cli.rollout import agent

    stop_ids = eos_ids(pair.student.generation_config.eos_token_id, pair.tokenizer)
    env = make_env(data, pair_cfg, resolve)
    return EpisodeSource(agent.TaskSource(data, agent_cfg, pair_cfg, pair.tokenizer, stop_ids, env))
