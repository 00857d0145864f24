"""The `hf` rollout engine: batched `generate` on the training module itself."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tip_cli.errors import DataError, ModelError
from tip_cli.rollout.batch import Generation, Sampling, eos_ids, left_pad, trim_at_eos


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence (prompt + response) the model's positions cover, from its config; None if unknown."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def capped_new_tokens(max_new_tokens: int, prompt_len: int, context: int | None) -> int:
    """max_new_tokens, cut to what fits after a prompt of prompt_len tokens in a context of `context` tokens."""
    if context is None:
        return max_new_tokens
    if prompt_len >= context:
        raise DataError(f"a prompt of {prompt_len} tokens fills the model's whole context of {context} tokens: "
                         "nothing can be generated; shorten the prompt (data or benchmark prompt_template)")
    return min(max_new_tokens, context - prompt_len)


class NonFiniteGuard(LogitsProcessor):
    """Refuses a next-token distribution that cannot be sampled, before torch.multinomial fails on it with a
    traceback: a row with a NaN or +inf logit, or with every logit -inf (softmax gives NaN for each)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = ~torch.isfinite(scores.amax(-1))  # [rows]; the max is NaN with a NaN, +inf with one, -inf with all
        if bool(bad.any()):  # a host sync, as generate's own stopping check makes at every token
            raise ModelError("the student's next-token probabilities are not finite (NaN or inf logits), so nothing "
                             "can be sampled from it: its weights are likely non-finite; try a lower optim.lr, or an "
                             "earlier checkpoint")
        return scores


class HFEngine:
    """Batched `generate` (KV cache, left padding) on the live student module, so weight sync is a no-op."""

    own_weights = False  # decodes with the training module itself (gathered first when it is sharded)

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
        if sampling.seed is not None:  # the responses follow from (prompts, seed), whatever drew from the RNG before
            torch.manual_seed(sampling.seed)
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
                    generation_config=config, logits_processor=LogitsProcessorList([NonFiniteGuard()]),
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
