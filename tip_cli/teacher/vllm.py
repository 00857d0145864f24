"""The teacher scored by an in-process vLLM engine (teacher.backend=vllm_topk): its top-K next-token log-probs."""

from __future__ import annotations

import torch

from tip_cli.config.schema import VLLMConfig
from tip_cli.rollout.vllm import engine_kwargs, import_vllm
from tip_cli.teacher.topk import flat_rows, targets


class VLLMTeacher:
    """The teacher served by vLLM: top-K prompt log-probs at every position of the scored sequences."""

    def __init__(self, model_path: str, cfg: VLLMConfig, dtype: torch.dtype, topk: int, seed: int = 0):
        vllm = import_vllm()
        self._vllm, self.topk = vllm, topk
        # never asleep: it scores during the training step; a sleep-mode allocator is the rollout engine's
        self.llm = vllm.LLM(**engine_kwargs(model_path, cfg, dtype, seed, max_logprobs=topk, sleep=False))

    @torch.no_grad()
    def topk_logprobs(self, sequences: list[list[int]], positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sequence s and each position t in positions[s] (t predicts token t + 1), the teacher's top-K
        token ids and log-probs of the next token: ([N, K] int64, [N, K] float32), rows in the given order."""
        from vllm.inputs import TokensPrompt

        # flat_logprobs: each sequence's log-probs as a few flat lists rather than a dict of objects per position
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=self.topk, detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        parts = [flat_rows(out.prompt_logprobs, pos) for out, pos in zip(outputs, positions, strict=True)]
        return targets(parts, self.topk)
