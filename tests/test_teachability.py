"""The teachability selector (TA-OPD) against independent references: the support mass C by a plain per-row sort in
float64 (dense teacher, ties to the lower id; top-K teacher, the lower bound), the robust min-max by numpy's
quantiles, the kept set by a plain sort of norm(D) * norm(C), and a distill_step and a short run on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_signal_metrics import TopKScorer, full_logits, tiny  # noqa: F401 (tiny is a fixture)
from test_step_reference import make_batch

from tip_cli import tracking
from tip_cli.cli import compose_config
from tip_cli.config.schema import (
    ConfigError,
    ImportanceConfig,
    LossConfig,
    SelectorConfig,
    TipConfig,
    TrainConfig,
)
from tip_cli.models import Pair
from tip_cli.selection.normalize import robust_minmax
from tip_cli.selection.quadrants import compute_stats
from tip_cli.selection.scores import support_mass, top_support, topk_support_mass
from tip_cli.selection.selectors import budget_count, select
from tip_cli.tracking import read_jsonl
from tip_cli.train import recipe
from tip_cli.train.step import distill_step

# ---------------------------------------------------------------------------------------------------------------------
# References


def ref_top(row: list[float], k: int) -> list[int]:
    """The ids of the k largest entries of one row, ties to the lower id: a plain sort."""
    return sorted(range(len(row)), key=lambda v: (-row[v], v))[:k]


def ref_support(logp_s: torch.Tensor, logp_t: torch.Tensor, k: int) -> list[float]:
    """C_t = sum of p_T over the student's k likeliest tokens, float64, row by row."""
    p_t = logp_t.double().exp().tolist()
    return [math.fsum(p_t[r][v] for v in ref_top(row, k)) for r, row in enumerate(logp_s.double().tolist())]


def ref_topk_support(logp_s: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor, k: int) -> list[float]:
    """The teacher's listed mass on the student's k likeliest tokens (a token off its list counts 0)."""
    out = []
    for r, row in enumerate(logp_s.double().tolist()):
        listed = dict(zip(ids[r].tolist(), logp_t[r].double().exp().tolist(), strict=True))
        out.append(math.fsum(listed.get(v, 0.0) for v in ref_top(row, k)))
    return out


def ref_robust(x: np.ndarray) -> np.ndarray:
    """(x - q05) / (q95 - q05) clipped to [0, 1] with numpy's quantiles; zeros when q95 - q05 < 1e-12."""
    lo, hi = np.quantile(x, [0.05, 0.95])
    return np.zeros_like(x) if hi - lo < 1e-12 else np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def ref_teachability(d: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ref_robust(np.asarray(d, dtype=np.float64)) * ref_robust(np.asarray(c, dtype=np.float64))


def tied_logits(c: int, v: int, seed: int) -> torch.Tensor:
    """Integer logits in a narrow range: many rows tie at the k-th place."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 3, (c, v), generator=g).double()


# ---------------------------------------------------------------------------------------------------------------------
# C, the support mass


@pytest.mark.parametrize("k", [1, 3, 16, 40, 100])
def test_support_mass_of_a_dense_teacher_is_the_plain_sort_sum(k):
    z_s, z_t = tied_logits(30, 40, 0), torch.randn(30, 40, generator=torch.Generator().manual_seed(1)) * 3
    logp_s, logp_t = z_s.log_softmax(-1), z_t.double().log_softmax(-1)
    kth = [sorted(row, reverse=True)[min(k, 40) - 1] for row in z_s.tolist()]
    if k < 40:  # the tie rule matters: the k-th value recurs past the k-th place in some rows
        assert sum(sorted(row, reverse=True)[k:].count(t) > 0 for row, t in zip(z_s.tolist(), kth, strict=True)) > 5
    want = ref_support(logp_s, logp_t, k)
    got = support_mass(logp_s.float(), logp_t.float(), k)
    assert got.dtype == torch.float32 and got.shape == (30,)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-7)
    # from raw logits and the teacher's log-partition (the fused scoring path), in bf16 as well
    log_z_t = z_t.logsumexp(-1)
    np.testing.assert_allclose(support_mass(z_s.float(), z_t.float(), k, log_z_t.float()).numpy(), want, rtol=1e-5, atol=1e-7)
    zs16, zt16 = z_s.bfloat16(), z_t.bfloat16()
    got_bf16 = support_mass(zs16, zt16, k, zt16.float().logsumexp(-1))
    want_bf16 = ref_support(zs16.double().log_softmax(-1), zt16.double().log_softmax(-1), k)
    np.testing.assert_allclose(got_bf16.double().numpy(), want_bf16, rtol=1e-5, atol=1e-7)
    if k >= 40:
        np.testing.assert_allclose(got.numpy(), 1.0, rtol=1e-5)


def test_top_support_breaks_ties_to_the_lower_id():
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    for k in range(1, 7):
        got = [sorted(row) for row in top_support(x, k).tolist()]
        assert got == [sorted(ref_top(row, k)) for row in x.tolist()], k
    assert sorted(top_support(x, 3)[0].tolist()) == [1, 2, 3]  # 3, 3, then the first of the three 2s


@pytest.mark.parametrize("k_teacher", [2, 6, 40])
def test_support_mass_of_a_topk_teacher_is_its_listed_mass_a_lower_bound(k_teacher):
    z_s, z_t = tied_logits(25, 40, 2), torch.randn(25, 40, generator=torch.Generator().manual_seed(3)) * 2
    logp_s, logp_t = z_s.log_softmax(-1), z_t.double().log_softmax(-1)
    top = logp_t.topk(k_teacher, -1)
    ids, lt = top.indices, top.values.float()
    for k in (1, 4, 16):
        got = topk_support_mass(logp_s.float(), ids, lt, k)
        np.testing.assert_allclose(got.double().numpy(), ref_topk_support(logp_s, ids, lt, k), rtol=1e-5, atol=1e-7)
        exact = np.asarray(ref_support(logp_s, logp_t, k))
        assert (got.double().numpy() <= exact + 1e-6).all()
        if k_teacher == 40:  # the whole vocabulary listed: the bound is exact
            np.testing.assert_allclose(got.double().numpy(), exact, rtol=1e-5, atol=1e-7)
        else:
            assert (got.double().numpy() < exact - 1e-4).any()  # and somewhere strictly below


# ---------------------------------------------------------------------------------------------------------------------
# The robust min-max


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (7, 2), (200, 3), (1001, 4)])
def test_robust_minmax_matches_numpy_quantiles(n, seed):
    x = np.random.default_rng(seed).lognormal(size=n)
    for dtype in (torch.float64, torch.float32):
        got = robust_minmax(torch.tensor(x, dtype=dtype))
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), ref_robust(torch.tensor(x, dtype=dtype).double().numpy()),
                                   rtol=1e-6, atol=1e-6)
    got = robust_minmax(torch.tensor(x))
    if n >= 7:  # tokens past the 5% / 95% quantiles are clipped to 0 and 1
        assert got.min() == 0.0 and got.max() == 1.0 and (got == 1.0).sum() >= 1


def test_robust_minmax_of_a_flat_batch_is_zero():
    assert robust_minmax(torch.full((9,), 0.3)).tolist() == [0.0] * 9
    near = torch.tensor([1.0, 1.0 + 1e-13, 1.0 - 1e-13, 1.0], dtype=torch.float64)  # a spread below 1e-12
    assert robust_minmax(near).tolist() == [0.0] * 4
    assert robust_minmax(torch.zeros(0)).numel() == 0
    # a few outliers do not compress the rest: the bulk keeps its spread
    x = torch.cat([torch.linspace(0, 1, 98, dtype=torch.float64), torch.tensor([1e6, 2e6], dtype=torch.float64)])
    assert robust_minmax(x)[:90].max() > 0.8


# ---------------------------------------------------------------------------------------------------------------------
# The selector


def random_stats(n: int, seed: int, dtype=torch.float64, n_seq: int = 4):
    g = torch.Generator().manual_seed(seed)
    h, d, c = torch.rand(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype) ** 3, torch.rand(
        n, generator=g, dtype=dtype)
    seq = torch.randint(0, n_seq, (n,), generator=g)
    return compute_stats(h, d, seq, ImportanceConfig().axis_spec(), c)


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_teachability_keeps_the_top_budget_tokens_by_the_normalised_product(budget, dtype):
    stats = random_stats(300, seed=5, dtype=dtype)
    score = ref_teachability(stats.divergence.double().numpy(), stats.support_mass.double().numpy()).tolist()
    k = budget_count(300, budget)
    kept = select(stats, SelectorConfig(name="teachability").spec(), budget, torch.Generator().manual_seed(0))
    assert kept.tolist() == sorted(ref_top(score, k))
    per_seq = select(stats, SelectorConfig(name="teachability", scope="per_sequence").spec(), budget)
    seq = stats.seq_id.tolist()
    want = []
    for s in set(seq):
        members = [i for i in range(300) if seq[i] == s]
        want += sorted(members, key=lambda i: (-score[i], i))[: budget_count(len(members), budget)]
    assert per_seq.tolist() == sorted(want)


def test_teachability_sample_mode_draws_k_tokens_and_never_a_zero_score_first():
    stats = random_stats(200, seed=6)
    score = torch.tensor(ref_teachability(stats.divergence.numpy(), stats.support_mass.numpy()))
    spec = SelectorConfig(name="teachability", mode="sample").spec()
    for seed in range(5):
        kept = select(stats, spec, 0.1, torch.Generator().manual_seed(seed))
        assert kept.numel() == 20 and (score[kept] > 0).all()
    assert not torch.equal(select(stats, spec, 0.1, torch.Generator().manual_seed(0)),
                           select(stats, spec, 0.1, torch.Generator().manual_seed(1)))


def test_teachability_without_support_mass_keeps_all_at_full_budget_and_fails_below():
    stats = random_stats(20, seed=7)
    stats.support_mass = None
    spec = SelectorConfig(name="teachability").spec()
    assert select(stats, spec, 1.0).tolist() == list(range(20))
    with pytest.raises(ValueError, match="support mass"):
        select(stats, spec, 0.5)
    bad = random_stats(20, seed=7)
    bad.support_mass[3] = float("nan")
    with pytest.raises(ValueError, match="1 of 20 tokens have a non-finite"):
        select(bad, spec, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# In the trainer


def teach_cfg(budget: float, micro: int, backend: str = "eager", support_k: int = 16) -> TipConfig:
    return TipConfig(
        selector=SelectorConfig(name="teachability"), budget=budget,
        importance=ImportanceConfig(chunk_size=7, support_k=support_k),
        loss=LossConfig(chunk_size=5, backend=backend, temperature=1.0),
        train=TrainConfig(micro_batch_size=micro, signal_metrics=False),
    )


def ref_kept(d: torch.Tensor, c: list[float], budget: float) -> list[int]:
    score = ref_teachability(d.numpy(), np.asarray(c)).tolist()
    return sorted(ref_top(score, budget_count(len(c), budget)))


@pytest.mark.parametrize("budget,micro,backend,support_k", [
    (0.3, 2, "eager", 16),  # a scoring pass over micro-batches
    (0.05, 0, "eager", 4),  # one pass: the loss's forward provides the scores
    (0.3, 0, "compiled", 16),  # the fused scoring kernel over both models' logits
])
def test_distill_step_keeps_the_budget_by_teachability(tiny, budget, micro, backend, support_k):  # noqa: F811
    student, teacher = tiny
    batch = make_batch(seed=4)
    z_s, z_t = full_logits(student, teacher, batch, 1.0)
    logp_s, logp_t = z_s.log_softmax(-1), z_t.log_softmax(-1)
    want_c = ref_support(logp_s, logp_t, support_k)
    pair = Pair(student, teacher, tokenizer=None, vocab=80, device=torch.device("cpu"))
    spec = recipe.specs(teach_cfg(budget, micro, backend, support_k), pair.device).step
    metrics, stats, kept = distill_step(pair, batch, spec, torch.Generator().manual_seed(0), {})
    student.zero_grad(set_to_none=True)
    np.testing.assert_allclose(stats.support_mass.double().numpy(), want_c, rtol=1e-4, atol=1e-6)
    k = budget_count(len(stats), budget)
    assert kept.numel() == metrics["tokens/kept"] == k
    assert kept.tolist() == ref_kept(stats.divergence.double(), want_c, budget)
    assert metrics["support/mean"] == pytest.approx(float(np.mean(want_c)), rel=1e-4)
    assert metrics["support/kept_mean"] == pytest.approx(float(np.mean([want_c[i] for i in kept.tolist()])), rel=1e-4)


def test_distill_step_with_a_topk_teacher_ranks_by_the_lower_bound(tiny):  # noqa: F811
    student, teacher = tiny
    batch, k_teacher = make_batch(seed=2), 5
    z_s, z_t = full_logits(student, teacher, batch, 1.0)
    scorer = TopKScorer(z_t, k_teacher)
    want_c = ref_topk_support(z_s.log_softmax(-1), scorer.ids, scorer.logp, 16)
    pair = Pair(student, teacher, tokenizer=None, vocab=80, device=torch.device("cpu"))
    metrics, stats, kept = distill_step(pair, batch, recipe.specs(teach_cfg(0.3, 2), pair.device).step,
                                        torch.Generator().manual_seed(0), {}, scorer)
    student.zero_grad(set_to_none=True)
    np.testing.assert_allclose(stats.support_mass.double().numpy(), want_c, rtol=1e-4, atol=1e-6)
    assert kept.tolist() == ref_kept(stats.divergence.double(), want_c, 0.3)


def test_other_selectors_and_the_full_token_step_compute_no_support_mass(tiny):  # noqa: F811
    student, teacher = tiny
    batch = make_batch(seed=4)
    pair = Pair(student, teacher, tokenizer=None, vocab=80, device=torch.device("cpu"))
    for name, budget in (("soft_or", 0.3), ("teachability", 1.0)):
        cfg = teach_cfg(budget, 2)
        cfg.selector = SelectorConfig(name=name)
        metrics, stats, kept = distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
        student.zero_grad(set_to_none=True)
        assert stats.support_mass is None and "support/mean" not in metrics
        assert kept.numel() == budget_count(len(stats), budget)


def test_train_writes_support_mass_to_the_token_sample(tmp_path, micro_overrides):
    cfg = compose_config([*micro_overrides, "selector=teachability", "budget=0.3", "train.steps=1",
                          "train.eval_before=false", "importance.support_k=4"])
    recipe.train(cfg, tmp_path)
    (row,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    sample = np.load(tmp_path / "token_samples" / "step_000001.npz")
    c = sample["support_mass"].astype(np.float64)
    assert len(c) == row["tokens/total"] and ((c >= 0) & (c <= 1 + 1e-6)).all()
    assert row["tokens/kept"] == sample["kept"].sum() == budget_count(int(row["tokens/total"]), 0.3)
    assert row["support/mean"] == pytest.approx(c.mean(), rel=1e-5)
    score = ref_teachability(sample["divergence"], c)
    assert score[sample["kept"]].min() >= score[~sample["kept"]].max() - 1e-6  # the kept ones rank first


def test_token_sample_stores_support_mass_only_when_computed(tmp_path):
    stats = random_stats(30, seed=8)
    tracking.save_token_sample(tmp_path, 1, stats, torch.tensor([0, 4]), limit=12)
    sample = np.load(tmp_path / "token_samples" / "step_000001.npz")
    rows = [int(np.flatnonzero(np.isclose(stats.entropy.numpy(), e))[0]) for e in sample["entropy"]]
    np.testing.assert_allclose(sample["support_mass"], stats.support_mass.numpy()[rows], rtol=1e-6)
    stats.support_mass = None
    tracking.save_token_sample(tmp_path, 2, stats, torch.tensor([0, 4]), limit=12)
    assert "support_mass" not in np.load(tmp_path / "token_samples" / "step_000002.npz")


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_support_k_must_be_positive():
    assert ImportanceConfig().support_k == 16
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="importance.support_k"):
            ImportanceConfig(support_k=bad)
    with pytest.raises(ConfigError, match="importance.support_k"):
        compose_config(["importance.support_k=0"])
    assert compose_config(["selector=teachability", "importance.support_k=8"]).importance.support_k == 8


def test_teachability_is_a_listed_selector_option():
    from tip_cli.cli import groups_help

    assert compose_config(["selector=teachability"]).selector.name == "teachability"
    line = next(x for x in groups_help().splitlines() if x.strip().startswith("selector:"))
    assert "teachability" in line.split(":", 1)[1].split(", ")


# ---------------------------------------------------------------------------------------------------------------------
# Replayed on token samples (tip analyze)


def test_counterfactual_replays_teachability_where_the_sample_holds_support_mass():
    from tip_cli.analysis.signal import COUNTERFACTUAL, counterfactual_share

    rng = np.random.default_rng(9)
    n = 80
    sample = {"entropy": rng.uniform(0, 2, n).astype(np.float32), "divergence": rng.uniform(0, 1, n).astype(np.float32),
              "grad_norm": rng.uniform(0.01, 2.0, n).astype(np.float32)}
    assert "teachability" not in counterfactual_share(sample, (0.2,), specs=COUNTERFACTUAL)
    sample["support_mass"] = rng.uniform(0, 1, n).astype(np.float32)
    budgets = (0.05, 0.2, 0.5, 1.0)
    share, kept = counterfactual_share(sample, budgets, specs=COUNTERFACTUAL)["teachability"]
    score = ref_teachability(sample["divergence"], sample["support_mass"]).tolist()
    g2 = sample["grad_norm"].astype(np.float64) ** 2
    for j, budget in enumerate(budgets):
        idx = ref_top(score, budget_count(n, budget))
        assert share[j] == pytest.approx(g2[idx].sum() / g2.sum(), rel=1e-9)
        assert kept[j] == pytest.approx(len(idx) / n)
    assert compose_config(["selector=teachability"]).selector.spec() == COUNTERFACTUAL["teachability"]


# ---------------------------------------------------------------------------------------------------------------------
# Under torchrun: C is gathered like H and D


SEQ_LENS = [5, 9, 3, 12, 7, 8]  # rank 0 holds sequences 0-2 (17 tokens), rank 1 sequences 3-5 (27)


def synthetic_scores() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    n = sum(SEQ_LENS)
    seq = torch.repeat_interleave(torch.arange(len(SEQ_LENS)), torch.tensor(SEQ_LENS))
    return torch.rand(n, generator=g), torch.rand(n, generator=g) * 2, torch.rand(n, generator=g), seq


def _select_on_ranks() -> dict:
    from tip_cli.train import parallel

    parallel.setup("cpu")
    ent, div, c, seq = synthetic_scores()
    r = parallel.rank()
    lo = sum(SEQ_LENS[: 3 * r])
    mine = slice(lo, lo + sum(SEQ_LENS[3 * r : 3 * r + 3]))
    cfg = TipConfig(selector=SelectorConfig(name="teachability"), budget=0.2)
    spec = recipe.specs(cfg, torch.device("cpu")).step.selection
    sel = parallel.select_tokens(ent[mine], div[mine], seq[mine] - 3 * r, 3, spec, torch.Generator().manual_seed(7),
                                 support=c[mine])
    parallel.teardown()
    return {"kept": sel.kept, "mine": sel.local + lo, "support": sel.stats.support_mass, "metrics": sel.metrics}


def test_two_ranks_gather_support_mass_and_keep_what_one_process_keeps(tmp_path):
    from test_distributed import spawn

    ranks = spawn(_select_on_ranks, tmp_path)
    ent, div, c, seq = synthetic_scores()
    stats = compute_stats(ent, div, seq, ImportanceConfig().axis_spec(), c)
    kept = select(stats, SelectorConfig(name="teachability").spec(), 0.2)
    assert kept.tolist() == sorted(ref_top(ref_teachability(div.numpy(), c.numpy()).tolist(), budget_count(44, 0.2)))
    for got in ranks:
        assert torch.equal(got["support"], c) and torch.equal(got["kept"], kept)
        assert got["metrics"]["support/kept_mean"] == pytest.approx(c[kept].mean().item())
    assert torch.equal(torch.cat([g["mine"] for g in ranks]), kept)
