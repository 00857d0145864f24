"""The teacher scored by an in-process vLLM engine (teacher.backend=vllm_topk): its top-K next-token log-probs."""

from __future__ import annotations

import torch

from tip_cli.config.schema import VLLMConfig
from tip_cli.rollout.vllm import engine_kwargs, import_vllm


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

        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=self.topk, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        ids, lps = [], []
        for out, pos in zip(outputs, positions, strict=True):
            for t in pos:
                entries = out.prompt_logprobs[t + 1]  # the distribution of token t + 1 (plus that token itself)
                best = sorted(entries.items(), key=lambda kv: kv[1].logprob, reverse=True)[: self.topk]
                ids.append([tok for tok, _ in best])
                lps.append([lp.logprob for _, lp in best])
        return torch.tensor(ids, dtype=torch.long), torch.tensor(lps, dtype=torch.float32)
