"""The frozen specs one training step runs on: built once per run from the config (tip_cli.train.loop.step_spec),
handed down as plain values, so the step, selection and the probe never read the config.

    SelectionSpec  what global selection takes (tip_cli.selection.global_select): the axes, the selector, the budget,
                   where the stats are computed (parallel.rank_scope) and what the loss divides by (loss.norm);
    StepSpec       the rest of distill_step's inputs: the temperature T, the precision, the micro-batch size, how D
                   is scored, the loss, the chunking and kernels, and which extra measurements (SPEC 7a) a step takes.
"""

from __future__ import annotations

from dataclasses import dataclass

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
