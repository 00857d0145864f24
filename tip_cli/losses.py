"""The selected-token distillation loss, with memory independent of how many tokens are selected.

For the K selected response positions we get the student's final hidden states h_S [K, d_S] (with grad) and the
teacher's h_T [K, d_T] (no grad). The loss is

    L = scale * sum_k div(softmax(h_S[k] W_S^T), softmax(h_T[k] W_T^T))

with div = reverse KL (default), forward KL or JSD(beta) (beta 0: forward KL, beta 1: reverse KL, as in TRL), exact
over the shared vocabulary prefix [:V]. At a distillation temperature T the trainer passes h / T for both models, so
the distributions are softmax(logits / T) (tip_cli.train.recipe.specs). The teacher's side
(tip_cli.teacher.targets) is its hidden states and lm_head, or its top-K log-probs from a vLLM engine: div is then
taken over K + 1 buckets.
The [K, V] logits are never materialised with grad: the forward pass walks K in chunks, computes each chunk's
loss and its gradients w.r.t. h_S and W_S right away, and frees the chunk's graph. Peak memory of the loss is
O(chunk x V + K x d + V x d), whatever K is. For the default reverse KL against a dense teacher the chunk's gradient
is written in closed form, d KL(p_S || p_T) / d z_S = p_S * (log p_S - log p_T - KL), in place over three
[chunk, V] blocks (autograd through the log-softmax and KL keeps about seven).

The same pass can also return each row's entropy H and divergence D (`StatsSink`): when every token is kept
(selector=all, or a budget of 1.0), the trainer takes the selection statistics from the loss instead of scoring
every position a second time. The sink can also take each row's loss and ||dl/dz||^2 (SPEC 7a,
tip_cli.selection.signal): the closed-form chunk reads it off the dL/dz block it forms anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_cli.logits import StatsSink, Teacher, compiled, logprobs
from tip_cli.selection.scores import rowdot, stats_from_logits, token_stats_chunk
from tip_cli.selection.signal import topk_mass


def _reverse_kl_chunk(
    h: torch.Tensor, w: torch.Tensor, logp_t: torch.Tensor, scale: float, want_w: bool, sink: StatsSink | None,
    log_z: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """scale * sum_c KL(p_S || p_T) over one chunk and its gradients w.r.t. h [C, d] and w[:V] [V, d], in closed form.

    logp_t [C, V] is the teacher's fresh log-probs, overwritten here. With z = h w^T, dL/dz = scale * p_S *
    (log p_S - log p_T - KL) row-wise, so the chunk needs the logits (turned into log p_S in place), p_S, and
    log p_S - log p_T (in place over logp_t, then turned into dL/dz in place): three [C, V] blocks. `log_z` [C]
    is the student's log-partition of these rows from the scoring pass, if it ran.
    """
    logp_s = logprobs(h, w, w.shape[0], log_z)  # [C, V] log p_S, in place over the logits
    p_s = logp_s.exp()
    ent = None  # H [C], when the sink's D is this loss's own reverse KL
    if sink is not None and sink.spec.divergence == "reverse_kl" and sink.spec.topk is None:
        ent = -rowdot(p_s, logp_s)
    elif sink is not None:  # another divergence: from both log-probs, before logp_t is overwritten
        sink.parts.append(token_stats_chunk(logp_s, logp_t, sink.spec))
    want_signal = sink is not None and sink.signal is not None
    mass = topk_mass(logp_t, sink.spec.topk) if want_signal and sink.spec.topk else None  # before logp_t is overwritten
    diff = logp_t.neg_().add_(logp_s)  # log p_S - log p_T
    kl_rows = rowdot(p_s, diff)  # [C]
    if ent is not None:
        sink.parts.append((ent, kl_rows))
    g = diff.sub_(kl_rows[:, None]).mul_(p_s)  # [C, V] dKL/du
    if want_signal:
        sink.signal_parts.append((kl_rows, rowdot(g, g), mass))
    grad_z = g.mul_(scale).to(w.dtype)  # [C, V]
    del p_s, logp_s
    grad_h = grad_z @ w  # [C, d]
    grad_w = grad_z.T @ h if want_w else None  # [V, d]
    return kl_rows.sum() * scale, grad_h, grad_w


def reverse_kl_from_logits(
    z_s: torch.Tensor, z_t: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One closed-form reverse-KL chunk from both models' raw logits [C, V]: (KL(p_S || p_T) [C], H(p_S) [C],
    dL/dz_S = scale * p_S * (log p_S - log p_T - KL) [C, V] in z_s's dtype), at least fp32 inside; `scale` is a 0-d
    tensor (a Python float would recompile at every new value). Written for torch.compile (`compiled`), which fuses
    it with stats_from_logits into a few passes over z_s and z_t that keep no [C, V] block but dL/dz; the eager path
    is `_reverse_kl_chunk`, in place over fp32 blocks."""
    ent, kl_rows, log_z_s, log_z_t = stats_from_logits(z_s, z_t)
    zs, zt = z_s.to(kl_rows.dtype), z_t.to(kl_rows.dtype)
    # log p_S - log p_T - KL = z_s - z_t - (log Z_S - log Z_T + KL); where p_S = 0 (z_s = -inf) the gradient is 0,
    # not 0 * (-inf - z_t) = NaN
    p_s = torch.exp(zs - log_z_s[:, None])
    grad_z = torch.where(p_s > 0, scale * p_s * (zs - zt - (log_z_s - log_z_t + kl_rows)[:, None]), 0.0)
    return kl_rows, ent, grad_z.to(z_s.dtype)


def _compiled_reverse_kl_chunk(
    h: torch.Tensor, w: torch.Tensor, teacher, rows: slice, scale: float, want_w: bool, sink: StatsSink | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_reverse_kl_chunk` with its softmax, KL and gradient fused by torch.compile: the lm_head matmuls stay in
    the compute dtype, the [C, V] work reads each model's logits a few times and writes dL/dz once."""
    z_s = h @ w.T  # [C, V]
    scale_t = torch.full((), scale, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)  # no host copy
    kl_rows, ent, grad_z = compiled(reverse_kl_from_logits)(z_s, teacher.logits(rows), scale_t)
    del z_s
    if sink is not None:
        sink.parts.append((ent, kl_rows))
        if sink.signal is not None:  # dKL/du = grad_z / scale, as the kernel rounded it (bf16 under bf16 compute)
            g = grad_z.float()
            sink.add_signal(kl_rows, rowdot(g, g) / scale**2)
    grad_h = grad_z @ w  # [C, d]
    grad_w = grad_z.T @ h if want_w else None  # [V, d]
    return kl_rows.sum() * scale, grad_h, grad_w


class _SelectedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_s, weight_s, teacher, vocab, kind, beta, chunk_size, scale, sink, log_z_s, fused):
        # the matmuls run in the hidden states' dtype (a bf16 copy of fp32 master weights under bf16_mixed), while
        # the chunks' head gradients add up in fp32 at least and reach weight_s, the master weight, unrounded
        head = weight_s.detach().to(hidden_s.dtype)  # [V', d_S]
        acc = torch.promote_types(weight_s.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden_s)  # [K, d_S]
        grad_w = torch.zeros_like(weight_s, dtype=acc) if ctx.needs_input_grad[1] else None  # [V', d_S]
        total = torch.zeros((), dtype=torch.promote_types(hidden_s.dtype, torch.float32), device=hidden_s.device)
        closed_form = kind == "reverse_kl" and teacher.dense
        # the compiled chunk gives the sink (H, reverse KL) only: another importance divergence takes the eager one
        fused = fused and closed_form and (sink is None or sink.spec.plain_reverse_kl)
        for start in range(0, hidden_s.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            if closed_form:
                h, w, want_w = hidden_s[rows].detach(), head[:vocab], grad_w is not None
                chunk_loss, g_h, g_w = (
                    _compiled_reverse_kl_chunk(h, w, teacher, rows, scale, want_w, sink) if fused else
                    _reverse_kl_chunk(h, w, teacher.target(rows), scale, want_w, sink,
                                      None if log_z_s is None else log_z_s[rows])
                )
                grad_h[rows] = g_h
                if grad_w is not None:
                    grad_w[:vocab] += g_w
                total += chunk_loss
                continue
            target = teacher.target(rows)
            with torch.enable_grad():
                h = hidden_s[rows].detach().requires_grad_()
                w = head.detach().requires_grad_(grad_w is not None)
                logp_s = logprobs(h, w, vocab)
                row_loss = teacher.divergence_to(logp_s, target, kind, beta)  # [C]
                chunk_loss = row_loss.sum() * scale
                inputs = (h, w) if grad_w is not None else (h,)
                grads = torch.autograd.grad(chunk_loss, inputs)
            grad_h[rows] = grads[0]
            if grad_w is not None:
                grad_w += grads[1]
            total += chunk_loss.detach()
            if sink is not None:
                sink.parts.append(teacher.stats_to(logp_s.detach(), target, sink.spec))
                if sink.signal is not None:
                    _, grad_sq = teacher.signal_to(logp_s.detach(), target, kind, beta)
                    sink.add_signal(row_loss.detach(), grad_sq, target if teacher.dense else None)
        ctx.save_for_backward(grad_h, *(() if grad_w is None else (grad_w,)))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        if bool(grad_out == 1):  # loss.backward(): hand over the gradients, no [V, d] copy
            return saved[0], saved[1] if len(saved) > 1 else None, *(None,) * 9
        grad_h = saved[0] * grad_out
        grad_w = saved[1] * grad_out if len(saved) > 1 else None
        return grad_h, grad_w, *(None,) * 9


@dataclass(frozen=True)
class LossSpec:
    """What `selected_token_loss` computes: div = `kind` (reverse_kl, forward_kl, or jsd with `beta`) over the
    shared vocabulary prefix [:vocab], `chunk` rows of [chunk, vocab] logits at a time, the sum divided by
    `normalizer` (the global kept or total token count)."""

    vocab: int
    kind: str = "reverse_kl"
    beta: float = 0.5
    chunk: int = 256
    normalizer: float = 1.0
    compiled: bool = False  # the reverse-KL chunk fused by torch.compile (loss.backend; tip_cli.train.chunks)


def selected_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: Teacher,
    spec: LossSpec,
    sink: StatsSink | None = None,
    log_z: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = sum_k div(softmax(hidden[k] weight[:V]^T), p_T[k]) / spec.normalizer, V = spec.vocab.

    hidden [K, d_S] and weight [V_S, d_S] carry grad (the student's final hidden states at the selected positions
    and its lm_head); `target` is the teacher's side for the same K rows (`DenseTeacher`: its hidden states and
    lm_head, or its top-K log-probs: tip_cli.teacher.targets). With a `sink`, each row's (H, D) is appended to it as the loss
    computes the row. `log_z` [K], the student's log-partition of the K rows from a scoring pass, spares the eager
    loss recomputing it (the compiled chunk, spec.compiled, recomputes both models' inside its fused kernel).

    Precision: the lm_head matmuls run in hidden's dtype, on a copy of `weight` in it. Under bf16 compute
    (train.precision bf16_mixed or bf16) a chunk's [C, V] logits are bf16: the GEMM accumulates in fp32 and rounds
    its output to bf16 (a relative error up to 2^-9, about 0.03 on a logit of 8); the softmax, log-probs, divergence
    and dL/dz are computed in fp32 from those values, and dL/dz enters the two gradient matmuls as bf16. Each
    chunk's head gradient [V, d] is thus a bf16 product; the chunks' add up in fp32 and reach `weight` unrounded
    (the fp32 master under bf16_mixed, whose .grad then sums the micro-batches in fp32).
    """
    if hidden.shape[0] != len(target):
        raise ValueError(f"student rows {hidden.shape[0]} != teacher rows {len(target)}")
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps the graph so backward() still works
    return _SelectedTokenLoss.apply(
        hidden, weight, target, spec.vocab, spec.kind, spec.beta, spec.chunk, 1.0 / spec.normalizer, sink, log_z,
        spec.compiled,
    )
