"""Token selectors (SPEC 5): which of the N valid response tokens enter the distillation loss.

Every selector reduces to one rule: order the tokens by a tuple of keys (larger first, ties to the lower index),
optionally restricted to an eligible set, and keep the first K of each group, where the group is the whole batch
(`scope: batch`) or each sequence (`scope: per_sequence`) and K = budget_count(group size, budget).
Sampling without replacement is the same rule on Gumbel-perturbed keys (Gumbel top-k), so it is O(N log N).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import torch

from tip_cli.selection import options
from tip_cli.selection.options import CAP_BY
from tip_cli.selection.quadrants import TokenStats


@dataclass(frozen=True)
class SelectorSpec:
    """Which selector (`name`, a key of SELECTORS) and how: `mode` topk or sample (weight score ** `alpha`),
    `quadrants` for selector quadrant (e.g. ("Q3",)), `cap_by` the ranking that caps a mask selector at K, and
    `scope` batch or per_sequence: where the budget K is counted."""

    name: str = "soft_or"
    mode: str = "topk"
    alpha: float = 1.0
    quadrants: tuple[str, ...] = ("Q3",)
    cap_by: str = "divergence"
    scope: str = "batch"


def budget_count(n: int, budget: float) -> int:
    """K = max(1, floor(b * N + 1/2)) for N = n > 0 tokens (SPEC 5: round half up), capped at N; 0 for N = 0.

    b * N is taken exactly on b's decimal value (the shortest decimal that reads back as the float `budget`, i.e.
    what the user wrote), so a product that is a decimal half rounds up: 0.009 * 1500 = 13.5 gives K = 14, where
    the binary product 13.499999999999998 would give 13.
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(Decimal(repr(float(budget))) * n + Decimal("0.5"))))


def _sort_desc(order: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Reorder `order` by key[order], larger first, keeping the current order among ties (stable)."""
    return order[torch.sort(key[order], descending=True, stable=True).indices]


def _pick(
    stats: TokenStats,
    spec: SelectorSpec,
    budget: float,
    keys: tuple[torch.Tensor, ...],
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Within each group, the first K_g eligible tokens in the lexicographic order of `keys` (first key most
    significant; larger first; ties -> lower index); K_g = budget_count(N_g, budget). Returns sorted indices [<= K]."""
    n, device = len(stats), stats.entropy.device
    group = stats.seq_id if spec.scope == "per_sequence" else torch.zeros(n, dtype=torch.long, device=device)
    eligible = torch.ones(n, dtype=torch.bool, device=device) if eligible is None else eligible
    order = torch.arange(n, device=device)
    # stable sorts from the least significant key up: index < keys < eligibility < group
    for key in (*reversed(keys), eligible.to(torch.int8)):
        order = _sort_desc(order, key)
    order = order[torch.sort(group[order], stable=True).indices]
    _, counts = torch.unique_consecutive(group[order], return_counts=True)  # [G], tokens per group
    k_g = torch.tensor([budget_count(c, budget) for c in counts.tolist()], device=device)
    start = counts.cumsum(0) - counts
    rank_in_group = torch.arange(n, device=device) - start.repeat_interleave(counts)
    keep = (rank_in_group < k_g.repeat_interleave(counts)) & eligible[order]
    return order[keep].sort().values


def top_count(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k tokens of highest score [N] over the whole batch, ties to the lower index (the order `_pick` ranks
    by), as sorted indices [k]: the deterministic top-K of one axis that the overlap metrics compare a kept set to."""
    order = _sort_desc(torch.arange(score.numel(), device=score.device), score)
    return order[:k].sort().values


def _noise(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n iid Gumbel(0, 1) draws, -log E with E ~ Exp(1), from `generator` (on its own device, then moved)."""
    gen_device = generator.device if generator is not None else device
    e = torch.empty(n, device=gen_device).exponential_(generator=generator)
    return -e.clamp_min(torch.finfo(e.dtype).tiny).log().to(device)


def _sample_keys(
    score: torch.Tensor, alpha: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, ...]:
    """Gumbel top-k keys for sampling without replacement with weight w = max(score, 0) ** alpha:
    (w > 0, log w + G) puts zero-weight tokens after every positive one, and G orders them randomly."""
    g = _noise(score.numel(), generator, score.device)
    positive = score > 0
    log_w = alpha * score.clamp_min(torch.finfo(score.dtype).tiny).log()
    return positive.to(torch.int8), torch.where(positive, log_w + g, g)


def _by_score(stats, spec, budget, generator, score: torch.Tensor) -> torch.Tensor:
    """Top-K by score (mode topk) or K sampled without replacement with weight score ** alpha (mode sample)."""
    keys = _sample_keys(score, spec.alpha, generator) if spec.mode == "sample" else (score,)
    return _pick(stats, spec, budget, keys)


def _cap_score(stats: TokenStats, cap_by: str) -> torch.Tensor:
    """The ranking that caps a mask selector at K tokens."""
    if cap_by == "divergence":
        return stats.divergence
    if cap_by == "entropy":
        return stats.entropy
    if cap_by == "soft_or":
        return stats.soft_or()
    raise ValueError(f"selector.cap_by={cap_by!r}; expected one of: {', '.join(CAP_BY)}")


def _capped(stats, spec, budget, mask: torch.Tensor) -> torch.Tensor:
    """The tokens in `mask`; when more than K, the top K by spec.cap_by."""
    return _pick(stats, spec, budget, (_cap_score(stats, spec.cap_by),), eligible=mask)


def select_all(stats, spec, budget, generator):
    """Every token: full-token OPD, whatever the budget."""
    return torch.arange(len(stats), device=stats.entropy.device)


def select_random(stats, spec, budget, generator):
    """K tokens uniformly without replacement (top-K of iid noise)."""
    return _pick(stats, spec, budget, (_noise(len(stats), generator, stats.entropy.device),))


def select_entropy(stats, spec, budget, generator):
    """By raw student entropy H_t: weight H^alpha (sample) or top-K."""
    return _by_score(stats, spec, budget, generator, stats.entropy)


def select_divergence(stats, spec, budget, generator):
    """By raw teacher-student divergence D_t: weight D^alpha (sample) or top-K."""
    return _by_score(stats, spec, budget, generator, stats.divergence)


def select_soft_or(stats, spec, budget, generator):
    """By s = H_hat + D_hat - H_hat * D_hat: top-K (topk) or weight s^alpha (sample)."""
    return _by_score(stats, spec, budget, generator, stats.soft_or())


def select_teachability(stats, spec, budget, generator):
    """By learnable disagreement norm(D) * norm(C) (TokenStats.teachability): top-K (topk) or weight ** alpha
    (sample). At budget 1.0 every token, C or no C: the trainer's full-token step does not compute C."""
    if stats.support_mass is None and budget >= 1.0:
        return select_all(stats, spec, budget, generator)
    return _by_score(stats, spec, budget, generator, stats.teachability())


def select_hard_or(stats, spec, budget, generator):
    """high H or high D, capped at K."""
    return _capped(stats, spec, budget, stats.high_h | stats.high_d)


def select_and(stats, spec, budget, generator):
    """high H and high D (= Q1), capped at K."""
    return _capped(stats, spec, budget, stats.high_h & stats.high_d)


def select_quadrant(stats, spec, budget, generator):
    """Tokens whose quadrant is in spec.quadrants (e.g. [Q3]), capped at K."""
    wanted = torch.tensor([int(q[1:]) for q in spec.quadrants], dtype=torch.long, device=stats.quadrant.device)
    return _capped(stats, spec, budget, torch.isin(stats.quadrant, wanted))


Selector = Callable[[TokenStats, SelectorSpec, float, torch.Generator | None], torch.Tensor]
SELECTORS: dict[str, Selector] = {
    "all": select_all,
    "random": select_random,
    "entropy": select_entropy,
    "divergence": select_divergence,
    "soft_or": select_soft_or,
    "hard_or": select_hard_or,
    "and": select_and,
    "quadrant": select_quadrant,
    "teachability": select_teachability,
}
assert tuple(SELECTORS) == options.SELECTORS, "selection/options.py lists the selectors this registry holds"


# keep the top K_g of each group: all of it at budget 1.0
RANKING = ("random", "entropy", "divergence", "soft_or", "teachability")
SUPPORT = ("teachability",)  # rank by the support mass C, which the scoring pass computes only for these


def needs_support(spec: SelectorSpec) -> bool:
    """Whether selector spec.name reads each token's support mass C (importance.support_k)."""
    return spec.name in SUPPORT


def keeps_all(spec: SelectorSpec, budget: float) -> bool:
    """Whether `select` keeps every token whatever the scores: `all`, or a ranking selector at budget 1.0. The
    trainer then takes the statistics from the loss pass instead of scoring every token first."""
    return spec.name == "all" or (budget >= 1.0 and spec.name in RANKING)


def select(
    stats: TokenStats, spec: SelectorSpec, budget: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices [K] (int64, ascending) of the tokens selector spec.name keeps at this budget; empty when N = 0.

    Mask selectors (hard_or, and, quadrant) may return fewer than K tokens, or none."""
    if spec.name not in SELECTORS:
        raise ValueError(f"unknown selector {spec.name!r}; expected one of: {', '.join(SELECTORS)}")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} must be in (0, 1]; 1.0 keeps every token")
    if len(stats) == 0:
        return torch.empty(0, dtype=torch.long, device=stats.entropy.device)
    bad = ~torch.isfinite(stats.entropy) | ~torch.isfinite(stats.divergence)
    if stats.support_mass is not None:
        bad |= ~torch.isfinite(stats.support_mass)
    if bad.any():  # NaN ranks nowhere: min-max scores, thresholds and sorts would silently fall back to position order
        raise ValueError(f"{int(bad.sum())} of {len(stats)} tokens have a non-finite entropy or divergence; "
                         "selection needs finite scores (the trainer skips such a step before selecting)")
    return SELECTORS[spec.name](stats, spec, budget, generator)
