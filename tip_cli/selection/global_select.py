"""Token selection over the global batch (SPEC 2-5 across ranks): the scores of every rank gathered in rank order, so
the normalisation, the quadrant thresholds and the top-K budget are those of one process holding the whole batch,
computed identically on every rank (same generator seed); each rank keeps the selected indices in its own slice.

How the ranks' tensors meet is injected (`Ranks`): tip_cli.train.parallel passes torch.distributed's all-gathers under
torchrun, one process passes `ONE`, the identity; nothing here touches torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tip_cli.selection import quadrants, selectors
from tip_cli.selection.signal import Signal, signal_metrics


@dataclass(frozen=True)
class Ranks:
    """This process among the ranks of a job: `sizes(*counts, device=)` every rank's counts [world, len(counts)]
    int64; `gather(x, sizes)` every rank's x [sizes[r], ...] concatenated in rank order (along the first dim).
    `joined`: part of a torchrun job (a world of 1 included), so the counts and the loss normaliser are summed over
    the ranks."""

    rank: int
    sizes: Callable[..., torch.Tensor]
    gather: Callable[[torch.Tensor, list[int]], torch.Tensor]
    joined: bool = True


def _own_sizes(*counts: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([counts], dtype=torch.long)


ONE = Ranks(0, _own_sizes, lambda x, sizes: x, joined=False)  # a single process: its tokens are the batch


@dataclass
class Selection:
    """The selected tokens of one step, and what the loss and the logs need of them."""

    stats: quadrants.TokenStats  # over the selection's scope: the global batch, or this rank's tokens (rank_scope local)
    kept: torch.Tensor  # [K] indices into stats
    local: torch.Tensor  # [K_r] indices into this rank's N_r tokens: the ones its loss is built on
    normalizer: int  # the loss's divisor over all ranks: kept tokens (loss.norm=selected) or all tokens (total)
    metrics: dict[str, float]  # quadrants.stats_metrics, with global token counts


def gather_columns(ranks: Ranks, tokens: list[int], *cols: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Every rank's columns ([N_r] each, or None on every rank) in one all-gather: stacked as float64 [N_r, F]
    (exact for float32, bf16 and integers below 2^53), gathered into [N, F], and split back into their own dtypes."""
    present = [c for c in cols if c is not None]
    if not present:
        return list(cols)
    stacked = torch.stack([c.to(torch.float64) for c in present], 1)  # [N_r, F]
    gathered = iter(ranks.gather(stacked, tokens).unbind(1))  # F x [N]
    return [None if c is None else next(gathered).to(c.dtype) for c in cols]


def select_tokens(
    entropy: torch.Tensor, divergence: torch.Tensor, seq_id: torch.Tensor, rows: int, axis: quadrants.AxisSpec,
    selector: selectors.SelectorSpec, budget: float, generator: torch.Generator | None, signal: Signal | None = None,
    rank_scope: str = "global", norm: str = "selected", ranks: Ranks = ONE, support: torch.Tensor | None = None,
) -> Selection:
    """Stats and selection for this rank's N_r tokens (entropy, divergence, seq_id and the optional support mass C
    [N_r]; `rows` sequences). C is gathered like H and D.

    `signal` (each token's loss and gradient norm, [N_r] each) is gathered like H and D; its SPEC 7a metrics join
    the selection's, over the same tokens, and its grad_sq goes into the stats (the token samples' grad_norm).

    rank_scope global (default): over the tokens of every rank, concatenated in rank order, which is the order one process
    holding the whole batch would have, so the kept set and the normaliser match it exactly. rank_scope local: over this
    rank's tokens only (own normalisation, thresholds and budget; cheaper, no gather), the normaliser still global.
    `norm`: the loss's divisor counts the kept tokens (selected) or all of them (total).
    """
    if ranks.joined and rank_scope == "global":
        sizes = ranks.sizes(entropy.numel(), rows, device=entropy.device)  # [world, 2]: tokens, sequences
        tokens, seqs = sizes[:, 0].tolist(), sizes[:, 1].tolist()
        first_seq = sum(seqs[: ranks.rank])
        sig = (None, None, None) if signal is None else (signal.loss, signal.grad_sq, signal.topk_mass)
        ent, div, seq, sup, *sig = gather_columns(ranks, tokens, entropy, divergence, seq_id + first_seq, support, *sig)
        stats = quadrants.compute_stats(ent, div, seq, axis, sup)
        kept = selectors.select(stats, selector, budget, generator)  # [K], the same on every rank
        lo = sum(tokens[: ranks.rank])
        local = kept[(kept >= lo) & (kept < lo + tokens[ranks.rank])] - lo
        metrics = quadrants.stats_metrics(stats, kept)
        if signal is not None:
            signal = Signal(*sig)
        n, k = len(stats), kept.numel()
    else:
        if ranks.joined and generator is not None:  # independent noise per rank, as independent replicas would draw
            generator = torch.Generator(generator.device).manual_seed(generator.initial_seed() + ranks.rank)
        stats = quadrants.compute_stats(entropy, divergence, seq_id, axis, support)
        kept = local = selectors.select(stats, selector, budget, generator)
        metrics = quadrants.stats_metrics(stats, kept)
        n, k = len(stats), kept.numel()
        if ranks.joined:  # the counts (and so the loss normaliser) over all ranks; the other metrics are this rank's
            n, k = ranks.sizes(n, k, device=entropy.device).sum(0).tolist()
            metrics |= {"tokens/total": float(n), "tokens/kept": float(k), "tokens/kept_frac": k / n if n else 0.0}
    if signal is not None:
        stats.grad_sq = signal.grad_sq
        metrics |= signal_metrics(stats, kept, signal)
    return Selection(stats, kept, local, max(1, k if norm == "selected" else n), metrics)
