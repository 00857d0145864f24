"""The parameter-space gradient probe (tip_cli.train.probe) against a float64 autograd reference: the cosine and norm
ratio between the budgeted and the full-token gradient, an update left exactly as without the probe, the steps it
runs on, and its sums over FSDP2 shards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_distributed import spawn
from test_step_reference import LARGE_V, SMALL_V, llama, make_batch, make_cfg, qwen2, scaled

from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError, TrainConfig
from tip_cli.models import Pair
from tip_cli.pairs import load_pair
from tip_cli.rollout.batch import pack
from tip_cli.tracking import read_jsonl
from tip_cli.train import parallel, probe, recipe, sharding
from tip_cli.train.step import distill_step

COS, RATIO = "grad/param_cosine", "grad/param_norm_ratio"


@pytest.fixture(scope="module")
def pair():
    """The tied Qwen2 student (V=80) and Llama teacher (V=96) of test_step_reference, fp32."""
    student, teacher = scaled(qwen2(SMALL_V, 1), 8.0).train(), scaled(llama(LARGE_V, 2), 30.0).eval()
    return Pair(student, teacher, tokenizer=None, vocab=SMALL_V, device=torch.device("cpu"))


def reference(pair: Pair, batch, kept: list[int], normalizer: int) -> tuple[float, float]:
    """(cosine, |g_B| / |g_F|) by float64 autograd on a copy of the student: the reverse KL over the full vocabulary
    summed over the kept rows, and over all rows, each divided by the same normaliser."""
    student, teacher = copy.deepcopy(pair.student).double(), copy.deepcopy(pair.teacher).double()
    mask = batch.target_mask
    logp_s = torch.log_softmax(student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
                               [:, : pair.vocab], -1)  # [N, V]
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
                                   [:, : pair.vocab], -1)
    per_token = (logp_s.exp() * (logp_s - logp_t)).sum(-1)  # [N]
    params = list(student.parameters())
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    g_b = flat(torch.autograd.grad(per_token[kept].sum() / normalizer, params, retain_graph=True))
    g_f = flat(torch.autograd.grad(per_token.sum() / normalizer, params))
    return (g_b @ g_f / (g_b.norm() * g_f.norm())).item(), (g_b.norm() / g_f.norm()).item()


def probed_step(pair: Pair, batch, cfg, step: int | None) -> tuple[dict, torch.Tensor, list[torch.Tensor]]:
    """distill_step from zeroed gradients: (metrics, kept, the gradients it leaves)."""
    pair.student.zero_grad(set_to_none=True)
    metrics, _, kept = distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {}, step=step)
    return metrics, kept, [p.grad.clone() for p in pair.student.parameters()]


@pytest.mark.parametrize("micro,norm,budget", [(0, "selected", 0.25), (2, "selected", 0.5), (1, "total", 0.25)])
def test_probe_matches_the_float64_reference(pair, micro, norm, budget):
    batch = make_batch(seed=5)
    cfg = make_cfg("soft_or", budget, "reverse_kl", micro, norm)
    cfg.train.grad_probe_every = 3
    metrics, kept, _ = probed_step(pair, batch, cfg, step=6)
    n = len(kept) if norm == "selected" else int(batch.target_mask.sum())
    cosine, ratio = reference(pair, batch, kept.tolist(), n)
    assert cosine < 0.99 and abs(ratio - 1) > 0.01  # the dropped tokens matter: a probe returning 1, 1 would fail
    assert metrics[COS] == pytest.approx(cosine, abs=1e-5)
    assert metrics[RATIO] == pytest.approx(ratio, rel=1e-5)


def test_probed_step_updates_the_weights_exactly_as_without_it(pair):
    batch = make_batch(seed=5)
    cfg = make_cfg("soft_or", 0.25, "reverse_kl", 2)
    cfg.train.grad_probe_every = 1
    after = []
    for step in (1, None):  # probed, and not
        model = Pair(copy.deepcopy(pair.student), pair.teacher, None, pair.vocab, pair.device)
        optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-2)
        metrics, _, grads = probed_step(model, batch, cfg, step)
        assert (COS in metrics) == (step is not None)
        torch.nn.utils.clip_grad_norm_(model.student.parameters(), 1.0)
        optimizer.step()
        after.append((grads, [p.detach().clone() for p in model.student.parameters()]))
    (grads_p, weights_p), (grads, weights) = after
    assert all(torch.equal(a, b) for a, b in zip(grads_p, grads, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights_p, weights, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(weights, pair.student.parameters(), strict=True))


def test_no_probe_off_its_steps_nor_when_every_token_is_kept(pair):
    batch = make_batch(seed=5)
    for budget, step, every, probed in [(0.5, 4, 2, True), (0.5, 3, 2, False), (0.5, 4, 0, False), (0.5, None, 1, False),
                                        (1.0, 4, 2, False)]:  # budget 1: the full-token step, g_B = g_F
        cfg = make_cfg("soft_or", budget, "reverse_kl", 0)
        cfg.train.grad_probe_every = every
        metrics, _, _ = probed_step(pair, batch, cfg, step)
        assert (COS in metrics and RATIO in metrics) == probed, (budget, step, every)
    assert not probe.due(1, 1, {"tokens/kept": 24.0, "tokens/total": 24.0})  # K = N on a scored step too


def test_probe_reports_nothing_for_a_non_finite_or_zero_gradient():
    model = torch.nn.Linear(3, 2)
    for grad, loss, want in [(1.0, lambda w: (w * 2).sum(), True), (math.nan, lambda w: (w * 2).sum(), False),
                             (1.0, lambda w: (w * math.inf).sum(), False), (0.0, lambda w: (w * 2).sum(), False)]:
        for p in model.parameters():
            p.grad = torch.full_like(p, grad)
        kept = [p.grad for p in model.parameters()]

        class Plain:
            def backward(self, part, loss):
                loss.backward()

            def total(self):
                return 0.0

        out = probe.param_cosine(model, Plain(), (loss(p) for p in model.parameters()))
        assert bool(out) == want, (grad, out)
        assert all(p.grad is g for p, g in zip(model.parameters(), kept, strict=True))  # put back, the same tensors
        if want:  # g_B = 1, g_F = 2 everywhere: parallel, half as long
            assert out[COS] == pytest.approx(1.0) and out[RATIO] == pytest.approx(0.5)


def test_probe_is_logged_every_n_steps_of_a_run(tmp_path, micro_overrides):
    cfg = compose_config([*micro_overrides, "selector=soft_or", "budget=0.5", "train.steps=4",
                          "train.grad_probe_every=2", "train.eval_before=false", "train.token_sample_every=0"])
    recipe.train(cfg, tmp_path)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in steps if COS in r and RATIO in r] == [2, 4]
    assert all(-1 <= r[COS] <= 1 and r[RATIO] > 0 for r in steps if COS in r)
    assert [r["step"] for r in steps if r["time/probe"] > 0] == [2, 4]  # logged every step: 0.0 off the probe steps


def test_grad_probe_every_is_validated():
    assert TrainConfig().grad_probe_every == 0
    with pytest.raises(ConfigError, match="train.grad_probe_every=-1 must be >= 0"):
        TrainConfig(grad_probe_every=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Under FSDP2: the sums over every rank's shards

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17]]
RESPONSES = [[20, 21, 22], [23, 24, 25], [24, 25, 26, 27], [28, 29], [30, 31, 32, 33, 34], [35, 36]]


def probe_step(cfg) -> dict:
    """The probe on this process's share of the batch (all of it alone), sharded under torchrun; and the gradients
    left for the update, gathered whole."""
    parallel.setup("cpu")
    pair = load_pair(cfg.pair, torch.device("cpu"))
    sharding.shard(pair, cfg.parallel, recipe.specs(cfg, pair.device).step.precision)
    batch = pack(parallel.my_slice(PROMPTS), parallel.my_slice(RESPONSES), pair.tokenizer.pad_token_id)
    out = {}
    for step in (1, None):
        pair.student.zero_grad(set_to_none=True)
        metrics, _, _ = distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {}, step=step)
        grads = {n: p.grad.full_tensor() if parallel.active() else p.grad for n, p in pair.student.named_parameters()}
        out[step] = ({k: metrics[k] for k in (COS, RATIO) if k in metrics}, grads)
    shards = [p.grad for p in pair.student.parameters()]  # DTensors under FSDP2
    out["sums"] = probe.inner_products(shards, [None if g is None else -2 * g for g in shards]).tolist()
    parallel.teardown()
    return out


def test_fsdp_probe_on_two_ranks_matches_one_process(tmp_path, micro_overrides):
    cfg = compose_config([*micro_overrides, "selector=soft_or", "budget=0.3", "train.grad_probe_every=1",
                          "train.micro_batch_size=2"])
    want = probe_step(cfg)
    ranks = spawn(probe_step, tmp_path, cfg)
    assert COS in want[1][0] and want[1][0][COS] < 0.999
    dot, bb, ff = want["sums"]
    assert bb > 0 and dot == pytest.approx(-2 * bb) and ff == pytest.approx(4 * bb)
    for got in ranks:
        assert got["sums"] == pytest.approx(want["sums"], rel=1e-5)  # the sums over both ranks' shards
        for key in (COS, RATIO):
            assert got[1][0][key] == pytest.approx(want[1][0][key], rel=1e-5)
        assert got[None][0] == {}
        for name, grad in got[None][1].items():  # the probed step leaves each rank the budgeted gradient
            assert torch.equal(got[1][1][name], grad), name
            torch.testing.assert_close(grad, want[None][1][name], rtol=1e-4, atol=1e-7)
