"""One training step (SPEC 1-5) on a rollout batch: teacher scoring -> token selection -> selected-token loss.

  2. the teacher runs on the same tokens; we keep its final hidden states at the N response positions [N, d_T]
     (its [N, V] log-probs are recomputed chunk by chunk where needed, never stored), or, with
     teacher.backend=vllm_topk (or vllm_server), its top-K log-probs [N, K] from a vLLM engine (or server);
  3. the student's entropy H and the teacher-student divergence D (and the support mass C, for a selector that
     reads it) are computed for all N positions without grad, and the selector keeps K of them;
  4. the loss (SPEC section 1) is built only for the K kept positions (tip_cli.losses) and back-propagated.
"""

from __future__ import annotations

import math

import torch

from tip_cli.logits import StatsSink, Teacher
from tip_cli.losses import LossSpec, selected_token_loss
from tip_cli.models import Pair, head_weight, response_hidden
from tip_cli.rollout.batch import Batch
from tip_cli.selection import selectors
from tip_cli.selection.quadrants import TokenStats
from tip_cli.selection.signal import Signal, topk_mass
from tip_cli.teacher.scoring import score
from tip_cli.teacher.targets import TopKTeacher, teacher_targets
from tip_cli.tracking import timed
from tip_cli.train import parallel, precision, probe
from tip_cli.train.chunks import chunk_rows, compiled_kernels
from tip_cli.train.spec import StepSpec


def student_hidden(pair: Pair, batch: Batch, temperature: float, prec: precision.Precision) -> torch.Tensor:
    """`response_hidden` of the student in the compute dtype: its forward under bf16 autocast when bf16_mixed (fp32
    master weights); the lm_head matmuls of scoring and the loss then follow the hidden states' dtype."""
    with prec.autocast(pair.device, pair.student):
        return response_hidden(pair.student, batch, temperature).to(prec.compute)


def _finite(*xs: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of this rank (its local shard under FSDP2) is finite: a parameter's fp32 2-norm is
    finite iff all its entries are (below 1e19 each), and it takes one reduction, no mask of the parameter's size."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in local if p.numel()]
    return not norms or bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


def skipped_step(n_tokens: int) -> tuple[dict, None, torch.Tensor]:
    """distill_step's result when H or D is not finite: no loss, no selection (a selector must never rank NaN)."""
    n = float(parallel.global_count(n_tokens))
    return {"loss": math.nan, "tokens/total": n, "tokens/kept": 0.0, "tokens/kept_frac": 0.0}, None, torch.zeros(0)


def micro_slices(batch: Batch, micro: int) -> list[tuple[Batch, int, int]]:
    """Split rows into micro-batches, each cut to its own longest row (Batch.rows); each comes with the range
    [lo, hi) of its tokens in the flat [N] order."""
    counts = batch.target_mask.sum(1).tolist()
    out, lo = [], 0
    for start in range(0, batch.input_ids.shape[0], micro):
        hi = lo + sum(counts[start : start + micro])
        out.append((batch.rows(start, start + micro), lo, hi))
        lo = hi
    return out


class Accumulator:
    """Backward of a step's micro-batch losses, with one gradient reduction and one host sync per step.

    Under FSDP2 each backward would reduce-scatter the gradients; here only the last micro-batch's does
    (`set_requires_gradient_sync`): the ones before accumulate unsharded gradients on each rank (in fp32 under
    bf16_mixed, FSDP2's reduce dtype) and the last reduces their sum. The losses add up on the device and are read
    once, in `total`, instead of a `.item()` stall after every micro-batch."""

    def __init__(self, model: torch.nn.Module, n_parts: int, device: torch.device):
        from torch.distributed.fsdp import FSDPModule

        self.model = model if isinstance(model, FSDPModule) else None
        self.last = n_parts - 1
        self.sum = torch.zeros((), device=device)

    def backward(self, part: int, loss: torch.Tensor) -> None:
        """loss.backward() for micro-batch `part` of the step, syncing gradients when it is the last."""
        if self.model is not None:
            self.model.set_requires_gradient_sync(part == self.last)
        loss.backward()
        self.sum += loss.detach()

    def total(self) -> float:
        """The step's loss, the sum over its micro-batches; leaves gradient sync on for whatever runs next."""
        if self.model is not None:
            self.model.set_requires_gradient_sync(True)
        return self.sum.item()


def loss_spec(spec: StepSpec, pair: Pair, normalizer: float) -> LossSpec:
    """The step's loss as the method's plain arguments, over the pair's shared vocabulary on its device."""
    chunk = chunk_rows(spec.loss_chunk, pair.vocab, pair.device)
    kernels = compiled_kernels(spec.backend, pair.device)
    return LossSpec(pair.vocab, spec.loss_kind, spec.loss_beta, chunk, normalizer, kernels)


def stats_sink(spec: StepSpec) -> StatsSink:
    """Where a pass puts each row's (H, D) and, with signal_metrics, its loss and gradient norm (SPEC 7a)."""
    signal = (spec.loss_kind, spec.loss_beta) if spec.signal_metrics else None
    return StatsSink(spec.score, [], signal)


def learning_signal(sink: StatsSink, teacher: Teacher, temp: float) -> Signal | None:
    """The sink's per-row signal with the gradient taken w.r.t. the raw logits z (u = z / T: dl/dz = dl/du / T),
    and a top-K teacher's mass in its list; None when train.signal_metrics is off. A rank without rows gets empty
    tensors, so that every rank gathers the same fields."""
    if sink.signal is None:
        return None
    device = (teacher.hidden if teacher.dense else teacher.ids).device
    sig = sink.signal_values() or Signal(torch.zeros(0, device=device), torch.zeros(0, device=device))
    if sig.topk_mass is None and teacher.dense and sink.spec.topk:
        sig.topk_mass = torch.zeros(0, device=device)
    sig.grad_sq = sig.grad_sq / temp**2
    if isinstance(teacher, TopKTeacher):
        sig.topk_mass = topk_mass(teacher.logp)
    return sig


def distill_step(
    pair: Pair, batch: Batch, spec: StepSpec, generator: torch.Generator, metrics: dict, scorer=None,
    step: int | None = None,
) -> tuple[dict, TokenStats, torch.Tensor]:
    """Teacher scoring, selection, and the loss's backward for one rollout batch.

    Returns the step's statistics, the per-token stats [N] and the kept indices [K]; under torchrun, those of the
    global batch (tip_cli.train.parallel), while the loss is built on this rank's share of the kept tokens. `scorer`
    (a VLLMTeacher or ServerTeacher) replaces the in-process teacher when teacher.backend=vllm_topk or vllm_server.

    With a single micro-batch the student's forward with grad also provides the scores (no second pass); with
    several, a no-grad scoring pass runs first, because the budget is global over the whole rollout batch. When the
    selector keeps every token anyway (selectors.keeps_all), there is no scoring pass: the loss pass computes each
    row's H and D from the log-probs it has in hand, and selection runs afterwards, for the statistics only.

    H, D and the loss compare softmax(logits / T) of both models, T = spec.temperature. With
    spec.signal_metrics the same passes give each token's loss and ||dl/dz||^2 (tip_cli.selection.signal), and the
    step's metrics carry SPEC 7a's grad/, loss/, select/overlap_ and teacher/topk_mass values. The student's passes
    compute under spec.precision (tip_cli.train.precision: bf16 autocast under bf16_mixed). When H or D is not
    finite the step stops before selection (stats None, loss NaN) and the trainer skips its update. On a probe step
    (`step`, spec.probe_every) the full-token loss's gradient is compared with the budgeted one
    (tip_cli.train.probe), which stays the gradient the update takes.
    """
    prec, temp = spec.precision, spec.temperature
    micro = spec.micro_batch_size or batch.input_ids.shape[0]
    parts = micro_slices(batch, micro)
    with timed("time/teacher", metrics):
        teacher = teacher_targets(pair, batch, parts, scorer, temp)
    seq_id = batch.target_mask.nonzero()[:, 0]  # [N]
    if selectors.keeps_all(spec.selection.selector, spec.selection.budget):
        return _full_token_step(pair, batch, parts, teacher, seq_id, spec, generator, metrics)
    fused = len(parts) == 1
    with timed("time/train", metrics):
        h_fused = student_hidden(pair, batch, temp, prec) if fused else None  # [N, d_S], with grad
    with timed("time/select", metrics):
        if fused:
            h_s_scores = h_fused.detach()
        else:
            with torch.no_grad():
                h_s_scores = torch.cat([student_hidden(pair, mb, temp, prec) for mb, _, _ in parts])
        w_s = head_weight(pair.student).to(h_s_scores.dtype)  # the compute dtype
        chunk = chunk_rows(spec.score_chunk, pair.vocab, h_s_scores.device)
        sink = stats_sink(spec)
        ent, div, sup, log_z_s, teacher = score(
            h_s_scores, w_s, teacher, pair.vocab, chunk, spec.score, compiled_kernels(spec.backend, pair.device), sink,
            spec.support_k,
        )
        if not parallel.all_true(_finite(*(x for x in (ent, div, sup) if x is not None))):  # every rank skips together
            return skipped_step(ent.numel())
        # stats, selection and the loss normaliser over every rank's tokens under torchrun; this batch's otherwise
        sel = parallel.select_tokens(ent, div, seq_id, batch.input_ids.shape[0], spec.selection, generator,
                                     learning_signal(sink, teacher, temp), sup)
        kept = sel.local.to(pair.device)  # [K_r], indices into this batch's N tokens
        del h_s_scores
    lspec = loss_spec(spec, pair, sel.normalizer)
    losses = Accumulator(pair.student, len(parts), pair.device)
    with timed("time/train", metrics):
        for i, (mb, lo, hi) in enumerate(parts):
            local = kept[(kept >= lo) & (kept < hi)]
            if parallel.may_skip(local.numel()):
                continue
            h_s = h_fused if fused else student_hidden(pair, mb, temp, prec)
            losses.backward(i, selected_token_loss(
                h_s[local - lo], head_weight(pair.student), teacher.rows(local), lspec, log_z=log_z_s[local],
            ))
        loss_total = losses.total()
    out = {"loss": loss_total, **sel.metrics}
    if probe.due(spec.probe_every, step, sel.metrics):
        with timed("time/probe", metrics):  # the full-token loss over all N rows, with the same normaliser
            out |= probe.param_cosine(pair.student, Accumulator(pair.student, len(parts), pair.device), (
                selected_token_loss(student_hidden(pair, mb, temp, prec), head_weight(pair.student),
                                    teacher.rows(slice(lo, hi)), lspec) for mb, lo, hi in parts))
    return out, sel.stats, sel.kept.cpu()


def _full_token_step(
    pair: Pair, batch: Batch, parts: list[tuple[Batch, int, int]], teacher: Teacher, seq_id: torch.Tensor,
    spec: StepSpec, generator: torch.Generator, metrics: dict,
) -> tuple[dict, TokenStats, torch.Tensor]:
    """distill_step when every token is kept: one loss pass over all N rows that also yields their (H, D)."""
    prec, temp = spec.precision, spec.temperature
    normalizer = max(1, parallel.global_count(int(seq_id.numel())))  # N = K: either loss.norm divides by it
    sink = stats_sink(spec)
    lspec = loss_spec(spec, pair, normalizer)
    losses = Accumulator(pair.student, len(parts), pair.device)
    with timed("time/train", metrics):
        for i, (mb, lo, hi) in enumerate(parts):
            losses.backward(i, selected_token_loss(
                student_hidden(pair, mb, temp, prec), head_weight(pair.student), teacher.rows(slice(lo, hi)), lspec,
                sink,
            ))
        loss_total = losses.total()
    with timed("time/select", metrics):
        ent, div = sink.tensors() if sink.parts else (torch.zeros(0, device=pair.device),) * 2
        if not parallel.all_true(_finite(ent, div)):
            return skipped_step(ent.numel())
        sel = parallel.select_tokens(ent, div, seq_id, batch.input_ids.shape[0], spec.selection, generator,
                                     learning_signal(sink, teacher, temp))
    if sel.kept.numel() != len(sel.stats):
        chosen = spec.selection
        raise RuntimeError(f"selector {chosen.selector.name} at budget {chosen.budget} kept {sel.kept.numel()} of "
                           f"{len(sel.stats)} tokens, but the loss was built on all of them")
    return {"loss": loss_total, **sel.metrics}, sel.stats, sel.kept.cpu()
