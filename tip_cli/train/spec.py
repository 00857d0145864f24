"""The frozen specs a training run runs on: built once per run from the config (tip_cli.train.recipe), handed down
as plain values, so the step loop, the step, selection and the probe never read the config.

    SelectionSpec  what global selection takes (tip_cli.selection.global_select): the axes, the selector, the budget,
                   where the stats are computed (parallel.rank_scope) and what the loss divides by (loss.norm);
    StepSpec       the rest of distill_step's inputs: the temperature T, the precision, the micro-batch size, how D
                   is scored, the loss, the chunking and kernels, and which extra measurements (SPEC 7a) a step takes;
    LoopSpec       the step loop's (tip_cli.train.loop): the seed, the steps and their prompts and sampling, clipping,
                   and the cadence of checkpoints, evaluations and token samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from tip_cli.rollout.batch import Sampling
from tip_cli.selection.quadrants import AxisSpec
from tip_cli.selection.scores import ScoreSpec
from tip_cli.selection.selectors import SelectorSpec
from tip_cli.train.precision import Precision


@dataclass(frozen=True)
class SelectionSpec:
    axis: AxisSpec  # normalisation and quadrant thresholds of H and D
    selector: SelectorSpec
    budget: float  # fraction of the response tokens kept
    rank_scope: str = "global"  # parallel.rank_scope, global: over every rank's tokens | local: per rank
    norm: str = "selected"  # the loss divides by the kept tokens (selected) or all of them (total)


@dataclass(frozen=True)
class StepSpec:
    temperature: float  # the T of softmax(logits / T) that H, D and the loss compare, for both models
    precision: Precision
    selection: SelectionSpec
    score: ScoreSpec  # how D is taken
    loss_kind: str  # reverse_kl | forward_kl | jsd
    loss_beta: float  # loss_kind=jsd: the mixture weight
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = the whole batch
    score_chunk: int | str | None = "auto"  # rows of [chunk, V] logits in the scoring pass (tip_cli.train.chunks)
    loss_chunk: int | str | None = "auto"  # rows of [chunk, V] logits in the loss
    backend: str = "auto"  # compiled | eager | auto kernels (tip_cli.train.chunks.compiled_kernels)
    signal_metrics: bool = True  # each token's loss and gradient norm, and SPEC 7a's metrics over them
    probe_every: int = 0  # steps between gradient probes (tip_cli.train.probe); 0 = never
    support_k: int | None = None  # the student's top-k whose teacher mass C the selector needs; None = no C


@dataclass(frozen=True)
class LoopSpec:
    seed: int  # every random draw of a step derives from (seed, step) (tip_cli.seeds)
    steps: int
    prompts_per_step: int
    sampling: Sampling  # the rollouts' sampling; each step gives it its own seed
    max_staleness: int  # 0: each step's rollouts are generated at that step; 1: one step ahead (tip_cli.train.pipeline)
    grad_clip: float  # the gradient's global norm is clipped to this; 0 = no clipping
    lr: float  # named when an update makes the weights non-finite
    save_every: int
    keep_checkpoints: int
    eval_every: int
    eval_before: bool
    token_sample_every: int
    token_sample_size: int
    max_skipped_steps: int
    sigterm_grace_s: float
    topk_mass_warn: float  # a run whose teacher top-K holds less mass than this says so once
    topk: tuple[str, int | None]  # the key that sets the teacher's top-K, and its value (named in that line)


@dataclass(frozen=True)
class RunSpec:
    step: StepSpec
    loop: LoopSpec
