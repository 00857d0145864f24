"""Tiny Qwen3 models: their sizes (ModelSpec), creating and saving them, SFT on (prompt, solution) token ids, and
greedy accuracy on toy problems."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from tip_cli.grading import grade
from tip_cli.rollout.batch import Sampling
from tip_cli.rollout.hf import HFEngine
from tip_cli.toy.tokenizer import chat_prompt


@dataclass(frozen=True)
class ModelSpec:
    """Qwen3 sizes. The toy pairs keep head_dim 64: vLLM's CPU attention rejects smaller heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 64
    tie_embeddings: bool = True


def qwen3_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, vocab: int, context: int, **extra) -> Qwen3Config:
    """The Qwen3 config of `spec` over `vocab` rows and `context` positions, with the tokenizer's EOS and pad ids and
    no BOS; `extra` sets further Qwen3Config fields (rope_theta, ...)."""
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=context,
        tie_word_embeddings=spec.tie_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **extra,
    )


def new_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM sized by `spec`, deterministic in `seed`."""
    config = qwen3_config(spec, tokenizer, len(tokenizer), 512)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def save_model(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save model and tokenizer side by side, so the dir loads like a hub model with either Auto class."""
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its new class name; the old alias also loads under transformers 4 (e.g. beside vLLM)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def sft_batches(tokenizer: PreTrainedTokenizerFast, problems: list[dict]) -> list[tuple[list[int], int]]:
    """Each problem as (prompt + solution + eos token ids, prompt length); the loss covers only what follows."""
    out = []
    for p in problems:
        prompt = tokenizer(chat_prompt(tokenizer, p["problem"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(p["solution"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append((prompt + answer, len(prompt)))
    return out


def _collate(examples: list[tuple[list[int], int | list[bool]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Pad (ids, what is scored) pairs: a prompt length (every later token is scored) or a per-token bool mask."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)  # [B, T]
    labels = torch.full((len(examples), width), -100)  # [B, T]; -100 = not scored
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for i, (ids, scored) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        keep = torch.arange(len(ids)) >= scored if isinstance(scored, int) else torch.tensor(scored, dtype=torch.bool)
        labels[i, : len(ids)] = torch.where(keep, torch.tensor(ids), -100)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def sft(
    model: Qwen3ForCausalLM,
    data: list[tuple[list[int], int | list[bool]]],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] = print,
    name: str = "sft",
    check_every: int = 0,
    check: Callable[[], bool] | None = None,
) -> int:
    """Minimise the mean cross-entropy of the response tokens (AdamW, warmup + cosine); return the steps taken.

    Each example is (token ids, prompt length) or (token ids, a bool per token saying which are trained on).

    When `check` is given it runs every `check_every` steps and training stops at the first True, which is how
    the student is stopped as soon as it has learned its misreading.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed)
    order: list[int] = []
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        input_ids, labels, mask = _collate(batch, pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps:
            log(f"[{name}] step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if check is not None and check_every and step % check_every == 0:
            stop = check()
            model.train()
            if stop:
                return step
    return steps


@torch.no_grad()
def toy_accuracy(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[dict],
    max_new_tokens: int = 48,
    batch_size: int = 100,
) -> float:
    """Fraction of `problems` whose greedy completion `grade`s correct against `answer`."""
    engine = HFEngine(model, tokenizer, batch_size)
    prompts = [tokenizer(chat_prompt(tokenizer, p["problem"]), add_special_tokens=False)["input_ids"] for p in problems]
    responses = engine.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens)).tokens
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return sum(grade(t, p["answer"]).correct for t, p in zip(texts, problems, strict=True)) / max(1, len(problems))
