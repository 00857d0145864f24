"""tip_cli/train/memory.py: parameter counts against transformers' own models, the byte arithmetic against hand
computations, and every real-scale recipe (conf/experiment) against the GPU its header states."""

import re

import pytest
import torch

from tip_cli.cli import compose_config
from tip_cli.config.compose import CONF_DIR
from tip_cli.train.chunks import auto_rows
from tip_cli.train.memory import GB, GIB, SHAPES, estimate, vllm_kv_tokens

QWEN3_1_7B, QWEN3_8B = SHAPES["Qwen/Qwen3-1.7B"], SHAPES["Qwen/Qwen3-8B"]


def _hf_config(name, s):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kw = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
              num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
              tie_word_embeddings=s.tied)
    if name.startswith("Qwen/Qwen3"):
        return Qwen3Config(head_dim=s.head_dim, **kw)
    if name.startswith("Qwen/Qwen2.5"):
        return Qwen2Config(**kw)
    return LlamaConfig(head_dim=s.head_dim, **kw)


@pytest.mark.parametrize("name", list(SHAPES))
def test_parameter_counts_are_transformers_models(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(name, SHAPES[name]))
    assert SHAPES[name].params() == sum(p.numel() for p in model.parameters())


def test_bytes_per_token_by_hand():
    # Qwen3-1.7B: 2 x (6*2048 + 3*2048 + 2*1024 + 4*6144 + 3*(2048 + 1024)) = 2 x 54,272
    assert QWEN3_1_7B.activation_bytes() == 108_544
    # Qwen3-8B KV: 2 x 36 layers x 8 kv heads x 128 x 2 bytes; Qwen3's 40,960-token context is then 5.625 GiB
    assert QWEN3_8B.kv_bytes_per_token() == 147_456
    assert QWEN3_8B.kv_bytes_per_token() * 40_960 / GIB == 5.625
    # 0.3 x 80 GB - 2 x 8,190,735,360 bytes of weights - 2 GiB = 5,471,045,632 bytes of KV = 37,102 tokens
    assert vllm_kv_tokens(QWEN3_8B, 80 * GB, 0.3) == 5_471_045_632 // 147_456 == 37_102


def test_the_qwen3_pair_at_micro_batch_4_needs_checkpointing_on_80_gb():
    """pair=qwen3, 4 sequences of 4096 new tokens a micro-batch: ~44 GB of states and weights, and ~50 GB of
    activations without gradient checkpointing (out of memory), ~3.7 GB with it."""
    tokens = 4 * 4096
    plain = estimate(QWEN3_1_7B, QWEN3_8B, tokens, 128 * 4096, checkpointing=False)
    ckpt = estimate(QWEN3_1_7B, QWEN3_8B, tokens, 128 * 4096, checkpointing=True)
    assert plain.student_states == 16 * 1_720_574_976 and plain.teacher_weights == 2 * 8_190_735_360
    assert (plain.student_states + plain.teacher_weights) / GB == pytest.approx(43.91, abs=0.01)
    assert plain.activations == 108_544 * 28 * tokens  # 49.8 GB
    assert ckpt.activations == 2 * 2048 * 28 * tokens + 108_544 * tokens  # 3.66 GB
    assert plain.teacher_hidden == 2 * 4096 * 128 * 4096  # 4.3 GB
    assert plain.train_peak > 80 * GB > ckpt.train_peak


def _recipes():
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", _recipes())
def test_each_recipe_fits_the_gpu_it_states(name):
    """Training (longest sequences, a full rollout batch of teacher hidden states), rollouts (the student's vLLM
    engine awake beside the trainer) and a vllm_topk teacher engine holding the recipe's context, on the stated GPU."""
    header = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    gpu = float(re.search(r"Hardware: 1 GPU with (\d+) GB", header).group(1)) * GB
    cfg = compose_config([f"+experiment={name}"])
    student, teacher = SHAPES[cfg.pair.student], SHAPES[cfg.pair.teacher]
    seq = cfg.teacher.vllm.max_model_len  # prompt + response, the longest sequence a step sees
    assert seq is not None and cfg.train.gradient_checkpointing and cfg.loss.chunk_size in (None, "auto")
    got = estimate(student, teacher, cfg.train.micro_batch_size * seq,
                   cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt * seq, checkpointing=True,
                   gpu_bytes=gpu, vllm_utilization=cfg.rollout.vllm.gpu_memory_utilization,
                   chunk=auto_rows(min(student.vocab, teacher.vocab), "cuda", int(gpu)))
    assert got.train_peak < 0.9 * gpu and got.rollout_peak < 0.9 * gpu
    assert vllm_kv_tokens(teacher, gpu, cfg.teacher.vllm.gpu_memory_utilization) >= seq
    assert vllm_kv_tokens(student, gpu, cfg.rollout.vllm.gpu_memory_utilization) >= seq
