"""Rollout engines (the student sampling its own responses) and packing rollouts into a training batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tip_cli.config import ConfigError


@dataclass(frozen=True)
class Sampling:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128


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


class HFEngine:
    """Batched `generate` (KV cache, left padding) on the live student module, so weight sync is a no-op."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = model.generation_config.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, on_batch: Callable[[int], None] | None = None
    ) -> list[list[int]]:
        """Responses for every prompt, `sampling.n` each, grouped by prompt: [p0s0, p0s1, ..., p1s0, ...]."""
        was_training = self.model.training
        self.model.eval()
        kwargs = {"do_sample": False}
        if sampling.temperature > 0:
            kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        per_call = max(1, self.batch_size // sampling.n)
        out: list[list[int]] = []
        for start in range(0, len(prompts), per_call):
            ids, mask = left_pad(prompts[start : start + per_call], self.tokenizer.pad_token_id)
            gen = self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.n,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self.eos_ids),
                **kwargs,
            )  # [b * n, T + new]
            out.extend(trim_at_eos(row, self.eos_ids) for row in gen[:, ids.shape[1]:].tolist())
            if on_batch:
                on_batch(len(out))
        self.model.train(was_training)
        return out

    def sync_weights(self, model: PreTrainedModel) -> None:
        """The engine generates with the training module itself: nothing to copy."""

    def sleep(self) -> None:
        """Nothing to free: the engine owns no memory of its own."""

    def wake(self) -> None:
        """Nothing to restore."""


def make_engine(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> HFEngine:
    if name == "hf":
        return HFEngine(model, tokenizer, batch_size)
    raise ConfigError(f"rollout.engine={name!r} is not available in this version; use rollout.engine=hf")


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
