"""SPEC 7a's learning-signal metrics against independent references: each token's loss and the norm of its
gradient w.r.t. the student's raw logits by float64 autograd over the full vocabulary (dense and top-K teacher,
every loss kind, T != 1), the shares, overlaps and top-K mass by plain Python, and a distill_step on tiny models
in both the scoring and the full-token path."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_step_reference import llama, make_batch, per_token_div, qwen2, scaled

from tip_cli import tracking
from tip_cli.config.schema import (
    ImportanceConfig,
    LossConfig,
    SelectorConfig,
    TeacherConfig,
    TipConfig,
    TrainConfig,
)
from tip_cli.models import Pair
from tip_cli.selection.quadrants import compute_stats
from tip_cli.selection.selectors import top_count
from tip_cli.selection.signal import Signal, dense_signal, jaccard, signal_metrics, topk_mass, topk_signal
from tip_cli.train import loop, recipe
from tip_cli.train.step import distill_step

KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]
SIGNAL_METRICS = [
    "grad/kept_share", *[f"grad/q{i}_share" for i in range(1, 5)], *[f"grad/kept_q{i}_share" for i in range(1, 5)],
    *[f"loss/q{i}_share" for i in range(1, 5)], "select/overlap_entropy", "select/overlap_divergence",
]


def ref_div(logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """SPEC 1's divergence with TRL's ends (jsd beta 0 = forward KL, 1 = reverse KL)."""
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    return per_token_div(logp_s, logp_t, kind, beta)


def ref_grad_sq(z_s: torch.Tensor, loss_of_logp_s) -> tuple[torch.Tensor, torch.Tensor]:
    """(l [C], ||dl/dz||^2 [C]) by float64 autograd w.r.t. the raw logits z_s [C, V]; rows are independent."""
    z = z_s.double().clone().requires_grad_()
    loss = loss_of_logp_s(z)
    (g,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), (g * g).sum(-1)


def logits(c: int, v: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, v, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temp", [0.7, 1.6])
def test_dense_gradient_norm_is_the_exact_gradient_of_the_loss(kind, beta, temp):
    z_s, z_t = logits(9, 50, 0, 4.0), logits(9, 50, 1, 4.0)
    logp_t = torch.log_softmax(z_t / temp, -1)
    want_loss, want = ref_grad_sq(z_s, lambda z: ref_div(torch.log_softmax(z / temp, -1), logp_t, kind, beta))
    loss, grad_sq = dense_signal(torch.log_softmax(z_s / temp, -1).float(), logp_t.float(), kind, beta)
    assert want.min() > 1e-8  # every row has a gradient to match
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_sq.double() / temp**2, want, rtol=1e-4, atol=1e-9)


def ref_topk_loss(logp_s: torch.Tensor, ids: torch.Tensor, logp_t_top: torch.Tensor, kind: str, beta: float):
    """The K + 1 bucket divergence written out: top-K probabilities and 1 - their sum (teacher's floored at 1e-6)."""
    top_s = logp_s.gather(-1, ids).exp()
    q_s = torch.cat([top_s, (1 - top_s.sum(-1, keepdim=True))], -1)
    top_t = logp_t_top.double().exp()
    q_t = torch.cat([top_t, (1 - top_t.sum(-1, keepdim=True)).clamp_min(1e-6)], -1)
    return ref_div(q_s.log(), q_t.log(), kind, beta)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_topk_gradient_norm_is_the_exact_gradient_of_the_bucket_loss(kind, beta):
    temp, k = 1.3, 6
    z_s, z_t = logits(7, 40, 2, 2.0), logits(7, 40, 3, 2.0)
    logp_t = torch.log_softmax(z_t, -1)
    top = logp_t.topk(k, -1)
    want_loss, want = ref_grad_sq(
        z_s, lambda z: ref_topk_loss(torch.log_softmax(z / temp, -1), top.indices, top.values, kind, beta))
    loss, grad_sq = topk_signal(torch.log_softmax(z_s / temp, -1).float(), top.indices, top.values.float(), kind, beta)
    assert want.min() > 1e-8
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_sq.double() / temp**2, want, rtol=1e-4, atol=1e-9)


def test_topk_mass_is_the_sum_of_the_k_largest_probabilities():
    logp = torch.log_softmax(logits(5, 30, 4, 2.0), -1)
    for k in (1, 4, 30):
        want = [sum(sorted(row.exp().tolist(), reverse=True)[:k]) for row in logp]
        assert topk_mass(logp, k).tolist() == pytest.approx(want, rel=1e-5)
    assert topk_mass(logp[:, :4]).tolist() == pytest.approx(logp[:, :4].exp().sum(-1).tolist(), rel=1e-5)


def test_jaccard_and_top_count_on_hand_made_sets():
    assert jaccard(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), 5) == pytest.approx(2 / 4)
    assert jaccard(torch.tensor([4]), torch.tensor([4]), 5) == 1.0
    assert jaccard(torch.tensor([0]), torch.tensor([3]), 5) == 0.0
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 5) == 0.0
    score = torch.tensor([0.5, 2.0, 0.5, 3.0, 0.1])
    assert top_count(score, 3).tolist() == [0, 1, 3]  # the tie at 0.5 goes to the lower index
    assert top_count(score, 0).tolist() == []


def test_overlaps_compare_the_kept_set_with_each_axis_top_k():
    ent = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    div = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    stats = compute_stats(ent, div, torch.zeros(6, dtype=torch.long), ImportanceConfig().axis_spec())
    sig = Signal(torch.ones(6), torch.ones(6))
    m = signal_metrics(stats, torch.tensor([0, 1]), sig)  # the entropy top-2 exactly; disjoint from D's {4, 5}
    assert m["select/overlap_entropy"] == 1.0 and m["select/overlap_divergence"] == 0.0
    m = signal_metrics(stats, torch.tensor([1, 4]), sig)  # {1, 4} vs {0, 1}: 1/3; vs {4, 5}: 1/3
    assert m["select/overlap_entropy"] == pytest.approx(1 / 3) and m["select/overlap_divergence"] == pytest.approx(1 / 3)


def test_shares_match_a_plain_computation():
    g = torch.Generator().manual_seed(5)
    n = 40
    ent, div = torch.rand(n, generator=g), torch.rand(n, generator=g)
    stats = compute_stats(ent, div, torch.zeros(n, dtype=torch.long), ImportanceConfig().axis_spec())
    grad_sq, loss = torch.rand(n, generator=g) ** 3, torch.rand(n, generator=g)
    kept = torch.randperm(n, generator=g)[:13].sort().values
    m = signal_metrics(stats, kept, Signal(loss, grad_sq))
    quad, gs, ls, ks = stats.quadrant.tolist(), grad_sq.tolist(), loss.tolist(), set(kept.tolist())
    total, kept_g, kept_l = sum(gs), sum(gs[i] for i in ks), sum(ls[i] for i in ks)
    assert m["grad/kept_share"] == pytest.approx(kept_g / total)
    for q in range(1, 5):
        assert m[f"grad/q{q}_share"] == pytest.approx(sum(gs[i] for i in range(n) if quad[i] == q) / total)
        assert m[f"grad/kept_q{q}_share"] == pytest.approx(sum(gs[i] for i in ks if quad[i] == q) / kept_g)
        assert m[f"loss/q{q}_share"] == pytest.approx(sum(ls[i] for i in ks if quad[i] == q) / kept_l)
    for name in ("grad/q", "grad/kept_q", "loss/q"):
        assert sum(m[f"{name}{q}_share"] for q in range(1, 5)) == pytest.approx(1.0)
    assert min(m[f"grad/q{q}_share"] for q in range(1, 5)) > 0  # every quadrant is populated: the test can fail
    assert "teacher/topk_mass" not in m


# ---------------------------------------------------------------------------------------------------------------------
# distill_step on tiny models, against a float64 reference through the real HF forward


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher): a tied Qwen2 student (V=80) and a Llama teacher (V=96), sharpened."""
    return scaled(qwen2(80, 1), 8.0).train(), scaled(llama(96, 2), 30.0).eval()


def full_logits(student, teacher, batch, temp: float):
    """Both models' float64 response logits over the shared vocabulary [N, 80], divided by T."""
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    mask = batch.target_mask
    with torch.no_grad():
        z_s = s64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask][:, :80]
        z_t = t64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask][:, :80]
    return z_s, z_t / temp


class TopKScorer:
    """A top-K teacher as a vLLM engine returns it (at T = 1): the true top-K of the float64 teacher."""

    def __init__(self, z_t: torch.Tensor, k: int):
        top = torch.log_softmax(z_t, -1).topk(k, -1)
        self.ids, self.logp = top.indices, top.values.float()

    def topk_logprobs(self, seqs, positions):
        return self.ids, self.logp


def step_cfg(kind: str, budget: float, temp: float, backend: str = "eager", **train) -> TipConfig:
    return TipConfig(
        selector=SelectorConfig(name="soft_or", mode="topk"), budget=budget,
        importance=ImportanceConfig(chunk_size=7),
        loss=LossConfig(kind=kind, jsd_beta=0.3, chunk_size=5, backend=backend, temperature=temp),
        train=TrainConfig(micro_batch_size=2, **train),
    )


STEP_CASES = [  # (loss kind, budget: < 1 scores first, 1.0 takes the stats from the loss pass, T, backend)
    ("reverse_kl", 0.5, 1.5, "eager"),
    ("reverse_kl", 1.0, 1.5, "eager"),
    ("forward_kl", 0.5, 0.8, "eager"),
    ("forward_kl", 1.0, 0.8, "eager"),
    ("jsd", 0.5, 1.2, "eager"),
    ("jsd", 1.0, 1.2, "eager"),
    ("reverse_kl", 0.5, 1.5, "compiled"),
    ("reverse_kl", 1.0, 1.5, "compiled"),
]


@pytest.mark.parametrize("kind,budget,temp,backend", STEP_CASES, ids=["-".join(map(str, c)) for c in STEP_CASES])
def test_distill_step_logs_the_signal_of_every_token(tiny, kind, budget, temp, backend):
    student, teacher = tiny
    batch = make_batch(seed=4)
    cfg = step_cfg(kind, budget, temp, backend)
    z_s, z_t = full_logits(student, teacher, batch, temp)
    logp_t = torch.log_softmax(z_t, -1)
    want_loss, want = ref_grad_sq(z_s, lambda z: ref_div(torch.log_softmax(z / temp, -1), logp_t, kind, 0.3))
    pair = Pair(student, teacher, tokenizer=None, vocab=80, device=torch.device("cpu"))
    metrics, stats, kept = distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    student.zero_grad(set_to_none=True)
    torch.testing.assert_close(stats.grad_sq.double(), want, rtol=2e-3, atol=1e-9)
    assert set(SIGNAL_METRICS) <= set(metrics), set(SIGNAL_METRICS) - set(metrics)
    assert "teacher/topk_mass" not in metrics  # a dense teacher over the full vocabulary
    mask = torch.zeros(len(stats), dtype=torch.bool)
    mask[kept] = True
    assert metrics["grad/kept_share"] == pytest.approx((want[mask].sum() / want.sum()).item(), rel=2e-3)
    q = stats.quadrant
    for i in range(1, 5):
        assert metrics[f"grad/q{i}_share"] == pytest.approx((want[q == i].sum() / want.sum()).item(), rel=2e-3, abs=1e-6)
        assert metrics[f"loss/q{i}_share"] == pytest.approx(
            (want_loss[mask & (q == i)].sum() / want_loss[mask].sum()).item(), rel=2e-3, abs=1e-6)
    assert (metrics["grad/kept_share"] == pytest.approx(1.0)) == (budget == 1.0)


@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_a_topk_teacher_logs_its_mass_and_the_bucket_gradient(tiny, budget):
    student, teacher = tiny
    batch, k = make_batch(seed=2), 5
    cfg = step_cfg("reverse_kl", budget, 1.0)
    z_s, z_t = full_logits(student, teacher, batch, 1.0)
    scorer = TopKScorer(z_t, k)
    _, want = ref_grad_sq(
        z_s, lambda z: ref_topk_loss(torch.log_softmax(z, -1), scorer.ids, scorer.logp, "reverse_kl", 0.5))
    pair = Pair(student, teacher, tokenizer=None, vocab=80, device=torch.device("cpu"))
    metrics, stats, kept = distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {}, scorer)
    student.zero_grad(set_to_none=True)
    torch.testing.assert_close(stats.grad_sq.double(), want, rtol=2e-3, atol=1e-9)
    mass = [sum(sorted(row.tolist(), reverse=True)[:k]) for row in torch.softmax(z_t, -1)]
    assert metrics["teacher/topk_mass"] == pytest.approx(float(np.mean(mass)), rel=1e-4)
    assert metrics["teacher/topk_mass_p10"] == pytest.approx(float(np.quantile(mass, 0.1)), rel=1e-4)
    assert metrics["teacher/topk_mass_p10"] < metrics["teacher/topk_mass"] < 1.0


@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_importance_topk_logs_the_dense_teachers_topk_mass(tiny, budget):
    student, teacher = tiny
    batch, k = make_batch(seed=2), 3
    cfg = step_cfg("reverse_kl", budget, 1.0)
    cfg.importance.topk = k
    _, z_t = full_logits(student, teacher, batch, 1.0)
    pair = Pair(student, teacher, tokenizer=None, vocab=80, device=torch.device("cpu"))
    metrics, _, _ = distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    student.zero_grad(set_to_none=True)
    mass = [sum(sorted(row.tolist(), reverse=True)[:k]) for row in torch.softmax(z_t, -1)]
    assert metrics["teacher/topk_mass"] == pytest.approx(float(np.mean(mass)), rel=1e-4)
    assert metrics["teacher/topk_mass_p10"] == pytest.approx(float(np.quantile(mass, 0.1)), rel=1e-4)


@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_signal_metrics_off_logs_none_and_keeps_the_step(tiny, budget):
    student, teacher = tiny
    batch = make_batch(seed=4)
    pair = Pair(student, teacher, tokenizer=None, vocab=80, device=torch.device("cpu"))
    out = []
    for on in (True, False):
        student.zero_grad(set_to_none=True)
        metrics, stats, kept = distill_step(pair, batch, recipe.specs(step_cfg("reverse_kl", budget, 1.0, signal_metrics=on),
                                                                   pair.device).step, torch.Generator().manual_seed(0), {})
        out.append((metrics, stats, kept, [p.grad.clone() for p in student.parameters()]))
    student.zero_grad(set_to_none=True)
    (m_on, s_on, k_on, g_on), (m_off, s_off, k_off, g_off) = out
    assert not any(k.startswith(("grad/", "loss/", "select/overlap", "teacher/")) for k in m_off)
    assert s_off.grad_sq is None and s_on.grad_sq is not None
    assert torch.equal(k_on, k_off) and m_on["loss"] == m_off["loss"]
    assert torch.equal(s_on.entropy, s_off.entropy) and torch.equal(s_on.divergence, s_off.divergence)
    for a, b in zip(g_on, g_off, strict=True):
        assert torch.equal(a, b)


def test_token_sample_stores_each_tokens_gradient_norm(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 30
    stats = compute_stats(torch.rand(n, generator=g), torch.rand(n, generator=g), torch.zeros(n, dtype=torch.long),
                          ImportanceConfig().axis_spec())
    stats.grad_sq = torch.rand(n, generator=g)
    tracking.save_token_sample(tmp_path, 3, stats, torch.tensor([1, 5]), limit=12)
    sample = np.load(tmp_path / "token_samples" / "step_000003.npz")
    rows = [int(np.flatnonzero(np.isclose(stats.entropy.numpy(), e))[0]) for e in sample["entropy"]]
    assert len(rows) == 12
    np.testing.assert_allclose(sample["grad_norm"], np.sqrt(stats.grad_sq.numpy()[rows]), rtol=1e-6)


def test_low_topk_mass_warns_once_naming_the_key(capsys):
    cfg = TipConfig(teacher=TeacherConfig(backend="vllm_topk", topk=20), importance=ImportanceConfig())
    run = SimpleNamespace(loop=recipe.specs(cfg, torch.device("cpu")).loop, topk_mass_warned=False)
    loop.warn_topk_mass(run, 1, {"teacher/topk_mass": 0.95})
    loop.warn_topk_mass(run, 2, {"teacher/topk_mass": 0.5})
    loop.warn_topk_mass(run, 3, {"teacher/topk_mass": 0.4})
    out = capsys.readouterr().out
    assert out.count("teacher/topk_mass") == 1 and "teacher.topk" in out and "step 2" in out
    cfg = TipConfig(importance=ImportanceConfig(topk=8))
    run = SimpleNamespace(loop=recipe.specs(cfg, torch.device("cpu")).loop, topk_mass_warned=False)
    loop.warn_topk_mass(run, 1, {"teacher/topk_mass": 0.5})
    assert "importance.topk (now 8)" in capsys.readouterr().out.replace("\n", " ")
    assert math.isfinite(cfg.importance.topk_mass_warn)


def test_bench_times_both_modes_and_logs_the_metrics_only_when_on(load_script, capsys):
    load_script("bench_memory")  # imported by name, as from scripts/ when run as a script
    bench = load_script("bench_signal_metrics")
    report = bench.main(["--shape", "small-student:small-teacher", "--vocab", "64", "--seq", "8", "--prompt", "2",
                         "--steps", "1", "--device", "cpu", "--settings", "selector=soft_or,budget=0.5;selector=all"])
    assert len(report) == 2
    for row in report.values():
        assert row["off_s"] > 0 and row["on_s"] > 0 and row["ratio"] == pytest.approx(row["on_s"] / row["off_s"])
        assert set(SIGNAL_METRICS) <= set(row["metrics"])
    assert capsys.readouterr().out.count("| selector=") == 2


def test_an_empty_batch_logs_zeros():
    empty = torch.zeros(0)
    stats = compute_stats(empty, empty, torch.zeros(0, dtype=torch.long), ImportanceConfig().axis_spec())
    m = signal_metrics(stats, torch.zeros(0, dtype=torch.long), Signal(empty, empty, empty))
    assert set(SIGNAL_METRICS) | {"teacher/topk_mass", "teacher/topk_mass_p10"} == set(m)
    assert all(v == 0.0 for v in m.values())
