"""What every rollout engine shares: the sampling settings, the generated tokens, and packing rollouts into a
training batch (one right-padded `Batch` whose `target_mask` marks the positions that predict a response token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()  # extra tokens that end a response (EOS always does); kept in the output
    # the one seed of a generate call: the engine's RNG is seeded with it, and every prompt and sample draws its own
    # part of that stream (None: whatever state the RNG is in); tip_cli.seeds.derive_seed gives each call its own
    seed: int | None = None
    logprobs: bool = False  # also return each sampled token's log-prob under the sampling distribution


@dataclass
class Generation:
    """`sampling.n` responses per prompt, grouped by prompt: [p0s0, p0s1, ..., p1s0, ...]."""

    tokens: list[list[int]]  # response token ids, ending with the stop token when one was produced
    # log p(token) under the distribution it was sampled from, softmax(logits / T) cut by top_p / top_k (the
    # model's own log-softmax when greedy), per token
    logprobs: list[list[float]] | None = None
    versions: list[int] | None = None  # per response, the weight version that generated it (an engine with versions)


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
        """Rows [start, stop), cut to the longest of them. Rows are right-padded and positions count from the left,
        so the columns past every row's end feed no real position under causal attention: cutting them changes no
        hidden state, and a micro-batch of short rows no longer pays for the rollout batch's longest one."""
        mask = self.attention_mask[start:stop]
        width = int((mask.any(0) * torch.arange(1, mask.shape[1] + 1, device=mask.device)).max())  # one host sync
        return Batch(self.input_ids[start:stop, :width], mask[:, :width], self.target_mask[start:stop, :width])

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))


def pack_masked(seqs: list[list[int]], predicts: list[list[bool]], pad_id: int) -> Batch:
    """One right-padded row per sequence; target_mask[b, t] = predicts[b][t], whether position t predicts a token
    the loss covers (predicts[b] has len(seqs[b]) - 1 entries). Single-turn and tool-use rollouts both pack here."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    attn = torch.zeros((len(seqs), width), dtype=torch.bool)  # [B, T]
    target = torch.zeros((len(seqs), width), dtype=torch.bool)  # [B, T]
    for b, (seq, mask) in enumerate(zip(seqs, predicts, strict=True)):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = True
        target[b, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return Batch(ids, attn, target)


def response_positions(prompt: list[int], response: list[int]) -> range:
    """The positions of prompt + response that predict a response token (position t predicts token t + 1): where a
    single-turn row's loss, and its teacher's scores, are taken."""
    return range(len(prompt) - 1, len(prompt) - 1 + len(response))


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """One row per (prompt, response) pair; the loss positions are those that predict a response token."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    spans = [response_positions(p, r) for p, r in zip(prompts, responses, strict=True)]
    return pack_masked(seqs, [[False] * span.start + [True] * len(span) for span in spans], pad_id)
