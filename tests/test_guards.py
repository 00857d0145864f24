"""Non-finite values never reach the optimizer or a selector, and one temperature for H, D and the loss (float64)."""

import math

import pytest
import torch

from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError, ImportanceConfig, SelectorConfig
from tip_cli.pairs import load_pair
from tip_cli.rollout.batch import pack
from tip_cli.selection import selectors
from tip_cli.selection.quadrants import compute_stats
from tip_cli.tracking import read_jsonl
from tip_cli.train import loop, recipe
from tip_cli.train import step as train_step

# ---------------------------------------------------------------------------------------------------------------------
# Non-finite steps


def test_an_inf_logit_skips_the_step_counts_it_and_stops_the_run_after_the_limit(tmp_path, micro_overrides, monkeypatch):
    """From step 2 on the teacher gives an inf logit: D is NaN, so those steps update nothing; the third such step
    in a row stops the run, naming the step and the last good checkpoint (step 1)."""
    cfg = compose_config([*micro_overrides, "train.steps=6", "train.save_every=1", "train.eval_before=false",
                          "train.max_skipped_steps=3", "optim.lr=1e-2"])
    real = train_step.teacher_targets
    calls = {"n": 0}

    def inf_from_step_2(*args, **kwargs):
        calls["n"] += 1
        teacher = real(*args, **kwargs)
        if calls["n"] >= 2:
            teacher.hidden[0, 0] = math.inf  # one row's logits become +-inf: its log-softmax is NaN
        return teacher

    monkeypatch.setattr(train_step, "teacher_targets", inf_from_step_2)
    weights = {}
    real_save = loop.checkpoints.save

    def save_and_keep(run_dir, step, student, *args, **kwargs):
        weights[step] = {n: p.detach().clone() for n, p in student.named_parameters()}
        real_save(run_dir, step, student, *args, **kwargs)

    monkeypatch.setattr(loop.checkpoints, "save", save_and_keep)
    with pytest.raises(loop.NonFiniteStepsError) as info:
        recipe.train(cfg, tmp_path)
    message = str(info.value)
    assert message.startswith("step 4: 3 steps in a row") and "train.max_skipped_steps" in message
    # skipped steps change nothing, so their checkpoints hold step 1's weights: the newest is the last good one
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_3'}." in message
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/skipped_steps" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in rows] == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)]
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[0]["loss"])
    for step in (2, 3):  # no update on a skipped step: the weights are step 1's
        for name, w in weights[1].items():
            assert torch.equal(weights[step][name], w), (step, name)


def test_skipped_steps_stop_with_a_one_line_cli_error_naming_the_checkpoint():
    msg = loop.non_finite_message(7, 3, None)
    assert msg.startswith("step 7: 3 steps in a row") and "no checkpoint was written" in msg and "\n" not in msg


@pytest.mark.parametrize("name", list(selectors.SELECTORS))
def test_no_selector_ranks_nan_scores(name):
    ent = torch.tensor([0.5, float("nan"), 1.0, 0.2])
    div = torch.tensor([0.1, 0.3, 0.2, 0.4])
    stats = compute_stats(ent, div, torch.zeros(4, dtype=torch.long), ImportanceConfig())
    with pytest.raises(ValueError, match="1 of 4 tokens have a non-finite entropy or divergence"):
        selectors.select(stats, SelectorConfig(name=name), 0.5, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------------
# One temperature


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
RESPONSES = [[20, 21, 22, 40], [23, 42], [24, 25, 26, 27, 30]]


@pytest.mark.parametrize(("overrides", "temperature"), [
    (["rollout.temperature=0.6"], 0.6),  # the rollouts' distribution by default
    (["rollout.temperature=0.6", "loss.temperature=1.7"], 1.7),  # an explicit loss.temperature wins
    (["rollout.temperature=0"], 1.0),  # greedy rollouts: T = 1
])
@pytest.mark.parametrize("selector", ["all", "soft_or"])
def test_h_d_and_loss_use_softmax_of_logits_over_t(micro_overrides, overrides, temperature, selector):
    cfg = compose_config([*micro_overrides, *overrides, f"selector={selector}", "budget=0.5",
                          "importance.threshold=quantile"])
    assert recipe.specs(cfg, torch.device("cpu")).step.temperature == temperature
    pair = load_pair(cfg.pair, torch.device("cpu"))
    batch = pack(PROMPTS, RESPONSES, pair.tokenizer.pad_token_id)
    metrics, stats, kept = train_step.distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    with torch.no_grad():  # float64 reference: both models' full logits, divided by T
        kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        ls = (pair.student(**kw).logits.double()[batch.target_mask] / temperature).log_softmax(-1)  # [N, V]
        lt = (pair.teacher(**kw).logits.double()[batch.target_mask] / temperature).log_softmax(-1)
    ent = -(ls.exp() * ls).sum(-1)
    kl = (ls.exp() * (ls - lt)).sum(-1)  # reverse KL(S || T) at T, per token
    torch.testing.assert_close(stats.entropy.double(), ent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.divergence.double(), kl, rtol=1e-4, atol=1e-5)
    assert metrics["loss"] == pytest.approx(kl[kept].mean().item(), rel=1e-4)
    if temperature != 1.0:  # the test can fail: at T = 1 D differs
        with torch.no_grad():
            ls1 = pair.student(**kw).logits.double()[batch.target_mask].log_softmax(-1)
            lt1 = pair.teacher(**kw).logits.double()[batch.target_mask].log_softmax(-1)
        assert not torch.allclose(stats.divergence.double(), (ls1.exp() * (ls1 - lt1)).sum(-1), rtol=1e-2)


@pytest.mark.parametrize("backend", ["vllm_topk", "vllm_server teacher.url=http://127.0.0.1:1"])
def test_a_top_k_vllm_teacher_refuses_a_temperature_other_than_one_when_composed(backend):
    with pytest.raises(ConfigError, match="loss.temperature=1"):
        compose_config(["rollout.temperature=0.6", "loss.temperature=null", *f"teacher.backend={backend}".split()])
    cfg = compose_config(["rollout.temperature=0.6", "loss.temperature=1", *f"teacher.backend={backend}".split()])
    assert recipe.specs(cfg, torch.device("cpu")).step.temperature == 1.0
    cfg = compose_config(["rollout.temperature=0.6", "loss.temperature=null"])  # hf: T follows the rollouts
    assert recipe.specs(cfg, torch.device("cpu")).step.temperature == 0.6
