"""Token importance (SPEC 2-4): student entropy H, teacher-student divergence D, their per-batch normalisation,
and the (H, D) quadrant of every valid response token.

The trainer scores positions chunk by chunk with `token_stats_chunk`, concatenates the N valid tokens of the rollout
batch and calls `compute_stats`; selectors read the resulting `TokenStats`; `stats_metrics` gives the step's logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_cli.config import ImportanceConfig
from tip_cli.divergence import entropy as _entropy
from tip_cli.divergence import entropy_and_reverse_kl, token_divergence

NORMS = ("minmax", "rank", "quantile_clip")


@torch.no_grad()
def token_stats_chunk(
    logp_s: torch.Tensor, logp_t: torch.Tensor, cfg: ImportanceConfig, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """H_t = -sum_v p_S log p_S over the full vocab and D_t = divergence(p_S, p_T) (cfg.divergence), both [C], fp32.

    logp_s, logp_t: [C, V] log-probs. With cfg.topk = K, D is computed on both distributions restricted to the
    teacher's top-K tokens and renormalised: log p(v) - logsumexp_{u in topK} log p(u). `consume` lets the
    default reverse KL overwrite both inputs instead of allocating its temporaries.
    """
    if logp_s.shape != logp_t.shape:
        raise ValueError(
            f"student/teacher log-probs differ in shape: {tuple(logp_s.shape)} vs {tuple(logp_t.shape)}"
        )
    logp_s, logp_t = logp_s.float(), logp_t.float()  # [C, V]
    if cfg.divergence == "reverse_kl" and (cfg.topk is None or cfg.topk >= logp_t.shape[-1]):
        return entropy_and_reverse_kl(logp_s, logp_t, consume)
    h = _entropy(logp_s)  # [C]
    if cfg.topk is not None and cfg.topk < logp_t.shape[-1]:
        top = logp_t.topk(cfg.topk, dim=-1).indices  # [C, K]
        logp_s = logp_s.gather(-1, top).log_softmax(-1)
        logp_t = logp_t.gather(-1, top).log_softmax(-1)
    d = token_divergence(logp_s, logp_t, cfg.divergence, cfg.jsd_beta)  # [C]
    return h, d


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min); an all-equal x gives zeros (x - min is exactly 0, so no branch is needed)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def _average_rank(x: torch.Tensor) -> torch.Tensor:
    """0-based rank of each x, ties sharing the mean of their ranks: a group spanning ranks [s, e) gets (s + e - 1) / 2."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).to(x.dtype)
    return (end - (counts + 1).to(x.dtype) / 2)[inverse]


def normalize(x: torch.Tensor, method: str, clip_lo: float = 0.01, clip_hi: float = 0.99) -> torch.Tensor:
    """Map x [N] into [0, 1] over the batch (SPEC 3).

    minmax: (x - min) / (max - min), all-equal -> 0. rank: average rank / (N - 1), so all-equal -> 0.5 and N = 1 -> 0.
    quantile_clip: clip x to its [clip_lo, clip_hi] quantiles, then minmax.
    """
    if method not in NORMS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of: {', '.join(NORMS)}")
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()  # quantile/rank arithmetic needs fp32+
    if x.numel() == 0:
        return x.clone()
    if method == "rank":
        return _average_rank(x) / max(x.numel() - 1, 1)
    if method == "quantile_clip":
        lo, hi = torch.quantile(x, torch.tensor([clip_lo, clip_hi], dtype=x.dtype, device=x.device))
        x = x.clamp(lo, hi)
    return _minmax(x)


def threshold(x: torch.Tensor, value: float, kind: str) -> float:
    """The quadrant split of one axis: `quantile` -> the value-quantile of x over the batch; `absolute` -> value (nats).

    An empty batch under `quantile` gives 0.0.
    """
    if kind == "absolute":
        return float(value)
    if kind != "quantile":
        raise ValueError(f"unknown threshold kind {kind!r}; expected quantile or absolute")
    return torch.quantile(x.float(), value).item() if x.numel() else 0.0


@dataclass
class TokenStats:
    """H, D and their derived views over the N valid response tokens of one rollout batch (all tensors [N])."""

    entropy: torch.Tensor  # [N] float, nats
    divergence: torch.Tensor  # [N] float, nats
    seq_id: torch.Tensor  # [N] int64, the sequence each token belongs to
    h_norm: torch.Tensor  # [N] in [0, 1]
    d_norm: torch.Tensor  # [N] in [0, 1]
    high_h: torch.Tensor  # [N] bool, H > h_thr
    high_d: torch.Tensor  # [N] bool, D > d_thr
    quadrant: torch.Tensor  # [N] int64 in 1..4
    h_thr: float
    d_thr: float

    def __len__(self) -> int:
        return self.entropy.numel()

    def soft_or(self) -> torch.Tensor:
        """Soft-OR score s = 1 - (1 - H_hat)(1 - D_hat) = H_hat + D_hat - H_hat * D_hat, in [0, 1]."""
        return self.h_norm + self.d_norm - self.h_norm * self.d_norm


def quadrant_of(high_h: torch.Tensor, high_d: torch.Tensor) -> torch.Tensor:
    """Q1 = high H & high D, Q2 = high H & low D, Q3 = low H & high D, Q4 = low H & low D, as int64 1..4."""
    return 1 + 2 * (~high_h).long() + (~high_d).long()


def compute_stats(
    entropy: torch.Tensor, divergence: torch.Tensor, seq_id: torch.Tensor, cfg: ImportanceConfig
) -> TokenStats:
    """Normalise both axes (cfg.norm), split each at its threshold (strict >, so an all-equal axis has no 'high'
    token) and assign quadrants. entropy, divergence, seq_id: [N]."""
    if not entropy.shape == divergence.shape == seq_id.shape or entropy.dim() != 1:
        raise ValueError(
            f"entropy, divergence and seq_id must be 1-D of one length; got {tuple(entropy.shape)}, "
            f"{tuple(divergence.shape)}, {tuple(seq_id.shape)}"
        )
    h_thr = threshold(entropy, cfg.h_threshold, cfg.threshold)
    d_thr = threshold(divergence, cfg.d_threshold, cfg.threshold)
    high_h, high_d = entropy > h_thr, divergence > d_thr
    return TokenStats(
        entropy=entropy,
        divergence=divergence,
        seq_id=seq_id.long(),
        h_norm=normalize(entropy, cfg.norm, cfg.clip_lo, cfg.clip_hi),
        d_norm=normalize(divergence, cfg.norm, cfg.clip_lo, cfg.clip_hi),
        high_h=high_h,
        high_d=high_d,
        quadrant=quadrant_of(high_h, high_d),
        h_thr=h_thr,
        d_thr=d_thr,
    )


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item() if x.numel() else 0.0


def _quantile(x: torch.Tensor, q: float) -> float:
    return torch.quantile(x.float(), q).item() if x.numel() else 0.0


def _shares(quadrant: torch.Tensor) -> list[float]:
    """Fraction of the tokens in Q1..Q4; all 0.0 when there are none."""
    counts = torch.bincount(quadrant, minlength=5)[1:5].tolist()
    return [c / max(quadrant.numel(), 1) for c in counts]


def stats_metrics(stats: TokenStats, kept_idx: torch.Tensor) -> dict[str, float]:
    """The selection metrics of SPEC 7 for one step; kept_idx [K] indexes the N tokens. Empty sets log 0.0."""
    n, k = len(stats), kept_idx.numel()
    kept = torch.zeros(n, dtype=torch.bool, device=stats.entropy.device)
    kept[kept_idx] = True
    h, d = stats.entropy, stats.divergence
    out = {"tokens/total": float(n), "tokens/kept": float(k), "tokens/kept_frac": k / n if n else 0.0}
    shares_all, shares_kept = _shares(stats.quadrant), _shares(stats.quadrant[kept])
    for i in range(4):
        out[f"tokens/q{i + 1}_frac"] = shares_all[i]
        out[f"tokens/kept_q{i + 1}_frac"] = shares_kept[i]
    out |= {
        "entropy/mean": _mean(h),
        "entropy/p50": _quantile(h, 0.5),
        "entropy/p90": _quantile(h, 0.9),
        "div/mean": _mean(d),
        "div/p50": _quantile(d, 0.5),
        "div/p90": _quantile(d, 0.9),
        "div/kept_mean": _mean(d[kept]),
        "div/dropped_mean": _mean(d[~kept]),
        "select/h_threshold": stats.h_thr,
        "select/d_threshold": stats.d_thr,
    }
    return out
