"""The training loop end to end on the micro pair: metrics, checkpoints, accumulation, resume, pair checks."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError, OptimConfig, SelectorConfig
from tip_cli.models import enable_checkpointing
from tip_cli.pairs import load_pair
from tip_cli.rollout import sources
from tip_cli.rollout.batch import pack
from tip_cli.tracking import read_jsonl
from tip_cli.train import loop, precision, recipe, schedule
from tip_cli.train import step as train_step

SPEC_METRICS = [
    "step", "loss", "tokens/total", "tokens/kept", "tokens/kept_frac",
    *[f"tokens/q{i}_frac" for i in range(1, 5)], *[f"tokens/kept_q{i}_frac" for i in range(1, 5)],
    "entropy/mean", "entropy/p50", "entropy/p90", "div/mean", "div/p50", "div/p90", "div/kept_mean", "div/dropped_mean",
    "rollout/response_len", "rollout/accuracy", "time/rollout", "time/teacher", "time/select", "time/train",
    "time/step", "perf/tokens_per_s", "perf/peak_mem_gb", "optim/lr", "optim/grad_norm",
    "time/weight_sync", "time/wait", "time/probe", "perf/rollout_tokens_per_s",
]
# the phases of a step: none overlaps another, all lie inside time/step
PHASES = ["time/rollout", "time/teacher", "time/select", "time/train", "time/probe", "time/weight_sync", "time/wait"]


def test_train_logs_every_spec_metric_and_saves_hf_checkpoints(tmp_path, micro_overrides):
    cfg = compose_config([*micro_overrides, "selector=soft_or", "budget=0.5", "logger=wandb", "logger.mode=offline"])
    recipe.train(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert set(SPEC_METRICS) <= set(row), set(SPEC_METRICS) - set(row)
        assert 0.4 <= row["tokens/kept_frac"] <= 0.6
        # synchronous, on the hf engine (it decodes with the training module), without a gradient probe
        assert row["time/wait"] == row["time/weight_sync"] == row["time/probe"] == 0.0
        assert all(row[p] > 0 for p in ("time/rollout", "time/teacher", "time/select", "time/train"))
        assert sum(row[p] for p in PHASES) <= row["time/step"] + 1e-6
    assert any("eval/toy/accuracy" in r for r in rows if r["step"] == 0)
    ckpt = tmp_path / "checkpoints" / "step_2"
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    assert "selector" in (tmp_path / "config.yaml").read_text()
    sample = np.load(tmp_path / "token_samples" / "step_000001.npz")
    assert len(sample["entropy"]) == steps[0]["tokens/total"] and sample["kept"].sum() == steps[0]["tokens/kept"]
    assert np.bincount(sample["quadrant"], minlength=5)[3] / len(sample["quadrant"]) == pytest.approx(steps[0]["tokens/q3_frac"])
    kept_g2 = (sample["grad_norm"].astype(np.float64) ** 2)[sample["kept"]].sum()
    assert kept_g2 / (sample["grad_norm"].astype(np.float64) ** 2).sum() == pytest.approx(steps[0]["grad/kept_share"], rel=1e-4)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # a real W&B run, offline


def grads_after_step(pair, batch, cfg) -> list[torch.Tensor]:
    pair.student.zero_grad(set_to_none=True)
    metrics, stats, kept = train_step.distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    assert metrics["tokens/kept"] == kept.numel() == round(0.5 * len(stats))
    return [p.grad.clone() for p in pair.student.parameters()]


def test_a_run_resolves_its_selector_and_precision_once_not_every_step(tmp_path, micro_overrides, monkeypatch):
    """The step's specs are built once per run (recipe.specs) and handed down; no step reads the config."""
    calls = {"selector": 0, "precision": 0}
    real_spec, real_resolve = SelectorConfig.spec, precision.resolve

    def counting_spec(self):
        calls["selector"] += 1
        return real_spec(self)

    def counting_resolve(*args):
        calls["precision"] += 1
        return real_resolve(*args)

    monkeypatch.setattr(SelectorConfig, "spec", counting_spec)
    monkeypatch.setattr(precision, "resolve", counting_resolve)
    recipe.train(compose_config([*micro_overrides, "train.steps=3", "train.eval_before=false"]), tmp_path)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert calls == {"selector": 1, "precision": 1}


@pytest.mark.parametrize("loss_norm", ["selected", "total"])
def test_micro_batches_give_the_same_gradient_as_one_pass(micro_overrides, loss_norm):
    cfg = compose_config([*micro_overrides, "selector=soft_or", "budget=0.5", f"loss.norm={loss_norm}"])
    pair = load_pair(cfg.pair, torch.device("cpu"))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = [[20, 21, 22], [23], [24, 25, 26, 27], [28, 29], [30, 31, 32, 33, 34]]
    batch = pack(prompts, responses, pair.tokenizer.pad_token_id)
    whole = grads_after_step(pair, batch, cfg)
    cfg.train.micro_batch_size = 2
    split = grads_after_step(pair, batch, cfg)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in whole)


def test_killed_run_resumes_and_continues_the_curve(tmp_path, micro_overrides, monkeypatch):
    overrides = [*micro_overrides, "train.steps=4", "train.save_every=1", "train.eval_before=false"]
    reference = tmp_path / "reference"
    recipe.train(compose_config(overrides), reference)

    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    real_pack = sources.pack

    def dies_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(sources, "pack", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(compose_config(overrides), crashed)
    monkeypatch.setattr(sources, "pack", real_pack)
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step_1", "step_2"]

    recipe.train(compose_config(overrides), crashed)
    got = [r for r in read_jsonl(crashed / "metrics.jsonl") if "loss" in r]
    want = [r for r in read_jsonl(reference / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)


def test_pair_with_a_different_tokenizer_fails_naming_both(tmp_path, micro, micro_overrides):
    from tip_cli.toy.sft import save_model
    from tip_cli.toy.task import generate_problems
    from tip_cli.toy.tokenizer import train_tokenizer

    other = tmp_path / "other_teacher"
    model = AutoModelForCausalLM.from_pretrained(micro["teacher"])
    save_model(model, train_tokenizer(generate_problems(50, seed=9), vocab_size=300), other)
    cfg = compose_config([*micro_overrides, f"pair.teacher={other}"])
    with pytest.raises(ConfigError, match="different tokenizers") as info:
        load_pair(cfg.pair, torch.device("cpu"))
    assert str(other) in str(info.value) and str(micro["student"]) in str(info.value)


def test_pair_with_a_different_chat_template_fails_naming_both(tmp_path, micro, micro_overrides):
    other = tmp_path / "templated_teacher"
    shutil.copytree(micro["teacher"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(other)
    cfg = compose_config([*micro_overrides, f"pair.teacher={other}"])
    with pytest.raises(ConfigError, match="chat templates") as info:
        load_pair(cfg.pair, torch.device("cpu"))
    assert str(other) in str(info.value)


def test_multirun_makes_one_run_dir_per_job_and_eval_reads_them(tmp_path, micro_overrides):
    overrides = [o for o in micro_overrides if not o.startswith("train.steps")]
    cmd = [sys.executable, "-m", "tip_cli.cli", "train", "-m", *overrides, "train.steps=1", "budget=0.5,1.0"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True)
    runs = sorted(p for p in (tmp_path / "multirun").glob("*/*/*") if p.is_dir())
    assert len(runs) == 2, runs
    assert "budget=0.5" in runs[0].name and "budget=1.0" in runs[1].name
    kept = sorted(read_jsonl(run / "metrics.jsonl")[-2]["tokens/kept_frac"] for run in runs)
    assert kept[0] < 0.7 and kept[1] == 1.0

    subprocess.run([sys.executable, "-m", "tip_cli.cli", "eval", str(runs[0]), *overrides],
                   cwd=tmp_path, check=True, capture_output=True, text=True)
    curve = json.loads((runs[0] / "eval" / "toy" / "curve.json").read_text())
    assert [row["step"] for row in curve] == [1]
    result = json.loads((runs[0] / "checkpoints" / "step_1" / "eval" / "toy" / "results.json").read_text())
    assert len(result["records"]) == 4 and "avg@1" in result["metrics"]


def test_gradient_checkpointing_gives_the_same_gradient(micro_overrides):
    cfg = compose_config([*micro_overrides, "selector=entropy", "selector.mode=topk", "budget=0.5"])
    pair = load_pair(cfg.pair, torch.device("cpu"))
    batch = pack([[1, 2, 3], [4, 5, 6, 7]], [[20, 21, 22, 23], [24, 25]], pair.tokenizer.pad_token_id)
    plain = grads_after_step(pair, batch, cfg)
    enable_checkpointing(pair.student)
    assert pair.student.is_gradient_checkpointing
    checkpointed = grads_after_step(pair, batch, cfg)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_full_token_step_takes_its_stats_from_the_loss_pass(micro_overrides, monkeypatch, micro_batch):
    """selector=all skips the scoring pass: its loss, gradients, per-token (H, D) and metrics equal those of the
    score-then-select path (forced here by making keeps_all say no)."""
    cfg = compose_config([*micro_overrides, "selector=all", f"train.micro_batch_size={micro_batch}"])
    pair = load_pair(cfg.pair, torch.device("cpu"))
    batch = pack([[1, 2, 3], [4, 5], [6, 7, 8]], [[20, 21, 22], [23, 24], [25, 26, 27, 28]], pair.tokenizer.pad_token_id)

    def step():
        pair.student.zero_grad(set_to_none=True)
        metrics, stats, kept = train_step.distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
        return metrics, stats, kept, [p.grad.clone() for p in pair.student.parameters()]

    fused = step()
    monkeypatch.setattr(train_step.selectors, "keeps_all", lambda *a: False)
    scored = step()
    assert fused[2].tolist() == scored[2].tolist() == list(range(9))
    torch.testing.assert_close(fused[1].entropy, scored[1].entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1].divergence, scored[1].divergence, rtol=1e-4, atol=1e-6)
    assert fused[0]["loss"] == pytest.approx(scored[0]["loss"], rel=1e-5)
    assert fused[0]["tokens/q3_frac"] == scored[0]["tokens/q3_frac"]
    for a, b in zip(fused[3], scored[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


GiB = 2**30


class FakeCuda:
    """torch's allocator counts, by hand: a sleeping vLLM pool stays counted as allocated, as it does on CUDA."""

    def __init__(self):
        self.now = self.high = 0
        self.resets = 0

    def alloc(self, n: int) -> None:
        self.now += n
        self.high = max(self.high, self.now)

    def allocated(self) -> int:
        return self.now

    def peak(self) -> int:
        return self.high

    def reset_peak(self) -> None:
        self.high, self.resets = self.now, self.resets + 1


def test_peak_memory_is_the_training_phase_net_of_the_engine():
    from tip_cli.tracking import PeakMemory

    cuda = FakeCuda()
    memory = PeakMemory(torch.device("cuda"), cuda)
    cuda.alloc(3 * GiB)  # the student, its AdamW state, the teacher
    with memory.engine_build():
        cuda.alloc(20 * GiB)  # the engine's weights and KV cache pool
    assert memory.engine == 20 * GiB
    for activations in (4, 6):  # two steps
        cuda.alloc(9 * GiB)  # rollouts: the pool awake, plus generation's own buffers
        cuda.alloc(-9 * GiB)
        memory.start()  # the engine sleeps; torch still counts its pool
        cuda.alloc(activations * GiB)  # the training step
        cuda.alloc(-activations * GiB)
        assert memory.gb() == 3 + activations  # not 23 + ..., nor the rollout's 32
    assert cuda.resets == 2


def test_each_step_starts_its_peak_when_the_engine_sleeps(tmp_path, micro_overrides, monkeypatch):
    """The loop's wiring: the engine's build is measured, the peak restarts after the engine sleeps, and
    perf/peak_mem_gb is read net of the engine."""
    from tip_cli import tracking

    cuda, events = FakeCuda(), []
    monkeypatch.setattr(recipe, "PeakMemory", lambda device: tracking.PeakMemory(device, cuda))
    build = recipe.make_engine

    def engine_with_a_pool(*args, **kwargs):
        engine = build(*args, **kwargs)
        cuda.alloc(20 * GiB)
        sleep = engine.sleep

        def logged_sleep():
            events.append(("sleep", cuda.resets))
            sleep()

        engine.sleep = logged_sleep
        return engine

    monkeypatch.setattr(recipe, "make_engine", engine_with_a_pool)
    step = train_step.distill_step

    def step_with_a_peak(*args, **kwargs):
        events.append(("step", cuda.resets))
        cuda.alloc(2 * GiB)
        cuda.alloc(-2 * GiB)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "distill_step", step_with_a_peak)
    recipe.train(compose_config([*micro_overrides, "train.eval_before=false"]), tmp_path)
    assert events == [("sleep", 0), ("step", 1), ("sleep", 1), ("step", 2)]
    peaks = [r["perf/peak_mem_gb"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert peaks == [2.0, 2.0]


def test_an_engine_with_its_own_weights_is_synced_and_timed_each_step(tmp_path, micro_overrides, monkeypatch):
    """An engine that decodes with its own copy (vLLM) takes the student after every update; the push is
    time/weight_sync, inside time/step with the other phases."""
    import time

    build, pushes = recipe.make_engine, []

    def engine_with_its_own_copy(*args, **kwargs):
        engine = build(*args, **kwargs)
        engine.own_weights = True  # an unsharded student is used as it is either way

        def slow_sync(model):
            pushes.append(model)
            time.sleep(0.05)

        engine.sync_weights = slow_sync
        return engine

    monkeypatch.setattr(recipe, "make_engine", engine_with_its_own_copy)
    recipe.train(compose_config([*micro_overrides, "train.eval_before=false"]), tmp_path)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(pushes) == len(steps) == 2
    for row in steps:
        assert 0.05 <= row["time/weight_sync"] < row["time/step"] and row["time/wait"] == 0.0
        assert sum(row[p] for p in PHASES) <= row["time/step"] + 1e-6


def test_adamw_is_fused_when_every_parameter_is_on_cuda(monkeypatch):
    """torch's default on CUDA (foreach) makes a temporary as large as the weights; fused steps in place. On CPU and
    with any parameter off CUDA (offloaded shards), torch's default stays."""
    made = []

    def spy(params, **kwargs):
        made.append(kwargs)
        return kwargs

    cfg = OptimConfig(lr=3e-4, weight_decay=0.1)
    monkeypatch.setattr(schedule.torch.optim, "AdamW", spy)
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    on_cpu = SimpleNamespace(device=torch.device("cpu"))
    for params in ([on_cuda, on_cuda], [on_cuda, on_cpu], [on_cpu]):
        schedule.make_optimizer(iter(params), cfg)
    assert made == [{"lr": 3e-4, "weight_decay": 0.1, "fused": fused} for fused in (True, None, None)]
    monkeypatch.undo()
    p = torch.nn.Parameter(torch.ones(3))
    opt = schedule.make_optimizer([p], cfg)
    assert opt.defaults["fused"] is None and opt.defaults["foreach"] is None  # CPU: as torch has it
    p.grad = torch.ones(3)
    opt.step()
    # AdamW's first step with m/sqrt(v) = 1: w (1 - lr wd) - lr
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 3e-4 * 0.1 - 3e-4))
