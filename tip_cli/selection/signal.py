"""Where a step's learning signal comes from (SPEC 7a): each token's loss l_t and the squared norm of its exact
gradient with respect to the student's logits, ||g_t||^2, and the shares of them that the kept set and each quadrant
hold; how far the kept set is from the entropy-only and divergence-only top-K; the teacher's mass in its top-K.

The per-token functions take [C, V] log-prob rows at the distillation temperature T, u = z / T, and return the
gradient with respect to u; the gradient with respect to the raw logits z is that divided by T (the trainer scales
it). Closed forms, g = dl/du (p = p_S, q = p_T, rows independent):
    reverse_kl  l = KL(p || q)     g = p (log p - log q - l)
    forward_kl  l = KL(q || p)     g = p - q
    jsd(beta)   m = beta q + (1 - beta) p,  a = (1 - beta)(log p - log m),  g = p (a - sum_v p a)
A top-K teacher's loss over K + 1 buckets (scores.topk_buckets) takes autograd on the chunk's log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tip_cli.selection.quadrants import TokenStats
from tip_cli.selection.scores import _finite, rowdot, stats_from_logits, token_divergence, topk_buckets
from tip_cli.selection.selectors import top_count


@dataclass
class Signal:
    """Per-token learning-signal values over N tokens, in the order of H and D."""

    loss: torch.Tensor  # [N] l_t, the loss's per-token divergence (before the normaliser)
    grad_sq: torch.Tensor  # [N] ||dl_t / dz_t||^2 over the vocabulary, z the raw logits
    topk_mass: torch.Tensor | None = None  # [N] the teacher's probability mass in its top-K, when it has one


def _jsd_end(kind: str, beta: float) -> str:
    """jsd at beta 0 / 1 is forward / reverse KL exactly (scores.jsd)."""
    if kind == "jsd" and beta <= 0.0:
        return "forward_kl"
    if kind == "jsd" and beta >= 1.0:
        return "reverse_kl"
    return kind


@torch.no_grad()
def dense_signal(
    logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_t [C], ||dl_t / du_t||^2 [C]) of divergence `kind` against a full-vocab teacher, logp_s/logp_t [C, V]."""
    ls, lt = _finite(logp_s.float()), _finite(logp_t.float())
    p = ls.exp()
    kind = _jsd_end(kind, beta)
    if kind == "reverse_kl":
        diff = ls - lt
        loss = rowdot(p, diff)
        g = diff.sub_(loss[:, None]).mul_(p)
    elif kind == "forward_kl":
        q = lt.exp()
        loss = rowdot(q, lt - ls)
        g = p.sub(q)
    elif kind == "jsd":
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log(1.0 - beta))
        a = (ls - log_m).mul_(1.0 - beta)
        g = a.sub_(rowdot(p, a)[:, None]).mul_(p)
        loss = token_divergence(ls, lt, kind, beta)
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    return loss, rowdot(g, g)


@torch.no_grad()
def entropy_reverse_kl_signal(
    logp_s: torch.Tensor, logp_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H [C], KL(p_S || p_T) [C], ||dKL/du||^2 [C]) from fp32 log-probs [C, V], overwriting both: the scoring
    pass's scores.entropy_and_reverse_kl (the same operations, so H and D are bitwise those) with the gradient
    g = p_S (log p_S - log p_T - KL) formed in place over log p_S - log p_T, at one row dot more."""
    low = torch.finfo(logp_s.dtype).min
    ls = logp_s.clamp_min_(low)
    p = ls.exp()
    ent = -rowdot(p, ls)
    diff = logp_t.clamp_min_(low).neg_().add_(ls)
    kl = rowdot(p, diff)
    g = diff.sub_(kl[:, None]).mul_(p)
    return ent, kl, rowdot(g, g)


def topk_signal(
    logp_s: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor, kind: str, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_t [C], ||dl_t / du_t||^2 [C]) of the loss over K + 1 buckets against a top-K teacher (ids, logp_t [C, K]),
    by autograd through the log-softmax (shift-invariant, so the gradient at log p equals the one at the logits)."""
    with torch.enable_grad():
        x = logp_s.detach().float().requires_grad_()
        loss = token_divergence(*topk_buckets(x.log_softmax(-1), ids, logp_t), kind, beta)  # [C]
        (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), rowdot(g, g)


def topk_mass(logp_t: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The teacher's probability mass in its top-k tokens [C]: logp_t [C, K] a top-K list (k None: all of it) or
    [C, V] full log-probs."""
    top = logp_t.float() if k is None or k >= logp_t.shape[-1] else logp_t.float().topk(k, dim=-1).values
    return top.logsumexp(-1).exp()


def _ratios(num: list[float], den: float) -> list[float]:
    return [x / den if den > 0 else 0.0 for x in num]


def _overlap(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(|a ∩ b|, |a ∪ b|) as a float64 [2] tensor on the device, a given as its [n] mask and b as indices."""
    other = torch.zeros_like(mask)
    other[idx.to(mask.device)] = True
    return torch.stack([(mask & other).sum(), (mask | other).sum()]).double()


def jaccard(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets into n tokens; 0.0 when both are empty."""
    mask = torch.zeros(n, dtype=torch.bool, device=a.device)
    mask[a] = True
    inter, union = _overlap(mask, b).tolist()
    return inter / union if union else 0.0


def signal_metrics(stats: TokenStats, kept: torch.Tensor, signal: Signal) -> dict[str, float]:
    """SPEC 7a's grad/, loss/, select/overlap_ and teacher/topk_mass metrics of one step; kept [K] indexes the N
    tokens of stats and signal. Shares over an empty (or all-zero) set log 0.0."""
    n = len(stats)
    q = stats.quadrant
    mask = torch.zeros(n, dtype=torch.bool, device=q.device)
    mask[kept] = True
    g, loss = signal.grad_sq.double().to(q.device), signal.loss.double().to(q.device)
    zero = torch.zeros((), dtype=torch.float64, device=q.device)
    k = kept.numel()
    # one host read for every metric: the per-quadrant sums, the two overlaps' counts and the top-K mass statistics
    sums = torch.stack([  # [3, 4]: per-quadrant sums of grad, kept grad, kept loss (bins 1..4)
        torch.bincount(q, weights=g, minlength=5),
        torch.bincount(q, weights=torch.where(mask, g, zero), minlength=5),
        torch.bincount(q, weights=torch.where(mask, loss, zero), minlength=5),
    ])[:, 1:5].reshape(-1)
    parts = [sums, _overlap(mask, top_count(stats.entropy, k)), _overlap(mask, top_count(stats.divergence, k))]
    mass = None if signal.topk_mass is None else signal.topk_mass.float().to(q.device)
    if mass is not None and mass.numel():
        parts.append(torch.stack([mass.mean(), torch.quantile(mass, 0.1)]).double())
    values = torch.cat(parts).tolist()
    rows = [values[0:4], values[4:8], values[8:12]]
    total, kept_total, kept_loss = (sum(r) for r in rows)
    out = {"grad/kept_share": kept_total / total if total > 0 else 0.0}
    for name, part, den in (("grad/q", rows[0], total), ("grad/kept_q", rows[1], kept_total),
                            ("loss/q", rows[2], kept_loss)):
        for i, share in enumerate(_ratios(part, den)):
            out[f"{name}{i + 1}_share"] = share
    for name, (inter, union) in (("entropy", values[12:14]), ("divergence", values[14:16])):
        out[f"select/overlap_{name}"] = inter / union if union else 0.0
    if mass is not None:
        out["teacher/topk_mass"], out["teacher/topk_mass_p10"] = values[16:18] if mass.numel() else (0.0, 0.0)
    return out


def stats_signal_from_logits(
    z_s: torch.Tensor, z_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores.stats_from_logits (H, KL, log Z_S, log Z_T) and ||dKL/du||^2 [C], from both models' logits [C, V];
    written for torch.compile, which fuses the gradient's norm into the same passes over z_s and z_t."""
    ent, kl, log_z_s, log_z_t = stats_from_logits(z_s, z_t)
    logp_s = _finite(z_s.to(kl.dtype) - log_z_s[:, None])
    logp_t = _finite(z_t.to(kl.dtype) - log_z_t[:, None])
    g = logp_s.exp() * (logp_s - logp_t - kl[:, None])
    return ent, kl, log_z_s, log_z_t, (g * g).sum(-1)
