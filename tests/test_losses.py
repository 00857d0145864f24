"""The selected-token loss against the plain float64 formula, forward and gradient, and its memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tip_cli.config.schema import ImportanceConfig
from tip_cli.losses import LossSpec, selected_token_loss
from tip_cli.teacher.targets import DenseTeacher, TopKTeacher


def reference_loss(h_s, w_s, h_t, w_t, vocab, kind, beta):
    """Brute force in float64: full [K, V] distributions, the textbook formulas, autograd through everything."""
    p = torch.softmax((h_s @ w_s[:vocab].T).double(), -1)
    q = torch.softmax((h_t @ w_t[:vocab].T).double(), -1)
    if kind == "reverse_kl":
        return (p * (p.log() - q.log())).sum()
    if kind == "forward_kl":
        return (q * (q.log() - p.log())).sum()
    m = beta * q + (1 - beta) * p
    return beta * (q * (q.log() - m.log())).sum() + (1 - beta) * (p * (p.log() - m.log())).sum()


def make_inputs(k=23, d_s=12, d_t=20, vocab=40, pad_s=5, pad_t=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(k, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(vocab + pad_s, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(k, d_t, generator=g, dtype=torch.float64)
    w_t = torch.randn(vocab + pad_t, d_t, generator=g, dtype=torch.float64)
    return h_s, w_s, h_t, w_t


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_value_and_gradient_match_plain_formula(kind, beta, chunk):
    h_s, w_s, h_t, w_t = make_inputs()
    got = selected_token_loss(h_s, w_s, DenseTeacher(h_t, w_t, 40), LossSpec(40, kind, beta, chunk, 7.0))
    want = reference_loss(h_s, w_s, h_t, w_t, 40, kind, beta) / 7.0
    g_got = torch.autograd.grad(got, [h_s, w_s])
    g_want = torch.autograd.grad(want, [h_s, w_s])
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the padding rows beyond the shared vocabulary get no gradient
    assert g_got[1][40:].abs().max() == 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_at_its_ends_is_forward_and_reverse_kl(beta):
    """TRL's generalized JSD: beta 0 is KL(T || S), beta 1 is KL(S || T), between them the mixture formula."""
    h_s, w_s, h_t, w_t = make_inputs()
    got = selected_token_loss(h_s, w_s, DenseTeacher(h_t, w_t, 40), LossSpec(40, "jsd", beta, 7, 3.0))
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    want = reference_loss(h_s, w_s, h_t, w_t, 40, kind, beta) / 3.0
    assert want.item() > 1e-3  # not a degenerate zero
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(got, [h_s, w_s]), torch.autograd.grad(want, [h_s, w_s]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_inputs_stay_close_to_float64_reference():
    h_s, w_s, h_t, w_t = make_inputs(k=50, vocab=300)
    f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (h_s, w_s, h_t, w_t)]
    got = selected_token_loss(f32[0], f32[1], DenseTeacher(f32[2], f32[3], 300), LossSpec(300, chunk=16))
    want = reference_loss(h_s, w_s, h_t, w_t, 300, "reverse_kl", 0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    torch.testing.assert_close(torch.autograd.grad(got, f32[0])[0].double(), torch.autograd.grad(want, h_s)[0], rtol=1e-3, atol=1e-5)


def test_frozen_head_and_empty_selection():
    h_s, w_s, h_t, w_t = make_inputs()
    frozen = w_s.detach()
    loss = selected_token_loss(h_s, frozen, DenseTeacher(h_t, w_t, 40), LossSpec(40))
    (grad,) = torch.autograd.grad(loss, [h_s])
    assert grad.abs().sum() > 0
    empty = selected_token_loss(h_s[:0], w_s, DenseTeacher(h_t[:0], w_t, 40), LossSpec(40))
    empty.backward()
    assert empty.item() == 0.0 and w_s.grad.abs().sum() == 0


def topk_reference(h_s, w_s, h_t, w_t, vocab, k, kind):
    """Plain float64 bucket formula: the teacher's top-k tokens of the full distribution, plus a 'rest' bucket whose
    teacher mass is floored at 1e-6 (as documented in `topk_buckets`)."""
    p = torch.softmax((h_s @ w_s[:vocab].T).double(), -1)
    q = torch.softmax((h_t @ w_t[:vocab].T).double(), -1)
    total = 0.0
    for row in range(p.shape[0]):
        top = q[row].topk(k).indices
        rest = torch.ones(vocab, dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[row, top], p[row, rest].sum()[None]])
        qb = torch.cat([q[row, top], (1 - q[row, top].sum()).clamp_min(1e-6)[None]])
        a, b = (pb, qb) if kind == "reverse_kl" else (qb, pb)
        total = total + (a * (a.log() - b.log())).sum()
    return total


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_topk_teacher_loss_matches_bucket_formula(kind, k):
    h_s, w_s, h_t, w_t = make_inputs()
    logq = torch.log_softmax(h_t @ w_t[:40].T, -1)
    teacher = TopKTeacher(*reversed(logq.topk(k, dim=-1)))  # (ids, log-probs), as a vLLM engine returns them
    got = selected_token_loss(h_s, w_s, teacher, LossSpec(40, kind, chunk=6, normalizer=3.0))
    want = topk_reference(h_s, w_s, h_t, w_t, 40, k, kind) / 3.0
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    for a, b in zip(torch.autograd.grad(got, [h_s, w_s]), torch.autograd.grad(want, [h_s, w_s]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_topk_divergence_never_exceeds_the_full_one_and_h_is_full_vocab():
    """Merging tokens into one bucket can only lose divergence (data processing); K = V - 1 loses nothing."""
    h_s, w_s, h_t, w_t = make_inputs()
    logp = torch.log_softmax((h_s @ w_s[:40].T).detach(), -1)
    logq = torch.log_softmax(0.2 * h_t @ w_t[:40].T, -1)  # flat enough that no tail falls under the 1e-6 floor
    full_h = -(logp.exp() * logp).sum(-1)
    from tip_cli.selection.scores import kl

    full = kl(logp, logq)
    for k in (1, 4, 39):
        h, d = TopKTeacher(*reversed(logq.topk(k, dim=-1))).stats(logp, slice(0, 23), ImportanceConfig())
        torch.testing.assert_close(h, full_h.float())
        assert (d.double() <= full + 1e-6).all()
        if k == 39:
            torch.testing.assert_close(d.double(), full, rtol=1e-5, atol=1e-6)


def test_zero_loss_when_student_equals_teacher():
    h_s, w_s, _, _ = make_inputs()
    loss = selected_token_loss(h_s, w_s, DenseTeacher(h_s.detach(), w_s.detach(), 40), LossSpec(40))
    assert abs(loss.item()) < 1e-12


MEMORY_SCRIPT = """
import json, sys, torch
from tip_cli.losses import LossSpec, selected_token_loss
from tip_cli.teacher.targets import DenseTeacher

def status_mb(key):  # VmRSS (now) or VmHWM (peak since the last reset), from the kernel
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

n, k, chunk, vocab, d = map(int, sys.argv[1:6])
torch.manual_seed(0)
hidden = torch.randn(n, d, requires_grad=True)           # [N, d]
w_s = torch.randn(vocab, d, requires_grad=True) * 0.1   # [V, d]
h_t, w_t = torch.randn(n, d), torch.randn(vocab, d) * 0.1
kept = torch.randperm(n)[:k]
open("/proc/self/clear_refs", "w").write("5")  # peak := now, so import-time peaks do not hide the loss's
base = status_mb("VmRSS")
loss = selected_token_loss(hidden[kept], w_s, DenseTeacher(h_t[kept], w_t, vocab), LossSpec(vocab, chunk=chunk, normalizer=k))
loss.backward()
print(json.dumps({"delta_mb": status_mb("VmHWM") - base}))
"""


def loss_step_memory_mb(n, k, chunk, vocab=16000, d=64) -> float:
    # a fixed mmap threshold makes glibc return every large buffer to the OS on free, so peak RSS tracks the
    # tensors that were live together rather than heap fragmentation
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *map(str, (n, k, chunk, vocab, d))],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_mb"]


def test_loss_memory_shrinks_with_budget_and_is_bounded_by_the_chunk():
    n = 1024
    # unchunked (chunk >= N), the [K, V] work is proportional to the number of selected tokens
    full = loss_step_memory_mb(n, n, chunk=n)
    quarter = loss_step_memory_mb(n, n // 4, chunk=n)
    # chunked, even full-token OPD never holds more than [chunk, V] at once
    chunked_full = loss_step_memory_mb(n, n, chunk=128)
    assert full > 2 * n * 16000 * 4 / 2**20  # sanity: more than two [N, V] float32 buffers were really live
    assert quarter < 0.4 * full, (quarter, full)
    assert chunked_full < 0.25 * full, (chunked_full, full)


@pytest.mark.parametrize("divergence,topk", [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("reverse_kl", 5)])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_stats_from_the_loss_pass_match_brute_force(kind, divergence, topk):
    """The (H, D) a sink collects during the loss equal the float64 textbook formulas, row for row."""
    from tip_cli.logits import StatsSink

    h_s, w_s, h_t, w_t = make_inputs()
    cfg = ImportanceConfig(divergence=divergence, topk=topk)
    sink = StatsSink(cfg, [])
    selected_token_loss(h_s, w_s, DenseTeacher(h_t, w_t, 40), LossSpec(40, kind, chunk=6), sink=sink)
    ent, div = sink.tensors()
    logp = torch.log_softmax((h_s @ w_s[:40].T).detach(), -1)
    logq = torch.log_softmax(h_t @ w_t[:40].T, -1)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-6)
    if topk is not None:
        top = logq.topk(topk, dim=-1).indices
        logp, logq = logp.gather(-1, top).log_softmax(-1), logq.gather(-1, top).log_softmax(-1)
    p, q = logp.exp(), logq.exp()
    want = {
        "reverse_kl": (p * (logp - logq)).sum(-1),
        "forward_kl": (q * (logq - logp)).sum(-1),
        "jsd": 0.5 * (q * (logq - ((p + q) / 2).log())).sum(-1) + 0.5 * (p * (logp - ((p + q) / 2).log())).sum(-1),
    }[divergence]
    torch.testing.assert_close(div.double(), want, rtol=1e-5, atol=1e-6)


def test_upstream_gradient_scales_the_loss_gradient():
    h_s, w_s, h_t, w_t = make_inputs()
    one = torch.autograd.grad(selected_token_loss(h_s, w_s, DenseTeacher(h_t, w_t, 40), LossSpec(40)), [h_s, w_s])
    three = torch.autograd.grad(3.0 * selected_token_loss(h_s, w_s, DenseTeacher(h_t, w_t, 40), LossSpec(40)), [h_s, w_s])
    for a, b in zip(one, three, strict=True):
        torch.testing.assert_close(3.0 * a, b)


def test_log_partitions_from_a_scoring_pass_give_the_same_loss_and_gradients():
    """The loss reuses the student's and the teacher's log sum exp of each row (computed while scoring) instead of
    recomputing them: value and gradients equal the float64 reference, with other chunking than the scoring's."""
    from tip_cli.logits import scored_logprobs
    from tip_cli.teacher.targets import DenseTeacher

    h_s, w_s, h_t, w_t = make_inputs()
    _, z_s = scored_logprobs(h_s.detach(), w_s.detach(), 40)
    _, z_t = scored_logprobs(h_t, w_t, 40)
    kept = torch.tensor([0, 3, 4, 9, 17, 22])
    teacher = DenseTeacher(h_t, w_t, 40, z_t).rows(kept)
    got = selected_token_loss(h_s[kept], w_s, teacher, LossSpec(40, chunk=4, normalizer=6.0), log_z=z_s[kept])
    want = reference_loss(h_s[kept], w_s, h_t[kept], w_t, 40, "reverse_kl", 0.5) / 6.0
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(got, [h_s, w_s]), torch.autograd.grad(want, [h_s, w_s]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    wrong = selected_token_loss(h_s[kept], w_s, teacher, LossSpec(40, normalizer=6.0), log_z=z_s[kept] + 0.1)
    assert wrong.item() != pytest.approx(want.item(), rel=1e-6)  # the partitions really are used


def _cast(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


# loss.backend=compiled: (input dtype, loss rel. tolerance, gradient relative-norm tolerance); the float64 reference
# takes the same (rounded) inputs, so what is left is the kernel's own arithmetic
COMPILED_DTYPES = [(torch.float64, 1e-10, 1e-9), (torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 3e-2)]


@pytest.mark.parametrize("dtype,rel,grad_rel", COMPILED_DTYPES, ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("k,chunk", [(23, 7), (23, 1000), (1, 4)])
def test_compiled_loss_matches_the_float64_formula(dtype, rel, grad_rel, k, chunk):
    """The torch.compile'd reverse-KL chunk: value and gradients (hidden states and head) against float64 autograd,
    for chunks that do not divide K, one chunk, and a single row; its (H, D) sink rows against the formulas."""
    from tip_cli.logits import StatsSink

    h_s, w_s, h_t, w_t = _cast(make_inputs(k=k, vocab=300), dtype)
    sink = StatsSink(ImportanceConfig().score_spec(), [])
    got = selected_token_loss(h_s, w_s, DenseTeacher(h_t, w_t, 300), LossSpec(300, chunk=chunk, normalizer=5.0,
                                                                              compiled=True), sink=sink)
    ref = _cast((h_s, w_s, h_t, w_t), torch.float64)
    want = reference_loss(*ref, 300, "reverse_kl", 0.5) / 5.0
    assert got.item() == pytest.approx(want.item(), rel=rel)
    for a, b in zip(torch.autograd.grad(got, [h_s, w_s]), torch.autograd.grad(want, ref[:2]), strict=True):
        assert a.dtype == dtype and (a.double() - b).norm() <= grad_rel * b.norm()
    logp = torch.log_softmax(ref[0].detach() @ ref[1].detach()[:300].T, -1)
    logq = torch.log_softmax(ref[2] @ ref[3][:300].T, -1)
    ent, div = sink.tensors()
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), rtol=rel * 10, atol=rel)
    torch.testing.assert_close(div.double(), (logp.exp() * (logp - logq)).sum(-1), rtol=rel * 10, atol=rel)


@pytest.mark.parametrize("dtype,rel,_", COMPILED_DTYPES, ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("n,chunk", [(23, 7), (1, 4)])
def test_compiled_scoring_matches_the_float64_formula(dtype, rel, _, n, chunk):
    """The scoring pass's fused kernel: H, reverse-KL D and both log-partitions against the float64 formulas; the
    eager pass agrees with it, and a D other than the default falls back to the eager pass."""
    from tip_cli.selection.scores import ScoreSpec
    from tip_cli.teacher.scoring import score

    h_s, w_s, h_t, w_t = _cast(make_inputs(k=n, vocab=300), dtype)
    teacher = DenseTeacher(h_t, w_t, 300)
    ent, div, sup, z_s, scored = score(h_s, w_s, teacher, 300, chunk, ScoreSpec(), fused=True)
    assert sup is None  # no support mass unless asked for
    z, zt = (h_s.double() @ w_s.double()[:300].T), (h_t.double() @ w_t.double()[:300].T)
    logp, logq = z.log_softmax(-1), zt.log_softmax(-1)
    acc, tol = torch.promote_types(dtype, torch.float32), max(rel * 10, 1e-6)  # H and D are fp32 scores
    for got, want, out in ((ent, -(logp.exp() * logp).sum(-1), torch.float32),
                           (div, (logp.exp() * (logp - logq)).sum(-1), torch.float32),
                           (z_s, z.logsumexp(-1), acc), (scored.log_z, zt.logsumexp(-1), acc)):
        assert got.dtype == out and got.shape == (n,)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    eager = score(h_s, w_s, teacher, 300, chunk, ScoreSpec(), fused=False)
    for a, b in zip((eager[0], eager[1], eager[3]), (ent, div, z_s), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    jsd = score(h_s, w_s, teacher, 300, chunk, ScoreSpec(divergence="jsd"), fused=True)[1]
    p, q = logp.exp(), logq.exp()
    m = ((p + q) / 2).log()
    want = 0.5 * (q * (logq - m)).sum(-1) + 0.5 * (p * (logp - m)).sum(-1)
    torch.testing.assert_close(jsd.double(), want, rtol=tol, atol=tol)


def test_a_kernel_that_fails_to_compile_stops_with_the_eager_setting(monkeypatch):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from tip_cli.logits import compiled

    def no_compiler(fn, **kwargs):
        def kernel(*args):
            raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")
        return kernel

    monkeypatch.setattr(torch, "compile", no_compiler)

    def softmax_rows(z):  # a new function: `compiled` caches one kernel per function
        return z.softmax(-1)

    with pytest.raises(RuntimeError, match="torch.compile of softmax_rows failed .*recompile_limit.*set loss.backend=eager"):
        compiled(softmax_rows)(torch.zeros(2, 3))


def test_compiled_kernels_stay_finite_at_minus_inf_logits():
    """Masked tokens (-inf logits, p = 0) in both models' rows: the fused scoring and loss kernels, compiled and
    as plain functions, give the eager scoring pass's H and D and the float64 formulas' H, D and dL/dz (0 where
    p_S = 0), not NaN rows. The teacher is -inf only where the student is too, so every KL is finite."""
    from tip_cli.logits import compiled
    from tip_cli.losses import reverse_kl_from_logits
    from tip_cli.selection.scores import entropy_and_reverse_kl, stats_from_logits

    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(5, 64, generator=g) * 3, torch.randn(5, 64, generator=g) * 3
    masked_s = torch.rand(5, 64, generator=g) < 0.3
    masked_s[:, 0] = True  # every row has a masked student token
    masked_t = masked_s & (torch.rand(5, 64, generator=g) < 0.5)
    masked_t[:, 0] = True  # and a token both models mask
    z_s, z_t = z_s.masked_fill(masked_s, float("-inf")), z_t.masked_fill(masked_t, float("-inf"))
    logp, logq = z_s.double().log_softmax(-1), z_t.double().log_softmax(-1)
    p = logp.exp()
    ent = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    kl_rows = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
    grad = torch.where(p > 0, 0.5 * p * (logp - logq - kl_rows[:, None]), 0.0)
    eager = entropy_and_reverse_kl(z_s.log_softmax(-1), z_t.log_softmax(-1))
    scale = torch.tensor(0.5)
    for run in (lambda f: f, compiled):
        h, d, log_z_s, log_z_t = run(stats_from_logits)(z_s, z_t)
        kl_got, h_got, grad_got = run(reverse_kl_from_logits)(z_s, z_t, scale)
        for got, want in ((h, ent), (d, kl_rows), (h_got, ent), (kl_got, kl_rows), (grad_got, grad),
                          (h, eager[0]), (d, eager[1])):
            assert got.isfinite().all()
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(log_z_s.double(), z_s.double().logsumexp(-1))
        torch.testing.assert_close(log_z_t.double(), z_t.double().logsumexp(-1))
