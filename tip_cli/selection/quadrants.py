"""The (H, D) view of a rollout batch (SPEC 3-4): both axes normalised, split at their thresholds, and the
quadrant of every valid response token.

The trainer scores positions chunk by chunk (`selection.scores.token_stats_chunk`), concatenates the N valid tokens
of the rollout batch and calls `compute_stats`; selectors read the resulting `TokenStats`; `stats_metrics` gives the
step's logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_cli.selection.normalize import normalize, robust_minmax
from tip_cli.selection.options import THRESHOLDS


def threshold(x: torch.Tensor, value: float, kind: str) -> float:
    """The quadrant split of one axis: `quantile` -> the value-quantile of x over the batch; `absolute` -> value (nats).

    The quantile is taken in float64: the median of an even batch is the midpoint of its two middle values, which
    fp32 cannot hold when they are adjacent fp32 numbers (it rounds onto one of them, putting that token on the
    wrong side of the strict >). An empty batch under `quantile` gives 0.0.
    """
    if kind == "absolute":
        return float(value)
    if kind != "quantile":
        raise ValueError(f"unknown threshold kind {kind!r}; expected one of: {', '.join(THRESHOLDS)}")
    return torch.quantile(x.double(), value).item() if x.numel() else 0.0


@dataclass(frozen=True)
class AxisSpec:
    """How both axes are normalised (`norm`, one of NORMS, with quantile_clip's `clip_lo`/`clip_hi`) and split:
    `threshold` quantile (h/d_threshold are per-batch quantiles) or absolute (in nats)."""

    norm: str = "minmax"
    clip_lo: float = 0.01
    clip_hi: float = 0.99
    threshold: str = "quantile"
    h_threshold: float = 0.5
    d_threshold: float = 0.5


@dataclass
class TokenStats:
    """H, D and their derived views over the N valid response tokens of one rollout batch (all tensors [N]), and
    each token's support mass C and squared logit-gradient norm when the step measured them."""

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
    grad_sq: torch.Tensor | None = None  # [N] ||dl_t / dz_t||^2 when the trainer measures it (selection.signal)
    support_mass: torch.Tensor | None = None  # [N] C_t in [0, 1] when the selector needs it (scores.support_mass)

    def __len__(self) -> int:
        return self.entropy.numel()

    def soft_or(self) -> torch.Tensor:
        """Soft-OR score s = 1 - (1 - H_hat)(1 - D_hat) = H_hat + D_hat - H_hat * D_hat, in [0, 1]."""
        return self.h_norm + self.d_norm - self.h_norm * self.d_norm

    def teachability(self) -> torch.Tensor:
        """Learnable disagreement norm(D) * norm(C), norm the robust min-max over the batch (normalize.robust_minmax),
        in [0, 1]: high where the teacher disagrees but puts its mass on tokens the student already considers."""
        if self.support_mass is None:
            raise ValueError("teachability needs each token's support mass C, which this step did not compute")
        return robust_minmax(self.divergence) * robust_minmax(self.support_mass)


def quadrant_of(high_h: torch.Tensor, high_d: torch.Tensor) -> torch.Tensor:
    """Q1 = high H & high D, Q2 = high H & low D, Q3 = low H & high D, Q4 = low H & low D, as int64 1..4."""
    return 1 + 2 * (~high_h).long() + (~high_d).long()


def compute_stats(
    entropy: torch.Tensor, divergence: torch.Tensor, seq_id: torch.Tensor, spec: AxisSpec,
    support_mass: torch.Tensor | None = None,
) -> TokenStats:
    """Normalise both axes (spec.norm), split each at its threshold (strict >, so an all-equal axis has no 'high'
    token) and assign quadrants. entropy, divergence, seq_id and the optional support mass C: [N]."""
    shapes = [x.shape for x in (entropy, divergence, seq_id, support_mass) if x is not None]
    if any(shape != entropy.shape for shape in shapes) or entropy.dim() != 1:
        raise ValueError(
            "entropy, divergence, seq_id (and support_mass) must be 1-D of one length; got "
            + ", ".join(str(tuple(shape)) for shape in shapes)
        )
    h_thr = threshold(entropy, spec.h_threshold, spec.threshold)
    d_thr = threshold(divergence, spec.d_threshold, spec.threshold)
    # compared in float64: a Python float against an fp32 tensor would be rounded to fp32 first
    high_h, high_d = entropy.double() > h_thr, divergence.double() > d_thr
    return TokenStats(
        entropy=entropy,
        divergence=divergence,
        seq_id=seq_id.long(),
        h_norm=normalize(entropy, spec.norm, spec.clip_lo, spec.clip_hi),
        d_norm=normalize(divergence, spec.norm, spec.clip_lo, spec.clip_hi),
        high_h=high_h,
        high_d=high_d,
        quadrant=quadrant_of(high_h, high_d),
        h_thr=h_thr,
        d_thr=d_thr,
        support_mass=support_mass,
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
    if stats.support_mass is not None:
        c = stats.support_mass
        out |= {"support/mean": _mean(c), "support/kept_mean": _mean(c[kept]), "support/dropped_mean": _mean(c[~kept])}
    return out
