"""The teacher's side of the loss at the N response positions of a rollout batch (SPEC 2).

`DenseTeacher`: the in-process teacher's final hidden states [N, d_T] and its lm_head, from which exact full-vocab
log-probs are computed chunk by chunk where needed (never stored as [N, V]). `TopKTeacher`: its top-K next-token
ids and log-probs [N, K] from a vLLM engine or server (teacher.backend=vllm_topk, vllm_server); the divergence is
then taken over K + 1 buckets. Both give tip_cli.losses what it needs per chunk of rows (`target`,
`divergence_to`, `stats_to`: the tip_cli.logits.Teacher protocol), and `teacher_targets` builds the one a run uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tip_cli.logits import Teacher, logprobs, scored_logprobs
from tip_cli.selection.scores import (
    ScoreSpec,
    entropy,
    token_divergence,
    token_stats_chunk,
    topk_buckets,
    topk_support_mass,
)
from tip_cli.selection.signal import dense_signal, topk_signal


@dataclass
class DenseTeacher:
    """The teacher's final hidden states at N positions and its lm_head: exact full-vocab log-probs on demand."""

    hidden: torch.Tensor  # [N, d_T]
    weight: torch.Tensor  # [V_T, d_T]
    vocab: int
    log_z: torch.Tensor | None = None  # [N], the rows' log-partition once a scoring pass has computed it
    dense = True  # target(rows) is full-vocab log-probs: the loss may use its closed-form reverse-KL chunk

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def rows(self, index: torch.Tensor | slice) -> DenseTeacher:
        return DenseTeacher(self.hidden[index], self.weight, self.vocab, None if self.log_z is None else self.log_z[index])

    @torch.no_grad()
    def target(self, rows: slice) -> torch.Tensor:
        """The teacher's side of the divergence at `rows`: its log-probs [C, vocab], a fresh tensor."""
        return logprobs(self.hidden[rows], self.weight, self.vocab, None if self.log_z is None else self.log_z[rows])

    @torch.no_grad()
    def logits(self, rows: slice) -> torch.Tensor:
        """The raw logits at `rows`, [C, vocab] in the hidden states' dtype (for the compiled kernels)."""
        return self.hidden[rows] @ self.weight[: self.vocab].T

    def scored_target(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """`target` and the rows' log-partition [C]."""
        return scored_logprobs(self.hidden[rows], self.weight, self.vocab)

    def divergence_to(self, logp_s: torch.Tensor, target: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
        return token_divergence(logp_s, target, kind, beta)

    def stats_to(self, logp_s: torch.Tensor, target: torch.Tensor, spec: ScoreSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return token_stats_chunk(logp_s, target, spec)

    def signal_to(self, logp_s: torch.Tensor, target: torch.Tensor, kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's loss and squared gradient norm w.r.t. the (tempered) student logits, in closed form."""
        return dense_signal(logp_s, target, kind, beta)


@dataclass
class TopKTeacher:
    """The teacher's top-K next-token ids and log-probs at N positions (teacher.backend=vllm_topk)."""

    ids: torch.Tensor  # [N, K] int64
    logp: torch.Tensor  # [N, K] float
    dense = False

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: torch.Tensor | slice) -> TopKTeacher:
        return TopKTeacher(self.ids[index], self.logp[index])

    def target(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[rows], self.logp[rows]

    def divergence_to(self, logp_s: torch.Tensor, target: tuple, kind: str, beta: float) -> torch.Tensor:
        return token_divergence(*topk_buckets(logp_s, *target), kind, beta)

    @torch.no_grad()
    def stats_to(self, logp_s: torch.Tensor, target: tuple, spec: ScoreSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """H over the student's full vocab; D over the K + 1 buckets (spec.topk does not apply: K is the engine's)."""
        logp_s = logp_s.float()
        return entropy(logp_s), self.divergence_to(logp_s, target, spec.divergence, spec.jsd_beta)

    def stats(self, logp_s: torch.Tensor, rows: slice, spec: ScoreSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stats_to(logp_s, self.target(rows), spec)

    def support_mass(self, logp_s: torch.Tensor, rows: slice, k: int) -> torch.Tensor:
        """C [C] over the student's top k that the teacher's list holds: a lower bound (scores.topk_support_mass)."""
        return topk_support_mass(logp_s, *self.target(rows), k)

    def signal_to(self, logp_s: torch.Tensor, target: tuple, kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's loss over the K + 1 buckets and its squared gradient norm w.r.t. the student logits (autograd)."""
        return topk_signal(logp_s, *target, kind, beta)

if TYPE_CHECKING:  # the targets themselves need torch only; building them needs the models (transformers)
    from tip_cli.models import Pair
    from tip_cli.rollout.batch import Batch


@torch.no_grad()
def teacher_targets(
    pair: Pair, batch: Batch, parts: list[tuple[Batch, int, int]], scorer=None, temperature: float = 1.0
) -> Teacher:
    """The teacher's view of the N response positions: its hidden states (divided by `temperature`) per micro-batch
    of `parts`, or top-K log-probs from `scorer` (a VLLMTeacher or ServerTeacher; at T = 1 only:
    tip_cli.train.recipe.specs)."""
    from tip_cli.models import head_weight, response_hidden

    if scorer is not None:
        lengths = batch.attention_mask.sum(1).tolist()
        seqs = [row[:n] for row, n in zip(batch.input_ids.tolist(), lengths, strict=True)]
        positions = [m.nonzero()[:, 0].tolist() for m in batch.target_mask.cpu()]
        ids, logp = scorer.topk_logprobs(seqs, positions)
        return TopKTeacher(ids.to(pair.device), logp.to(pair.device))
    hidden = torch.cat([response_hidden(pair.teacher, mb, temperature) for mb, _, _ in parts])  # [N, d_T]
    return DenseTeacher(hidden, head_weight(pair.teacher), pair.vocab)
