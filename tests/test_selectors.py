"""selection/selectors.py against plain sort / threshold references, and the sampling law of Gumbel top-k."""

from collections import Counter

import pytest
import torch

from tip_cli.config.schema import ImportanceConfig, SelectorConfig
from tip_cli.selection.quadrants import compute_stats
from tip_cli.selection.selectors import SELECTORS, budget_count, select

ALL_NAMES = ["all", "random", "entropy", "divergence", "soft_or", "hard_or", "and", "quadrant", "teachability"]
RANKING_NAMES = [*ALL_NAMES[:5], "teachability"]  # keep the top K of a score: every token at budget 1.0


def make_stats(h, d, seq=None):
    """Stats of (H, D) with a seeded support mass C in [0, 1], so that every selector can run on them."""
    h, d = torch.as_tensor(h, dtype=torch.float32), torch.as_tensor(d, dtype=torch.float32)
    seq = torch.zeros(len(h), dtype=torch.long) if seq is None else torch.as_tensor(seq, dtype=torch.long)
    c = torch.rand(len(h), generator=torch.Generator().manual_seed(len(h)))
    return compute_stats(h, d, seq, ImportanceConfig(), c)


def random_stats(n=40, n_seq=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, d = torch.rand(n, generator=g) * 2, torch.rand(n, generator=g) ** 3
    return make_stats(h, d, torch.randint(0, n_seq, (n,), generator=g))


def run(stats, budget, seed=0, **cfg):
    out = select(stats, SelectorConfig(**cfg), budget, torch.Generator().manual_seed(seed))
    assert out.dtype == torch.int64
    return out.tolist()


# ---------- references ----------


def ref_k(n, budget):
    return 0 if n == 0 else min(n, max(1, int(budget * n + 0.5)))


def ref_top(score, k, among=None):
    """The k best of `among` by score, ties to the lower index, returned ascending."""
    among = range(len(score)) if among is None else among
    return sorted(sorted(among, key=lambda i: (-score[i], i))[:k])


def ref_median(xs):
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def ref_norm(xs):
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) for x in xs]


def ref_soft_or(h, d):
    return [a + b - a * b for a, b in zip(ref_norm(h), ref_norm(d), strict=True)]


# ---------- budget ----------


def test_budget_count():
    assert [budget_count(10, b) for b in (0.01, 0.25, 0.5, 0.34, 1.0)] == [1, 3, 5, 3, 10]
    assert budget_count(0, 0.5) == 0 and budget_count(1, 0.01) == 1 and budget_count(5, 0.5) == 3


# (N, b, K by hand): b * N is a half in decimal (13.5, 4.5, 6.5, 0.5), rounded up; the first is 13.499999999999998
# in binary floating point, so floor(b * N + 0.5) on floats would give 13
@pytest.mark.parametrize("n,budget,k", [(1500, 0.009, 14), (10, 0.45, 5), (2000, 0.00325, 7), (3, 0.5, 2), (2, 0.25, 1),
                                        (1500, 0.0091, 14), (1500, 0.0089, 13)])
def test_budget_count_rounds_a_decimal_half_up(n, budget, k):
    assert budget_count(n, budget) == k


def test_budget_count_half_case_misses_in_binary():
    """The premise of the case above: the binary product lies below the half."""
    assert 1500 * 0.009 < 13.5 and int(1500 * 0.009 + 0.5) == 13


def test_registry_covers_every_configurable_selector():
    assert sorted(SELECTORS) == sorted(ALL_NAMES)


# ---------- ranking selectors ----------


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 0.77])
def test_topk_selectors_match_sort_reference(budget):
    stats = random_stats()
    h, d = stats.entropy.tolist(), stats.divergence.tolist()
    k = ref_k(40, budget)
    assert run(stats, budget, name="entropy", mode="topk") == ref_top(h, k)
    assert run(stats, budget, name="divergence", mode="topk") == ref_top(d, k)
    assert run(stats, budget, name="soft_or") == ref_top(ref_soft_or(h, d), k)


def test_topk_ties_break_to_lower_index():
    stats = make_stats([1.0, 2.0, 2.0, 2.0, 0.5], [0.0] * 5)
    assert run(stats, 0.4, name="entropy", mode="topk") == [1, 2]


@pytest.mark.parametrize("name", ["entropy", "divergence", "soft_or"])
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_per_sequence_counts_and_ranks_within_each_sequence(name, budget):
    stats = random_stats(n=50, n_seq=5, seed=1)
    scores = {"entropy": stats.entropy, "divergence": stats.divergence, "soft_or": stats.soft_or()}
    score = scores[name].tolist()
    seq = stats.seq_id.tolist()
    expected = []
    for s in set(seq):
        members = [i for i in range(50) if seq[i] == s]
        expected += ref_top(score, ref_k(len(members), budget), members)
    got = run(stats, budget, name=name, mode="topk", scope="per_sequence")
    assert got == sorted(expected)
    sampled = run(stats, budget, name=name, mode="sample", scope="per_sequence")
    assert Counter(seq[i] for i in sampled) == Counter(seq[i] for i in got)


@pytest.mark.parametrize("scope", ["batch", "per_sequence"])
@pytest.mark.parametrize("name", ALL_NAMES[:5])
@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_budget_one_keeps_every_token(name, mode, scope):
    stats = random_stats()
    assert run(stats, 1.0, name=name, mode=mode, scope=scope) == list(range(40))


def test_all_ignores_budget_and_random_is_uniform_subset():
    stats = random_stats()
    assert run(stats, 0.1, name="all") == list(range(40))
    picks = run(stats, 0.25, seed=3, name="random")
    assert len(picks) == 10 == len(set(picks)) and picks == sorted(picks)
    assert picks == run(stats, 0.25, seed=3, name="random") != run(stats, 0.25, seed=4, name="random")


# ---------- sampling ----------


@pytest.mark.parametrize("name", ["entropy", "divergence", "soft_or"])
def test_sampling_is_seeded_distinct_and_sorted(name):
    stats = random_stats()
    a = run(stats, 0.3, seed=7, name=name, mode="sample")
    assert a == run(stats, 0.3, seed=7, name=name, mode="sample")
    assert len(a) == 12 == len(set(a)) and a == sorted(a)
    assert any(run(stats, 0.3, seed=s, name=name, mode="sample") != a for s in range(8, 12))


def inclusion_probs(w, k):
    """Exact P(i in sample) for successive sampling without replacement, k in {1, 2}."""
    p = [x / sum(w) for x in w]
    if k == 1:
        return p
    return [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(len(p)) if j != i) for i in range(len(p))]


@pytest.mark.parametrize("k,alpha", [(1, 1.0), (2, 1.0), (1, 2.0)])
def test_sampling_inclusion_frequencies_follow_weights(k, alpha):
    h = [0.5, 1.0, 2.0, 4.0]
    stats = make_stats(h, [0.0] * 4)
    cfg = SelectorConfig(name="entropy", mode="sample", alpha=alpha)
    gen, draws = torch.Generator().manual_seed(0), 3000
    counts = Counter()
    for _ in range(draws):
        counts.update(select(stats, cfg, k / 4, gen).tolist())
    expected = inclusion_probs([x**alpha for x in h], k)
    for i in range(4):
        assert counts[i] / draws == pytest.approx(expected[i], abs=0.03)


def test_zero_weight_tokens_come_last_and_in_random_order():
    stats = make_stats([0.0, 0.0, 3.0, 0.0, 1e-3, 0.0], [0.0] * 6)
    fillers = set()
    for seed in range(20):
        picks = run(stats, 0.5, seed=seed, name="entropy", mode="sample")
        assert {2, 4} <= set(picks) and len(picks) == 3
        fillers |= set(picks) - {2, 4}
    assert len(fillers) > 1


def test_all_zero_entropy_does_not_crash():
    stats = make_stats([0.0] * 8, [0.1 * i for i in range(8)])
    assert run(stats, 0.25, name="entropy", mode="topk") == [0, 1]
    picks = run(stats, 0.25, name="entropy", mode="sample")
    assert len(set(picks)) == 2
    assert run(stats, 0.25, name="soft_or", mode="sample") and run(stats, 0.25, name="soft_or") == [6, 7]


# ---------- mask selectors ----------


def mask_reference(stats, keep, budget, cap_by):
    h, d = stats.entropy.tolist(), stats.divergence.tolist()
    hh, hd = ref_median(h), ref_median(d)
    members = [i for i in range(len(h)) if keep(h[i] > hh, d[i] > hd)]
    cap = {"divergence": d, "entropy": h, "soft_or": ref_soft_or(h, d)}[cap_by]
    return ref_top(cap, ref_k(len(h), budget), members)


MASKS = {
    "hard_or": (lambda hi_h, hi_d: hi_h or hi_d, {}),
    "and": (lambda hi_h, hi_d: hi_h and hi_d, {}),
    "quadrant": (lambda hi_h, hi_d: not hi_h and hi_d, {"quadrants": ["Q3"]}),
    "quadrant_q2q4": (lambda hi_h, hi_d: not hi_d, {"quadrants": ["Q2", "Q4"]}),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("cap_by", ["divergence", "entropy", "soft_or"])
@pytest.mark.parametrize("budget", [0.1, 0.3, 1.0])
def test_mask_selectors_match_threshold_reference(mask, cap_by, budget):
    stats = random_stats(seed=2)
    keep, extra = MASKS[mask]
    got = run(stats, budget, name=mask.split("_q")[0], cap_by=cap_by, **extra)
    assert got == mask_reference(stats, keep, budget, cap_by)


def test_mask_selectors_can_return_nothing():
    # high H exactly where D is low: only Q2 and Q3
    stats = make_stats([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0])
    assert run(stats, 0.5, name="and") == []
    assert run(stats, 0.5, name="quadrant", quadrants=["Q3"]) == [0, 1]
    assert run(stats, 1.0, name="quadrant", quadrants=["Q1"]) == []
    flat = make_stats([1.0] * 5, [2.0] * 5)  # nothing strictly above the median
    assert run(flat, 1.0, name="hard_or") == []


# ---------- degenerate inputs ----------


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_empty_and_single_token_batches(name, mode):
    assert run(make_stats([], []), 0.5, name=name, mode=mode) == []
    single = run(make_stats([0.7], [0.2]), 0.01, name=name, mode=mode)
    assert single == ([] if name in ("hard_or", "and", "quadrant") else [0])  # a lone token is not 'high'


def test_tiny_budget_keeps_one_token():
    stats = random_stats()
    assert len(run(stats, 0.001, name="soft_or")) == 1
    assert len(run(stats, 0.001, name="random")) == 1
    assert len(run(stats, 0.001, name="entropy", mode="topk", scope="per_sequence")) == 4


def test_select_rejects_bad_budget_and_name():
    stats, cfg = random_stats(), SelectorConfig()
    for budget in (0.0, 1.5):
        with pytest.raises(ValueError, match="budget"):
            select(stats, cfg, budget, torch.Generator())
    cfg.name = "top_entropy"
    with pytest.raises(ValueError, match="soft_or"):
        select(stats, cfg, 0.5, torch.Generator())


def test_generator_may_be_none():
    for name in ("random", "entropy"):
        assert len(select(random_stats(), SelectorConfig(name=name, mode="sample"), 0.5, None)) == 20


@pytest.mark.parametrize("budget", [0.5, 1.0])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_keeps_all_only_where_select_keeps_every_token(name, budget):
    """The trainer skips scoring when keeps_all says so: it must never say so where select drops a token."""
    from tip_cli.selection.selectors import keeps_all

    for seed in range(3):
        stats = random_stats(seed=seed)
        for scope in ("batch", "per_sequence"):
            kept = run(stats, budget, seed, name=name, scope=scope)
            if keeps_all(SelectorConfig(name=name, scope=scope), budget):
                assert kept == list(range(len(stats)))
    assert keeps_all(SelectorConfig(name=name), budget) == (name == "all" or (budget == 1.0 and name in RANKING_NAMES))
