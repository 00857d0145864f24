"""Per-batch normalisation of a token score into [0, 1] (SPEC 3)."""

from __future__ import annotations

import torch

from tip_cli.selection.options import NORMS


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


def robust_minmax(x: torch.Tensor, lo: float = 0.05, hi: float = 0.95, eps: float = 1e-12) -> torch.Tensor:
    """(x - q_lo) / (q_hi - q_lo) clipped to [0, 1], with q the batch's lo / hi quantiles of x [N] (linear
    interpolation, as numpy's default), taken in float64; all zeros when q_hi - q_lo < eps. The teachability
    selector's norm: quantile_clip at [lo, hi] but for the spread below which it calls the batch flat."""
    if x.numel() == 0:
        return x.float()
    x64 = x.double()
    q_lo, q_hi = torch.quantile(x64, torch.tensor([lo, hi], dtype=torch.float64, device=x.device)).tolist()
    out = torch.zeros_like(x64) if q_hi - q_lo < eps else ((x64 - q_lo) / (q_hi - q_lo)).clamp(0.0, 1.0)
    return out.to(x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
