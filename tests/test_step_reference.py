"""A budgeted `distill_step` against an independent float64 reference, through the real HF forward.

The reference follows SPEC sections 1-5 with plain torch and Python: the full [N, V] logits of both models from
their own HF forward (lm_head included) on the packed batch, H and D per token, min-max normalisation, median
thresholds, the kept set by a plain sort of the selector's score, the loss as the sum of the per-token divergence
over the kept tokens divided by the kept (or total) count, and the gradients by autograd in float64. The step
under test runs on the fp32 models; its gradients on the student's parameters must match to ~1e-4.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tip_cli.config.schema import ImportanceConfig, LossConfig, SelectorConfig, TipConfig, TrainConfig
from tip_cli.models import Pair
from tip_cli.rollout.batch import Batch, pack
from tip_cli.train.recipe import specs
from tip_cli.train.step import distill_step

SMALL_V, LARGE_V = 80, 96  # two lm_head sizes: the loss uses the shared prefix [:SMALL_V]


def qwen2(vocab: int, seed: int) -> Qwen2ForCausalLM:
    """A tiny Qwen2 with tied input/output embeddings."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def llama(vocab: int, seed: int) -> LlamaForCausalLM:
    """A tiny Llama with a separate lm_head."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def scaled(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Sharper output distributions (larger logits), so H and D spread over a wide range, as in a trained model."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model.float()


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """(student, teacher): `tied`: a tied Qwen2 student (V=80) and a Llama teacher (V=96); `untied`: the reverse."""
    return {
        "tied": (scaled(qwen2(SMALL_V, 1), 8.0).train(), scaled(llama(LARGE_V, 2), 30.0).eval()),
        "untied": (scaled(llama(LARGE_V, 3), 30.0).train(), scaled(qwen2(SMALL_V, 4), 8.0).eval()),
    }


def make_batch(seed: int) -> Batch:
    """Five rows of random prompts and responses (ids below both vocabularies), right-padded: N = 24."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(2, 5), (3, 3), (4, 7), (2, 4), (3, 5)]  # (prompt, response)
    draw = lambda n: torch.randint(1, SMALL_V, (n,), generator=g).tolist()  # noqa: E731
    return pack([draw(p) for p, _ in lengths], [draw(r) for _, r in lengths], pad_id=0)


# ---------------------------------------------------------------------------------------------------------------------
# The float64 reference


def per_token_div(logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """SPEC 1: reverse KL(p_S || p_T), forward KL(p_T || p_S), or JSD(beta) with m = beta p_T + (1 - beta) p_S."""
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if kind == "reverse_kl":
        return (p_s * (logp_s - logp_t)).sum(-1)
    if kind == "forward_kl":
        return (p_t * (logp_t - logp_s)).sum(-1)
    log_m = (beta * p_t + (1 - beta) * p_s).log()
    return beta * (p_t * (logp_t - log_m)).sum(-1) + (1 - beta) * (p_s * (logp_s - log_m)).sum(-1)


def top_by(score: list[float], eligible: list[int], k: int) -> list[int]:
    """The k eligible indices of largest score, ties to the lower index: a plain sort."""
    return sorted(sorted(eligible, key=lambda i: (-score[i], i))[:k])


def reference_kept(sel: SelectorConfig, budget: float, h: list[float], d: list[float]) -> list[int]:
    """SPEC 3-5 for the deterministic selectors: K = max(1, floor(b N + 0.5)); min-max axes; median thresholds."""
    n = len(h)
    k = min(n, max(1, math.floor(budget * n + 0.5)))

    def minmax(x):
        lo, hi = min(x), max(x)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in x]

    h_hat, d_hat = minmax(h), minmax(d)
    soft_or = [a + b - a * b for a, b in zip(h_hat, d_hat, strict=True)]
    high_h = [v > statistics.median(h) for v in h]  # strictly above the median
    high_d = [v > statistics.median(d) for v in d]
    everyone = list(range(n))
    if sel.name == "all":
        return everyone
    if sel.name in ("soft_or", "entropy", "divergence"):
        return top_by({"soft_or": soft_or, "entropy": h, "divergence": d}[sel.name], everyone, k)
    caps = {"divergence": d, "entropy": h, "soft_or": soft_or}
    if sel.name == "hard_or":
        return top_by(caps[sel.cap_by], [i for i in everyone if high_h[i] or high_d[i]], k)
    if sel.name == "quadrant":
        quadrant = [1 + 2 * (not high_h[i]) + (not high_d[i]) for i in everyone]
        wanted = {int(q[1:]) for q in sel.quadrants}
        return top_by(caps[sel.cap_by], [i for i in everyone if quadrant[i] in wanted], k)
    raise AssertionError(f"no reference for selector {sel.name}")


@dataclass
class Reference:
    entropy: torch.Tensor  # [N] float64
    divergence: torch.Tensor  # [N] float64
    kept: list[int]
    loss: float
    grads: dict[str, torch.Tensor]  # float64, by parameter name


def reference_step(student, teacher, batch: Batch, cfg: TipConfig) -> Reference:
    """Full-vocab log-probs of float64 copies of both models, H and D, the kept set, the loss and its gradients."""
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    mask = batch.target_mask
    logits_s = student64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]  # [N, V_S]
    with torch.no_grad():
        logits_t = teacher64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]  # [N, V_T]
    logp_s = torch.log_softmax(logits_s[:, :vocab], -1)  # [N, V]
    logp_t = torch.log_softmax(logits_t[:, :vocab], -1)
    imp = cfg.importance
    entropy = -(logp_s.exp() * logp_s).sum(-1).detach()
    divergence = per_token_div(logp_s, logp_t, imp.divergence, imp.jsd_beta).detach()
    kept = reference_kept(cfg.selector, cfg.budget, entropy.tolist(), divergence.tolist())
    div = per_token_div(logp_s[kept], logp_t[kept], cfg.loss.kind, cfg.loss.jsd_beta)
    loss = div.sum() / (len(kept) if cfg.loss.norm == "selected" else mask.sum())
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in student64.named_parameters()}
    return Reference(entropy, divergence, kept, loss.item(), grads)


# ---------------------------------------------------------------------------------------------------------------------
# The step under test


def run_distill_step(student, teacher, batch: Batch, cfg: TipConfig):
    """distill_step on the fp32 pair from zeroed gradients: (metrics, stats, kept, {name: grad})."""
    pair = Pair(student, teacher, tokenizer=None, vocab=min(student.config.vocab_size, teacher.config.vocab_size),
                device=torch.device("cpu"))
    student.zero_grad(set_to_none=True)
    metrics, stats, kept = distill_step(pair, batch, specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in student.named_parameters()}
    return metrics, stats, kept, grads


def make_cfg(selector: str, budget: float, kind: str, micro: int, norm: str = "selected", backend: str = "eager",
             **sel) -> TipConfig:
    """A config for one case; small chunks, so scoring and the loss both walk several [chunk, V] blocks."""
    return TipConfig(
        selector=SelectorConfig(name=selector, mode="topk", **sel),
        budget=budget,
        importance=ImportanceConfig(chunk_size=7, divergence="reverse_kl"),
        loss=LossConfig(kind=kind, jsd_beta=0.3 if kind == "jsd" else 0.5, norm=norm, chunk_size=5,
                        backend=backend),
        train=TrainConfig(micro_batch_size=micro),
    )


CASES = [  # (pair, selector, budget, loss kind, micro-batch rows: 0 = all rows in one pass, 1 = one row, norm)
    ("tied", "soft_or", 0.5, "reverse_kl", 0, "selected"),
    ("untied", "soft_or", 0.5, "reverse_kl", 1, "selected"),
    ("tied", "soft_or", 0.1, "forward_kl", 1, "selected"),
    ("untied", "soft_or", 0.1, "jsd", 0, "total"),
    ("tied", "entropy", 0.5, "jsd", 1, "selected"),
    ("untied", "entropy", 0.1, "forward_kl", 0, "selected"),
    ("tied", "divergence", 0.5, "reverse_kl", 1, "total"),
    ("untied", "quadrant", 0.1, "reverse_kl", 1, "selected"),
    ("tied", "quadrant", 0.5, "forward_kl", 0, "selected"),
    ("untied", "quadrant", 1.0, "jsd", 1, "selected"),
    ("tied", "hard_or", 0.5, "reverse_kl", 0, "selected"),
    ("tied", "soft_or", 1.0, "reverse_kl", 1, "selected"),  # every token kept: the fused, no-scoring path
    ("untied", "soft_or", 1.0, "forward_kl", 0, "total"),
    ("untied", "entropy", 1.0, "jsd", 0, "selected"),
]


# loss.backend=compiled: the torch.compile'd scoring statistics and reverse-KL chunk (tip_cli.logits.compiled)
COMPILED = [
    ("tied", "soft_or", 0.5, "reverse_kl", 0, "selected"),
    ("untied", "entropy", 0.1, "reverse_kl", 1, "total"),
    ("tied", "soft_or", 1.0, "reverse_kl", 1, "selected"),
]


@pytest.mark.parametrize("pair_name,selector,budget,kind,micro,norm,backend",
                         [(*c, "eager") for c in CASES] + [(*c, "compiled") for c in COMPILED],
                         ids=["-".join(map(str, c)) for c in CASES] + ["compiled-" + "-".join(map(str, c)) for c in COMPILED])
def test_distill_step_matches_the_float64_reference(pairs, pair_name, selector, budget, kind, micro, norm, backend):
    student, teacher = pairs[pair_name]
    batch = make_batch(seed=len(selector) + int(10 * budget))
    cfg = make_cfg(selector, budget, kind, micro, norm, backend,
                   **({"cap_by": "soft_or"} if selector == "hard_or" else {}))
    ref = reference_step(student, teacher, batch, cfg)
    metrics, stats, kept, grads = run_distill_step(student, teacher, batch, cfg)

    n = int(batch.target_mask.sum())
    assert len(stats) == n == 24
    torch.testing.assert_close(stats.entropy.double(), ref.entropy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.divergence.double(), ref.divergence, rtol=1e-4, atol=1e-6)
    assert kept.tolist() == ref.kept
    assert 0 < len(ref.kept) and (budget == 1.0 and selector != "quadrant") == (len(ref.kept) == n)
    assert metrics["tokens/kept"] == len(ref.kept) and metrics["tokens/total"] == n
    assert metrics["loss"] == pytest.approx(ref.loss, rel=1e-4)
    assert ref.loss > 1e-3  # the models disagree: a zero gradient would not pass for a match
    for name, want in ref.grads.items():
        got = grads[name].double()
        scale = want.norm().item()
        assert scale > 0, name  # every student parameter takes part in the loss
        assert (got - want).norm().item() <= 1e-4 * scale, (name, (got - want).norm().item() / scale)


def test_the_reference_selection_is_not_the_trivial_one(pairs):
    """The cases above could pass with a selector that ignores the scores if the kept sets coincided: they do not."""
    student, teacher = pairs["tied"]
    batch = make_batch(seed=7)
    sets = {s: reference_step(student, teacher, batch, make_cfg(s, 0.5, "reverse_kl", 0)).kept
            for s in ("soft_or", "entropy", "divergence", "quadrant")}
    assert len({tuple(v) for v in sets.values()}) == 4, sets
    assert sets["soft_or"] != list(range(12))


# ---------------------------------------------------------------------------------------------------------------------
# Micro-batches cut to their own longest row


def full_width_rows(self: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) at the rollout batch's full width: the slicing before micro-batches were cut."""
    return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.target_mask[start:stop])


@pytest.mark.parametrize("pair_name,selector,budget,micro", [
    ("untied", "soft_or", 0.5, 2),  # scoring pass, then the loss pass, per micro-batch
    ("tied", "entropy", 0.1, 1),
    ("tied", "soft_or", 1.0, 2),  # every token kept: the loss pass alone
])
def test_micro_batches_cut_to_their_longest_row_keep_the_loss_and_gradients(
    pairs, monkeypatch, pair_name, selector, budget, micro
):
    import tip_cli.models

    student, teacher = pairs[pair_name]
    batch = make_batch(seed=3)
    lengths = batch.attention_mask.sum(1).tolist()  # [7, 6, 11, 6, 8]
    cfg = make_cfg(selector, budget, "reverse_kl", micro)
    widths = []
    forward = tip_cli.models.final_hidden

    def spy(model, input_ids, attention_mask):
        widths.append((model is student, input_ids.shape[1]))
        return forward(model, input_ids, attention_mask)

    monkeypatch.setattr(tip_cli.models, "final_hidden", spy)
    metrics, stats, kept, grads = run_distill_step(student, teacher, batch, cfg)
    own_max = [max(lengths[i : i + micro]) for i in range(0, len(lengths), micro)]
    assert own_max != [max(lengths)] * len(own_max)  # some micro-batch is shorter than the batch
    assert [w for is_s, w in widths if not is_s] == own_max  # the teacher's passes
    student_widths = [w for is_s, w in widths if is_s]
    if budget < 1.0:  # the scoring pass runs every micro-batch
        assert student_widths[: len(own_max)] == own_max
        student_widths = student_widths[len(own_max) :]
    remaining = iter(own_max)  # the loss pass: the micro-batches holding a kept token, in order
    assert student_widths and all(w in remaining for w in student_widths)

    seen = len(widths)
    monkeypatch.setattr(Batch, "rows", full_width_rows)
    metrics_full, stats_full, kept_full, grads_full = run_distill_step(student, teacher, batch, cfg)
    assert {w for _, w in widths[seen:]} == {max(lengths)}
    assert kept.tolist() == kept_full.tolist()
    torch.testing.assert_close(stats.entropy, stats_full.entropy, rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == pytest.approx(metrics_full["loss"], rel=1e-5)
    for name, want in grads_full.items():
        scale = want.norm().item()
        assert scale > 0, name
        assert (grads[name] - want).norm().item() <= 1e-5 * scale, (name, (grads[name] - want).norm().item() / scale)


def test_rows_cut_to_the_longest_row_keep_every_token():
    batch = make_batch(seed=0)
    lengths = batch.attention_mask.sum(1).tolist()
    for start, stop in [(0, 2), (1, 2), (2, 5), (4, 5), (0, 5)]:
        part = batch.rows(start, stop)
        width = max(lengths[start:stop])
        assert part.input_ids.shape == part.attention_mask.shape == part.target_mask.shape == (stop - start, width)
        for b in range(start, stop):
            n = lengths[b]
            assert part.input_ids[b - start, :n].tolist() == batch.input_ids[b, :n].tolist()
            assert part.attention_mask[b - start].sum() == n
            assert part.target_mask[b - start].tolist() == batch.target_mask[b, :width].tolist()
        assert not batch.target_mask[start:stop, width:].any()  # no loss position is cut


# ---------------------------------------------------------------------------------------------------------------------
# One gradient reduction and one host sync per step


@pytest.mark.parametrize("budget", [0.5, 1.0])  # the scored step, and the full-token step (no scoring pass)
def test_gradients_sync_on_the_last_micro_batch_only_and_the_loss_is_read_once(pairs, monkeypatch, budget):
    from torch.distributed.fsdp import FSDPModule

    events = []

    class Sharded(type(pairs["tied"][0]), FSDPModule):
        """What fully_shard makes of the student (its class gains FSDPModule), recording the sync requests."""

        def set_requires_gradient_sync(self, requires_gradient_sync, *, recurse=True):
            events.append(("sync", requires_gradient_sync))

    student, teacher = copy.deepcopy(pairs["tied"][0]), pairs["tied"][1]
    student.__class__ = Sharded
    student.get_output_embeddings().weight.register_hook(lambda g: events.append(("backward",)))
    readers = []
    item = torch.Tensor.item

    def spy_item(self):
        readers.append(sys._getframe(1).f_code.co_filename)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", spy_item)
    batch = make_batch(seed=3)
    metrics, _, _, _ = run_distill_step(student, teacher, batch, make_cfg("soft_or", budget, "reverse_kl", 2))

    backwards = [i for i, e in enumerate(events) if e == ("backward",)]
    assert len(backwards) == 3  # rows 5, micro-batches of 2: each holds a kept token
    assert [events[i - 1] for i in backwards] == [("sync", False), ("sync", False), ("sync", True)]
    assert events[-1] == ("sync", True)  # left on for whatever runs next
    assert sum(f.endswith("tip_cli/train/step.py") for f in readers) == 1
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
