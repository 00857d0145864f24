"""The selected-token distillation loss, with memory independent of how many tokens are selected.

For the K selected response positions we get the student's final hidden states h_S [K, d_S] (with grad) and the
teacher's h_T [K, d_T] (no grad). The loss is

    L = scale * sum_k div(softmax(h_S[k] W_S^T), softmax(h_T[k] W_T^T))

with div = reverse KL (default), forward KL or JSD(beta), exact over the shared vocabulary prefix [:V]. The teacher
side can also be its top-K log-probs from a vLLM engine (`TopKTeacher`): div is then taken over K + 1 buckets.
The [K, V] logits are never materialised with grad: the forward pass walks K in chunks, computes each chunk's
loss and its gradients w.r.t. h_S and W_S right away, and frees the chunk's graph. Peak memory of the loss is
O(chunk x V + K x d + V x d), whatever K is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_cli.config import ImportanceConfig
from tip_cli.divergence import entropy, token_divergence, topk_buckets
from tip_cli.importance import token_stats_chunk


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """log softmax(hidden @ weight[:vocab]^T), at least float32. hidden [C, d], weight [V', d] -> [C, vocab]."""
    logits = hidden @ weight[:vocab].T
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@dataclass
class DenseTeacher:
    """The teacher's final hidden states at N positions and its lm_head: exact full-vocab log-probs on demand."""

    hidden: torch.Tensor  # [N, d_T]
    weight: torch.Tensor  # [V_T, d_T]
    vocab: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def rows(self, index: torch.Tensor) -> DenseTeacher:
        return DenseTeacher(self.hidden[index], self.weight, self.vocab)

    def divergence(self, logp_s: torch.Tensor, rows: slice, kind: str, beta: float) -> torch.Tensor:
        return token_divergence(logp_s, logprobs(self.hidden[rows], self.weight, self.vocab), kind, beta)

    def stats(self, logp_s: torch.Tensor, rows: slice, cfg: ImportanceConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return token_stats_chunk(logp_s, logprobs(self.hidden[rows], self.weight, self.vocab), cfg)


@dataclass
class TopKTeacher:
    """The teacher's top-K next-token ids and log-probs at N positions (teacher.backend=vllm_topk)."""

    ids: torch.Tensor  # [N, K] int64
    logp: torch.Tensor  # [N, K] float

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: torch.Tensor) -> TopKTeacher:
        return TopKTeacher(self.ids[index], self.logp[index])

    def divergence(self, logp_s: torch.Tensor, rows: slice, kind: str, beta: float) -> torch.Tensor:
        return token_divergence(*topk_buckets(logp_s, self.ids[rows], self.logp[rows]), kind, beta)

    @torch.no_grad()
    def stats(self, logp_s: torch.Tensor, rows: slice, cfg: ImportanceConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """H over the student's full vocab; D over the K + 1 buckets (cfg.topk does not apply: K is the engine's)."""
        logp_s = logp_s.float()
        return entropy(logp_s), self.divergence(logp_s, rows, cfg.divergence, cfg.jsd_beta)


Teacher = DenseTeacher | TopKTeacher


class _SelectedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_s, weight_s, teacher, vocab, kind, beta, chunk_size, scale):
        grad_h = torch.zeros_like(hidden_s)  # [K, d_S]
        grad_w = torch.zeros_like(weight_s) if ctx.needs_input_grad[1] else None  # [V', d_S]
        total = torch.zeros((), dtype=torch.promote_types(hidden_s.dtype, torch.float32), device=hidden_s.device)
        for start in range(0, hidden_s.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad():
                h = hidden_s[rows].detach().requires_grad_()
                w = weight_s.detach().requires_grad_(grad_w is not None)
                chunk_loss = teacher.divergence(logprobs(h, w, vocab), rows, kind, beta).sum() * scale
                inputs = (h, w) if grad_w is not None else (h,)
                grads = torch.autograd.grad(chunk_loss, inputs)
            grad_h[rows] = grads[0]
            if grad_w is not None:
                grad_w += grads[1]
            total += chunk_loss.detach()
        ctx.save_for_backward(grad_h, *(() if grad_w is None else (grad_w,)))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grad_h = saved[0] * grad_out
        grad_w = saved[1] * grad_out if len(saved) > 1 else None
        return grad_h, grad_w, None, None, None, None, None, None


def selected_token_loss(
    hidden_s: torch.Tensor,
    weight_s: torch.Tensor,
    hidden_t: torch.Tensor | Teacher,
    weight_t: torch.Tensor | None,
    vocab: int,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    chunk_size: int = 256,
    normalizer: float = 1.0,
) -> torch.Tensor:
    """sum over the K rows of div(p_S, p_T), divided by `normalizer` (the global kept or total token count).

    hidden_s [K, d_S] and weight_s [V_S, d_S] carry grad (the student's final hidden states at the selected
    positions and its lm_head); hidden_t [K, d_T], weight_t [V_T, d_T] are the teacher's (or hidden_t is a
    `DenseTeacher` / `TopKTeacher` for the same K rows, and weight_t is ignored). Both vocabularies are cut to the
    first `vocab` entries.
    """
    teacher = hidden_t if isinstance(hidden_t, DenseTeacher | TopKTeacher) else DenseTeacher(hidden_t, weight_t, vocab)
    if hidden_s.shape[0] != len(teacher):
        raise ValueError(f"student rows {hidden_s.shape[0]} != teacher rows {len(teacher)}")
    if hidden_s.shape[0] == 0:
        return (hidden_s.sum() + weight_s.sum()) * 0.0  # keeps the graph so backward() still works
    return _SelectedTokenLoss.apply(hidden_s, weight_s, teacher, vocab, kind, beta, chunk_size, 1.0 / normalizer)
