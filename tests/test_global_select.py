"""Global token selection with the gather injected (tip_cli.selection.global_select): ranks simulated by threads that
all-gather through memory select what one process selects on the whole batch, and the single-process identity
touches no process group."""

from __future__ import annotations

import threading

import pytest
import torch

from tip_cli.selection import global_select, quadrants, selectors
from tip_cli.selection.selectors import SelectorSpec
from tip_cli.selection.signal import Signal

SEQ_LENS = [[5, 9, 3], [12, 7], [8, 1, 4, 6]]  # three ranks, unequal sequence and token counts
AXIS = quadrants.AxisSpec()
SPECS = [(SelectorSpec("soft_or"), 0.3), (SelectorSpec("divergence", scope="per_sequence"), 0.4),
         (SelectorSpec("random"), 0.6)]


class MemoryRanks:
    """An all-gather among threads: each puts its tensor in its slot, waits for the others, reads every slot."""

    def __init__(self, world: int):
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)
        self.gathers = [0] * world  # gather calls per rank

    def exchange(self, r: int, x):
        self.slots[r] = x
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody writes the next round before everyone has read this one
        return out

    def ranks(self, r: int) -> global_select.Ranks:
        def sizes(*counts: int, device: torch.device) -> torch.Tensor:
            return torch.stack(self.exchange(r, torch.tensor(counts)))

        def gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
            self.gathers[r] += 1
            parts = self.exchange(r, x)
            assert [p.shape[0] for p in parts] == sizes
            return torch.cat(parts)

        return global_select.Ranks(r, sizes, gather)


def whole_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lens = [n for rank in SEQ_LENS for n in rank]
    n = sum(lens)
    return {"entropy": (torch.rand(n, generator=g) * 3).round(decimals=1), "divergence": torch.rand(n, generator=g),
            "seq_id": torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)),
            "loss": torch.rand(n, generator=g), "grad_sq": torch.rand(n, generator=g)}


def on_ranks(spec: SelectorSpec, budget: float, rank_scope: str, norm: str) -> list[global_select.Selection]:
    data, mem = whole_batch(), MemoryRanks(len(SEQ_LENS))
    out: list = [None] * len(SEQ_LENS)

    def rank_main(r: int) -> None:
        lo, first = sum(map(sum, SEQ_LENS[:r])), sum(map(len, SEQ_LENS[:r]))
        mine = slice(lo, lo + sum(SEQ_LENS[r]))
        signal = Signal(data["loss"][mine], data["grad_sq"][mine], None)
        out[r] = global_select.select_tokens(
            data["entropy"][mine], data["divergence"][mine], data["seq_id"][mine] - first, len(SEQ_LENS[r]), AXIS,
            spec, budget, torch.Generator().manual_seed(7), signal, rank_scope=rank_scope, norm=norm, ranks=mem.ranks(r))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(SEQ_LENS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(s is not None for s in out), "a simulated rank failed"
    # H, D, the sequence ids and the signal travel in one all-gather (besides the sizes); local scope gathers none
    assert mem.gathers == [1 if rank_scope == "global" else 0] * len(SEQ_LENS)
    return out


@pytest.mark.parametrize("spec,budget", SPECS, ids=[s.name for s, _ in SPECS])
@pytest.mark.parametrize("norm", ["selected", "total"])
def test_ranks_select_what_one_process_selects_on_the_whole_batch(spec, budget, norm):
    data = whole_batch()
    stats = quadrants.compute_stats(data["entropy"], data["divergence"], data["seq_id"], AXIS)
    kept = selectors.select(stats, spec, budget, torch.Generator().manual_seed(7))
    n = data["entropy"].numel()
    sels = on_ranks(spec, budget, "global", norm)
    offsets = torch.tensor([0] + [sum(r) for r in SEQ_LENS]).cumsum(0).tolist()
    for r, sel in enumerate(sels):
        assert torch.equal(sel.kept, kept)
        assert torch.equal(sel.local, kept[(kept >= offsets[r]) & (kept < offsets[r + 1])] - offsets[r])
        assert sel.normalizer == max(1, kept.numel() if norm == "selected" else n)
        assert sel.metrics["tokens/total"] == n and sel.metrics["tokens/kept"] == kept.numel()
        assert torch.equal(sel.stats.grad_sq, data["grad_sq"])  # the signal is gathered like H and D
    assert torch.equal(torch.cat([s.local + o for s, o in zip(sels, offsets, strict=False)]), kept)


def test_local_scope_selects_per_rank_and_counts_over_all_ranks():
    spec, budget = SelectorSpec("soft_or"), 0.3
    data, sels = whole_batch(), on_ranks(spec, budget, "local", "selected")
    kept_total = 0
    for r, sel in enumerate(sels):
        lo, first = sum(map(sum, SEQ_LENS[:r])), sum(map(len, SEQ_LENS[:r]))
        mine = slice(lo, lo + sum(SEQ_LENS[r]))
        stats = quadrants.compute_stats(data["entropy"][mine], data["divergence"][mine], data["seq_id"][mine] - first,
                                        AXIS)
        own = selectors.select(stats, spec, budget)
        assert torch.equal(sel.local, own) and torch.equal(sel.kept, own)
        kept_total += own.numel()
    for sel in sels:
        assert sel.normalizer == kept_total and sel.metrics["tokens/total"] == whole_batch()["entropy"].numel()


def test_one_process_gathers_nothing(monkeypatch):
    """`ONE`, the single-process identity: the selection of the batch as it is, with no collective called."""
    import torch.distributed as dist

    def fail(*args, **kwargs):
        raise AssertionError("a collective was called in one process")

    monkeypatch.setattr(dist, "all_gather", fail)
    data = whole_batch()
    sel = global_select.select_tokens(data["entropy"], data["divergence"], data["seq_id"], 9, AXIS,
                                      SelectorSpec("soft_or"), 0.3, None)
    stats = quadrants.compute_stats(data["entropy"], data["divergence"], data["seq_id"], AXIS)
    kept = selectors.select(stats, SelectorSpec("soft_or"), 0.3)
    assert torch.equal(sel.kept, kept) and torch.equal(sel.local, kept)
    assert sel.normalizer == kept.numel() and sel.metrics == quadrants.stats_metrics(stats, kept)
