"""The two token scores of SPEC 2: student entropy H and teacher-student divergence D, per token; and the
teachability selector's third, the support mass C (the teacher's probability on the student's k likeliest tokens).

All functions take `[C, V]` log-prob rows (C tokens, V vocabulary entries) over the same vocab and return `[C]`,
in nats (C: a probability). `token_stats_chunk` gives (H, D) for one chunk of rows under a `ScoreSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tip_cli.selection.options import DIVERGENCES


@dataclass(frozen=True)
class ScoreSpec:
    """How D is taken: `divergence` (one of DIVERGENCES), JSD's `jsd_beta`, and `topk` = K to restrict D to the
    teacher's top-K tokens, renormalised (None: the full vocabulary)."""

    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    topk: int | None = None

    @property
    def plain_reverse_kl(self) -> bool:
        """D is KL(p_S || p_T) over the full vocabulary: what the compiled kernels (stats_from_logits) compute."""
        return self.divergence == "reverse_kl" and self.topk is None


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """log p with -inf raised to the lowest finite value, so that p * log p is 0, not NaN, where p = 0.

    Cheaper than masking: one [C, V] temporary instead of a mask, a zeros tensor and a `where` output.
    """
    return logp.clamp_min(torch.finfo(logp.dtype).min)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[c, v] * b[c, v] for each row c, [C, V] x [C, V] -> [C], as a batched matmul: no [C, V] product."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def entropy_and_reverse_kl(
    logp_s: torch.Tensor, logp_t: torch.Tensor, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """H(p_S) and KL(p_S || p_T) together, sharing p_S = exp(log p_S) and summing by row dots: one [C, V]
    temporary with `consume` (both inputs are then overwritten), three without."""
    low = torch.finfo(logp_s.dtype).min
    ls = logp_s.clamp_min_(low) if consume else _finite(logp_s)
    p_s = ls.exp()
    ent = -rowdot(p_s, ls)
    diff = (logp_t.clamp_min_(low) if consume else _finite(logp_t)).neg_().add_(ls)  # log p_S - log p_T
    return ent, rowdot(p_s, diff)


def stats_from_logits(
    z_s: torch.Tensor, z_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H(p_S), KL(p_S || p_T), log Z_S, log Z_T), each [C] in at least fp32, from both models' raw logits [C, V] in any float
    dtype (computed in at least fp32): log Z = logsumexp_v z, log p = z - log Z, H = -sum_v p_S log p_S, KL = sum_v p_S (log p_S - log p_T).

    Written for torch.compile (`backend=compiled`), which fuses it into a few reductions over z_s and z_t without
    an fp32 [C, V] block; run eagerly it holds several (the eager scoring pass uses entropy_and_reverse_kl).
    """
    acc = torch.promote_types(torch.promote_types(z_s.dtype, z_t.dtype), torch.float32)
    zs, zt = z_s.to(acc), z_t.to(acc)
    log_z_s, log_z_t = zs.logsumexp(-1, keepdim=True), zt.logsumexp(-1, keepdim=True)  # [C, 1]
    # a -inf logit (a masked token) has p = 0: as in the eager path (_finite), log p is raised to the lowest finite
    # value so that p * log p is 0 instead of 0 * -inf = NaN, which the row sum would spread to the whole row
    logp_s, logp_t = _finite(zs - log_z_s), _finite(zt - log_z_t)
    p_s = logp_s.exp()
    ent = -(p_s * logp_s).sum(-1)
    div = (p_s * (logp_s - logp_t)).sum(-1)
    return ent, div, log_z_s[:, 0], log_z_t[:, 0]


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p(v) log p(v); entries with p(v) = 0 (log p = -inf) contribute 0."""
    return -(logp.exp() * _finite(logp)).sum(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) [log p(v) - log q(v)]; terms with p(v) = 0 contribute 0 (q(v) = 0 < p(v): huge, finite)."""
    return (logp.exp() * (_finite(logp) - _finite(logq))).sum(-1)


def jsd(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), with m = beta * p_T + (1 - beta) * p_S, for 0 < beta < 1.

    The ends follow TRL's generalized JSD: beta = 0 is the forward KL(p_T || p_S), beta = 1 the reverse
    KL(p_S || p_T) (the formula itself tends to 0 there, m becoming one side, which would train nothing).
    """
    if beta <= 0.0:
        return kl(logp_t, logp_s)
    if beta >= 1.0:
        return kl(logp_s, logp_t)
    log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log(1.0 - beta))
    return beta * kl(logp_t, log_m) + (1.0 - beta) * kl(logp_s, log_m)


def token_divergence(logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str = "reverse_kl", beta: float = 0.5) -> torch.Tensor:
    """The student-teacher divergence named by `kind`: reverse_kl = KL(S||T), forward_kl = KL(T||S), jsd."""
    if kind == "reverse_kl":
        return kl(logp_s, logp_t)
    if kind == "forward_kl":
        return kl(logp_t, logp_s)
    if kind == "jsd":
        return jsd(logp_s, logp_t, beta)
    raise ValueError(f"unknown divergence {kind!r}; expected one of: {', '.join(DIVERGENCES)}")


def topk_buckets(
    logp_s: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor, min_tail: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions on K + 1 buckets: the teacher's top-K tokens and one tail bucket for everything else.

    logp_s [C, V] full student log-probs; ids [C, K] the teacher's top-K token ids; logp_t [C, K] their teacher
    log-probs. The student's tail is exact (logsumexp over the other V - K tokens); the teacher's is
    log(1 - sum_k p_T(k)), floored at log(min_tail) because a top-K list that holds (numerically) all the mass
    would otherwise leave an empty bucket that the student's tail mass diverges against. Returns two [C, K + 1]
    log-prob tensors whose last column is the tail.
    """
    top_s = logp_s.gather(-1, ids)  # [C, K]
    tail_s = logp_s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # [C, 1]
    mass_t = logp_t.to(torch.promote_types(logp_t.dtype, torch.float32)).logsumexp(-1, keepdim=True).clamp(max=math.log1p(-min_tail))  # [C, 1], log sum_k p_T
    tail_t = torch.log(-torch.expm1(mass_t))  # log(1 - sum_k p_T)
    return torch.cat([top_s, tail_s], -1), torch.cat([logp_t.to(top_s.dtype), tail_t.to(top_s.dtype)], -1)


@torch.no_grad()
def token_stats_chunk(
    logp_s: torch.Tensor, logp_t: torch.Tensor, spec: ScoreSpec, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """H_t = -sum_v p_S log p_S over the full vocab and D_t = divergence(p_S, p_T) (spec.divergence), both [C], fp32.

    logp_s, logp_t: [C, V] log-probs. With spec.topk = K, D is computed on both distributions restricted to the
    teacher's top-K tokens and renormalised: log p(v) - logsumexp_{u in topK} log p(u). `consume` lets the
    default reverse KL overwrite both inputs instead of allocating its temporaries.
    """
    if logp_s.shape != logp_t.shape:
        raise ValueError(
            f"student/teacher log-probs differ in shape: {tuple(logp_s.shape)} vs {tuple(logp_t.shape)}"
        )
    logp_s, logp_t = logp_s.float(), logp_t.float()  # [C, V]
    if spec.divergence == "reverse_kl" and (spec.topk is None or spec.topk >= logp_t.shape[-1]):
        return entropy_and_reverse_kl(logp_s, logp_t, consume)
    h = entropy(logp_s)  # [C]
    if spec.topk is not None and spec.topk < logp_t.shape[-1]:
        top = logp_t.topk(spec.topk, dim=-1).indices  # [C, K]
        logp_s = logp_s.gather(-1, top).log_softmax(-1)
        logp_t = logp_t.gather(-1, top).log_softmax(-1)
    d = token_divergence(logp_s, logp_t, spec.divergence, spec.jsd_beta)  # [C]
    return h, d


def top_support(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of each row's k largest entries of x [C, V] (log-probs or logits: the same order), ties to the lower
    id, as [C, min(k, V)] (a set per row, in no set order). topk decides every row whose k-th value ties no entry
    left out; in a row where one does (common in bf16) the ids above the k-th value are kept and the rest of the k
    filled with the lowest ids equal to it, so the set never depends on topk's internal order."""
    k = min(k, x.shape[-1])
    idx = x.topk(k, dim=-1).indices  # [C, k]
    kth = x.gather(-1, idx[:, -1:])  # [C, 1], the k-th largest value (topk sorts)
    tied = ((x >= kth).sum(-1) > k).nonzero()[:, 0]  # rows with an entry left out that equals the k-th
    if tied.numel():
        rows, at = x[tied], kth[tied]  # [R, V], [R, 1]
        above, equal = rows > at, rows == at
        keep = above | (equal & (equal.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k per row
        idx[tied] = keep.nonzero()[:, 1].view(-1, k)
    return idx


@torch.no_grad()
def support_mass(s: torch.Tensor, t: torch.Tensor, k: int, log_z_t: torch.Tensor | None = None) -> torch.Tensor:
    """C = sum_{v in top-k of p_S} p_T(v) [C], fp32 at least: the teacher's mass on the student's k likeliest tokens
    (ties to the lower id). s [C, V]: the student's log-probs or logits; t [C, V]: the teacher's log-probs, or its
    logits with their log-partition log_z_t [C]."""
    lt = t.gather(-1, top_support(s, k))  # [C, k]
    lt = lt.to(torch.promote_types(lt.dtype, torch.float32))
    if log_z_t is not None:
        lt = lt - log_z_t[:, None].to(lt.dtype)
    return lt.exp().sum(-1)


@torch.no_grad()
def topk_support_mass(logp_s: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor, k: int) -> torch.Tensor:
    """C against a top-K teacher (ids, logp_t [C, K], distinct ids per row): the teacher's mass on those of the
    student's k likeliest tokens that its list holds, [C]. A lower bound on the exact C: a student token outside the
    teacher's top-K counts 0, though the teacher gives it up to min_k p_T of its list."""
    mine = top_support(logp_s, k)  # [C, k]
    held = (mine[:, :, None] == ids[:, None, :]).any(1)  # [C, K]: the teacher's entries among the student's top k
    p_t = logp_t.to(torch.promote_types(logp_t.dtype, torch.float32)).exp()
    return (p_t * held).sum(-1)
