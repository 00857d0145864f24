"""selection/ (scores, normalize, quadrants) against plain-Python float64 references: the two axes, normalisation, quadrants, metrics."""

import math

import pytest
import torch

from tip_cli.config.schema import ImportanceConfig
from tip_cli.selection.normalize import normalize
from tip_cli.selection.quadrants import compute_stats, stats_metrics
from tip_cli.selection.scores import token_stats_chunk

# ---------- references (plain Python, float64) ----------


def ref_entropy(p):
    return -sum(pv * math.log(pv) for pv in p if pv > 0)


def ref_kl(p, q):
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q, strict=True) if pv > 0)


def ref_divergence(ps, pt, kind, beta=0.5):
    if kind == "reverse_kl":
        return ref_kl(ps, pt)
    if kind == "forward_kl":
        return ref_kl(pt, ps)
    m = [beta * t + (1 - beta) * s for s, t in zip(ps, pt, strict=True)]
    return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)


def ref_restrict(p, idx):
    z = sum(p[i] for i in idx)
    return [p[i] / z for i in idx]


def ref_quantile(xs, q):
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def ref_minmax(xs):
    lo, hi = min(xs), max(xs)
    return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]


def ref_rank(xs):
    n = len(xs)
    ranks = [sum(y < x for y in xs) + (sum(y == x for y in xs) - 1) / 2 for x in xs]
    return [r / max(n - 1, 1) for r in ranks]


def ref_quantile_clip(xs, lo_q, hi_q):
    lo, hi = ref_quantile(xs, lo_q), ref_quantile(xs, hi_q)
    return ref_minmax([min(max(x, lo), hi) for x in xs])


def log_probs(seed, c=5, v=11, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(c, v, generator=g, dtype=torch.float64)).log_softmax(-1)


# ---------- the two axes ----------


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("topk", [None, 3])
def test_token_stats_chunk_matches_loop(kind, beta, topk):
    logp_s, logp_t = log_probs(0), log_probs(1)
    h, d = token_stats_chunk(logp_s, logp_t, ImportanceConfig(divergence=kind, jsd_beta=beta, topk=topk))
    assert h.dtype == d.dtype == torch.float32 and h.shape == d.shape == (5,)
    for row in range(5):
        ps, pt = logp_s[row].exp().tolist(), logp_t[row].exp().tolist()
        assert h[row].item() == pytest.approx(ref_entropy(ps), abs=1e-5)  # always the full vocab
        if topk is not None:
            idx = sorted(range(len(pt)), key=lambda i: -pt[i])[:topk]
            ps, pt = ref_restrict(ps, idx), ref_restrict(pt, idx)
        assert d[row].item() == pytest.approx(ref_divergence(ps, pt, kind, beta), abs=1e-5)


@pytest.mark.parametrize("beta,kind", [(0.0, "forward_kl"), (0.5, "jsd"), (1.0, "reverse_kl")])
@pytest.mark.parametrize("topk", [None, 4])
def test_jsd_divergence_at_its_ends_is_forward_and_reverse_kl(beta, kind, topk):
    """D with divergence=jsd: beta 0 -> KL(T || S), beta 1 -> KL(S || T) (TRL's convention), never a constant 0."""
    logp_s, logp_t = log_probs(7), log_probs(8)
    _, d = token_stats_chunk(logp_s, logp_t, ImportanceConfig(divergence="jsd", jsd_beta=beta, topk=topk))
    for row in range(5):
        ps, pt = logp_s[row].exp().tolist(), logp_t[row].exp().tolist()
        if topk is not None:
            idx = sorted(range(len(pt)), key=lambda i: -pt[i])[:topk]
            ps, pt = ref_restrict(ps, idx), ref_restrict(pt, idx)
        want = ref_divergence(ps, pt, kind, beta)
        assert want > 1e-3 and d[row].item() == pytest.approx(want, rel=1e-5)


def test_topk_below_two_is_a_config_error():
    from tip_cli.config.schema import ConfigError

    with pytest.raises(ConfigError, match="importance.topk=1 must be >= 2"):
        ImportanceConfig(topk=1)


def test_topk_restriction_changes_divergence_and_full_k_does_not():
    logp_s, logp_t = log_probs(2), log_probs(3)
    full = token_stats_chunk(logp_s, logp_t, ImportanceConfig())[1]
    assert torch.equal(token_stats_chunk(logp_s, logp_t, ImportanceConfig(topk=11))[1], full)
    assert not torch.allclose(token_stats_chunk(logp_s, logp_t, ImportanceConfig(topk=2))[1], full)


def test_token_stats_chunk_upcasts_low_precision_and_has_no_grad():
    logp_s = log_probs(4).float().requires_grad_()
    h, d = token_stats_chunk(logp_s.bfloat16(), log_probs(5).bfloat16(), ImportanceConfig())
    assert h.dtype == d.dtype == torch.float32 and not h.requires_grad and not d.requires_grad
    assert (d > -1e-3).all()


def test_identical_distributions_have_zero_divergence():
    logp = log_probs(6)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        d = token_stats_chunk(logp, logp, ImportanceConfig(divergence=kind))[1]
        assert d.abs().max() < 1e-6


# ---------- normalisation ----------

REFS = {
    "minmax": ref_minmax,
    "rank": ref_rank,
    "quantile_clip": lambda xs: ref_quantile_clip(xs, 0.1, 0.9),
}


@pytest.mark.parametrize("method", list(REFS))
def test_normalize_matches_reference(method):
    xs = [3.0, -1.0, 7.5, 3.0, 0.2, 12.0, 3.0, -4.0, 100.0, 0.0]  # with ties and an outlier
    out = normalize(torch.tensor(xs, dtype=torch.float64), method, clip_lo=0.1, clip_hi=0.9)
    assert out.tolist() == pytest.approx(REFS[method](xs), abs=1e-12)
    assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("method,equal_value", [("minmax", 0.0), ("rank", 0.5), ("quantile_clip", 0.0)])
def test_normalize_degenerate(method, equal_value):
    assert normalize(torch.full((6,), 2.5), method).tolist() == [equal_value] * 6
    assert normalize(torch.tensor([4.0]), method).tolist() == [0.0]
    assert normalize(torch.empty(0), method).numel() == 0


def test_normalize_rejects_unknown_method():
    with pytest.raises(ValueError, match="minmax"):
        normalize(torch.ones(3), "zscore")


# ---------- quadrants ----------


def test_quadrants_on_hand_built_batch_with_median_split():
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])  # median 2.5: tokens 2, 3 high
    d = torch.tensor([4.0, 1.0, 3.0, 2.0])  # median 2.5: tokens 0, 2 high
    stats = compute_stats(h, d, torch.zeros(4, dtype=torch.long), ImportanceConfig())
    assert stats.h_thr == pytest.approx(2.5) and stats.d_thr == pytest.approx(2.5)
    assert stats.quadrant.tolist() == [3, 4, 1, 2]
    assert stats.quadrant.dtype == torch.int64
    assert stats.h_norm.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    soft_or = [hn + dn - hn * dn for hn, dn in zip(stats.h_norm.tolist(), stats.d_norm.tolist(), strict=True)]
    assert stats.soft_or().tolist() == pytest.approx(soft_or)


def test_quadrants_with_other_quantile_and_absolute_thresholds():
    h, d = torch.arange(5.0), torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    seq = torch.zeros(5, dtype=torch.long)
    stats = compute_stats(h, d, seq, ImportanceConfig(h_threshold=0.75, d_threshold=0.2))
    assert stats.h_thr == pytest.approx(3.0) and stats.high_h.tolist() == [False, False, False, False, True]
    assert stats.high_d.tolist() == [True, False, True, True, True]
    stats = compute_stats(h, d, seq, ImportanceConfig(threshold="absolute", h_threshold=1.5, d_threshold=0.6))
    assert (stats.h_thr, stats.d_thr) == (1.5, 0.6)
    assert stats.quadrant.tolist() == [4, 4, 1, 2, 1]


def test_median_split_of_adjacent_fp32_middle_values():
    """An even batch whose two middle values a < b are adjacent fp32 numbers: the median (a + b) / 2 lies strictly
    between them (float64 reference), so b is high and a is low. In fp32 the midpoint rounds onto b (a's last
    mantissa bit is odd: ties to even), which would make b 'at the median', i.e. low."""
    a = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    b = torch.nextafter(a, torch.tensor(2.0))
    h = torch.stack([b, torch.tensor(0.5), a, torch.tensor(3.0)])  # sorted: 0.5, a, b, 3.0
    mid = (a.double() + b.double()) / 2
    assert a.double() < mid < b.double() and torch.quantile(h, 0.5) == b  # the fp32 premise
    stats = compute_stats(h, h.clone(), torch.zeros(4, dtype=torch.long), ImportanceConfig())
    want = (h.double() > mid).tolist()  # [True, False, False, True]
    assert stats.h_thr == mid.item() and stats.high_h.tolist() == want and stats.high_d.tolist() == want
    assert stats.quadrant.tolist() == [1, 4, 4, 1]


def test_compute_stats_degenerate_batches():
    seq = torch.zeros(5, dtype=torch.long)
    flat = compute_stats(torch.zeros(5), torch.full((5,), 0.3), seq, ImportanceConfig())
    assert flat.quadrant.tolist() == [4] * 5 and flat.h_norm.tolist() == [0.0] * 5
    for n in (0, 1):
        for norm in ("minmax", "rank", "quantile_clip"):
            s = compute_stats(torch.ones(n), torch.ones(n), seq[:n], ImportanceConfig(norm=norm))
            assert len(s) == n and s.quadrant.tolist() == [4] * n and not s.soft_or().isnan().any()


def test_compute_stats_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one length"):
        compute_stats(torch.ones(3), torch.ones(4), torch.zeros(3, dtype=torch.long), ImportanceConfig())


# ---------- metrics ----------

METRIC_KEYS = {
    "tokens/total", "tokens/kept", "tokens/kept_frac",
    *(f"tokens/q{i}_frac" for i in range(1, 5)), *(f"tokens/kept_q{i}_frac" for i in range(1, 5)),
    "entropy/mean", "entropy/p50", "entropy/p90",
    "div/mean", "div/p50", "div/p90", "div/kept_mean", "div/dropped_mean",
    "select/h_threshold", "select/d_threshold",
}  # fmt: skip


def random_stats(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, d = torch.rand(n, generator=g) * 3, torch.rand(n, generator=g) ** 2
    return compute_stats(h, d, torch.arange(n) // 20, ImportanceConfig(h_threshold=0.3, d_threshold=0.7))


def test_stats_metrics_match_direct_counts():
    stats = random_stats()
    kept = torch.tensor([0, 3, 4, 10, 11, 12, 30, 41, 59])
    m = stats_metrics(stats, kept)
    assert set(m) == METRIC_KEYS
    q, h, d = stats.quadrant.tolist(), stats.entropy.tolist(), stats.divergence.tolist()
    kept_set = set(kept.tolist())
    assert (m["tokens/total"], m["tokens/kept"], m["tokens/kept_frac"]) == (60, 9, pytest.approx(9 / 60))
    for i in range(1, 5):
        assert m[f"tokens/q{i}_frac"] == pytest.approx(q.count(i) / 60)
        assert m[f"tokens/kept_q{i}_frac"] == pytest.approx(sum(q[j] == i for j in kept_set) / 9)
    assert sum(m[f"tokens/q{i}_frac"] for i in range(1, 5)) == pytest.approx(1.0)
    assert sum(m[f"tokens/kept_q{i}_frac"] for i in range(1, 5)) == pytest.approx(1.0)
    assert m["entropy/mean"] == pytest.approx(sum(h) / 60, rel=1e-6)
    assert m["entropy/p90"] == pytest.approx(ref_quantile(h, 0.9), rel=1e-6)
    assert m["div/p50"] == pytest.approx(ref_quantile(d, 0.5), rel=1e-6)
    assert m["div/kept_mean"] == pytest.approx(sum(d[j] for j in kept_set) / 9, rel=1e-6)
    dropped = [d[j] for j in range(60) if j not in kept_set]
    assert m["div/dropped_mean"] == pytest.approx(sum(dropped) / 51, rel=1e-6)
    assert (m["select/h_threshold"], m["select/d_threshold"]) == (stats.h_thr, stats.d_thr)


def test_stats_metrics_empty_sets_give_zeros_not_nan():
    empty = torch.empty(0, dtype=torch.long)
    for stats in (random_stats(), random_stats(n=0)):
        m = stats_metrics(stats, empty)
        assert set(m) == METRIC_KEYS and not any(math.isnan(v) for v in m.values())
        assert m["div/kept_mean"] == 0.0 and m["tokens/kept_q3_frac"] == 0.0
    m = stats_metrics(random_stats(), torch.arange(60))
    assert m["div/dropped_mean"] == 0.0 and m["tokens/kept_frac"] == 1.0
