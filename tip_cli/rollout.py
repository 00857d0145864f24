"""Rollout engines (the student sampling its own responses) and packing rollouts into a training batch.

An engine has `generate(prompts, sampling) -> Generation` (response token ids and, on request, the log-prob of each
sampled token), `sync_weights(model)` (push the trainer's student into the engine after an optimizer step), and
`sleep()` / `wake()` (free the engine's memory during the training phase). `hf` generates with the training module
itself; `vllm` (tip_cli.vllm_engine) runs an offline vLLM engine in the trainer process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from tip_cli.config import ConfigError, RolloutConfig


@dataclass(frozen=True)
class Sampling:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()  # extra tokens that end a response (EOS always does); kept in the output
    seed: int | None = None  # vLLM: request i samples with seed + i; HF: the torch RNG, seeded by the trainer
    logprobs: bool = False  # also return each sampled token's log-prob under the sampling distribution


@dataclass
class Generation:
    """`sampling.n` responses per prompt, grouped by prompt: [p0s0, p0s1, ..., p1s0, ...]."""

    tokens: list[list[int]]  # response token ids, ending with the stop token when one was produced
    # log p(token) under the distribution it was sampled from, softmax(logits / T) cut by top_p / top_k (the
    # model's own log-softmax when greedy), per token
    logprobs: list[list[float]] | None = None


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ids [B, T] and a boolean attention mask [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids, mask


def trim_at_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    """Keep tokens up to and including the first end-of-sequence token."""
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[: i + 1]
    return row


def eos_ids(model_eos: int | list[int] | None, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's EOS plus the generation config's (Qwen-style chat models end turns with <|im_end|>)."""
    extra = model_eos if isinstance(model_eos, list) else [] if model_eos is None else [model_eos]
    return {i for i in (tokenizer.eos_token_id, *extra) if i is not None}


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence (prompt + response) the model's positions cover, from its config; None if unknown."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def capped_new_tokens(max_new_tokens: int, prompt_len: int, context: int | None) -> int:
    """max_new_tokens, cut to what fits after a prompt of prompt_len tokens in a context of `context` tokens."""
    if context is None:
        return max_new_tokens
    if prompt_len >= context:
        raise ValueError(f"a prompt of {prompt_len} tokens fills the model's whole context of {context} tokens: "
                         "nothing can be generated; shorten the prompt (data or benchmark prompt_template)")
    return min(max_new_tokens, context - prompt_len)


class HFEngine:
    """Batched `generate` (KV cache, left padding) on the live student module, so weight sync is a no-op."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = eos_ids(model.generation_config.eos_token_id, tokenizer)
        self._told_cap = False  # the cap to the model's context is reported once per engine

    def generation_config(self, sampling: Sampling) -> GenerationConfig:
        """The whole generation config, from tip's settings alone: softmax(logits / T) cut by top_p / top_k, or
        greedy at T = 0. Nothing of the checkpoint's generation_config.json applies (no repetition_penalty,
        no_repeat_ngram_size, min_length, ...), so the rollouts are samples of the student itself; only its EOS ids
        are read (they end a turn)."""
        sample = sampling.temperature > 0
        return GenerationConfig(
            do_sample=sample,
            temperature=sampling.temperature if sample else 1.0,
            top_p=sampling.top_p if sample else 1.0,
            top_k=sampling.top_k if sample else 0,  # 0 = off (transformers' own default would be 50)
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids | set(sampling.stop_token_ids)),
            return_dict_in_generate=True,
            output_scores=sampling.logprobs,
        )

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, on_batch: Callable[[int], None] | None = None
    ) -> Generation:
        was_training = self.model.training
        self.model.eval()
        config = self.generation_config(sampling)
        stops = set(config.eos_token_id)
        per_call = max(1, self.batch_size // sampling.n)
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        # generate() fills every field left unset from model.generation_config: a neutral one in its place for the call
        own, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            for start in range(0, len(prompts), per_call):
                ids, mask = left_pad(prompts[start : start + per_call], self.tokenizer.pad_token_id)
                context = context_length(self.model)
                max_new = capped_new_tokens(sampling.max_new_tokens, ids.shape[1], context)
                if max_new < sampling.max_new_tokens and not self._told_cap:  # past it, positions are undefined
                    print(f"note: max_new_tokens={sampling.max_new_tokens} capped at {max_new}: the model's context "
                          f"is {context} tokens and the longest prompt has {ids.shape[1]}", file=sys.stderr)
                    self._told_cap = True
                config.max_new_tokens = max_new
                gen = self.model.generate(
                    input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                    generation_config=config,
                )
                new = gen.sequences[:, ids.shape[1]:]  # [b * n, new]
                rows = [trim_at_eos(row, stops) for row in new.tolist()]
                tokens.extend(rows)
                if sampling.logprobs:  # the scores the sampler drew from: logits / T, -inf outside top_p / top_k
                    dist = torch.stack(gen.scores, 1).float().log_softmax(-1)  # [b * n, new, V]
                    picked = dist.gather(-1, new[:, : dist.shape[1], None]).squeeze(-1)  # [b * n, new]
                    logprobs.extend(picked[i, : len(r)].tolist() for i, r in enumerate(rows))
                if on_batch:
                    on_batch(len(tokens))
        finally:
            self.model.generation_config = own
            self.model.train(was_training)
        return Generation(tokens, logprobs if sampling.logprobs else None)

    def sync_weights(self, model: PreTrainedModel) -> None:
        """The engine generates with the training module itself: nothing to copy."""

    def sleep(self) -> None:
        """Nothing to free: the engine owns no memory of its own."""

    def wake(self) -> None:
        """Nothing to restore."""


def make_engine(
    cfg: RolloutConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_path: str, seed: int = 0,
    dtype: torch.dtype | None = None,
):
    """The rollout engine `cfg.engine` names, generating from `model` (whose weights live at `model_path`); a vLLM
    engine computes in `dtype` (default: the model's)."""
    if cfg.engine == "hf":
        return HFEngine(model, tokenizer, cfg.batch_size)
    if cfg.engine == "vllm":
        from tip_cli.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, tokenizer, cfg.vllm, dtype or model.dtype, seed,
                          eos=model.generation_config.eos_token_id)
    raise ConfigError(f"rollout.engine={cfg.engine!r} is not valid; expected one of: hf, vllm")


@dataclass
class Batch:
    """Prompt + response sequences, right-padded, and which positions predict a response token."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] bool
    target_mask: torch.Tensor  # [B, T] bool: position t predicts response token t + 1

    @property
    def num_tokens(self) -> int:
        return int(self.target_mask.sum())

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.target_mask[start:stop])

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """One row per (prompt, response) pair; the loss positions are those that predict a response token."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.bool)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, : len(p) + len(r)] = True
        target[i, len(p) - 1 : len(p) + len(r) - 1] = True
    return Batch(ids, attn, target)
