"""The teacher on its own server: top-K prompt log-probs from running `vllm serve` replicas (teacher.backend=vllm_server).

Each scored sequence goes to a replica's OpenAI-compatible `/v1/completions` as token ids (never re-tokenised
text) with `prompt_logprobs=K` and one new token; entry t + 1 of the returned prompt log-probs holds the teacher's
top-K next-token ids and log-probs after token t, the same numbers `VLLMTeacher.topk_logprobs` reads from an
in-process engine, so the K + 1-bucket divergence and loss (`TopKTeacher`) are unchanged. The answer carries each
candidate's decoded token too (~1.3 kB of JSON per position; /v1/completions has no switch to leave them out of
prompt_logprobs), so it is scanned as bytes into arrays (`tip_cli.teacher.topk`), not decoded. Sequences are spread
round-robin over the replicas, `concurrency` requests in flight per replica (vLLM batches them). A failed request
is retried on the next replica after a doubling backoff; when every attempt fails, the run stops with a message
naming the URL and the last checkpoint (a rerun of the same command resumes from it).

At start-up `connect` checks each replica: reachable, serving the named model, the same tokenizer as the student
(a probe text's token ids from the server's `/tokenize`), the same vocabulary size (the server accepts the
last id of the student's vocabulary, tokens or model rows whichever is larger, and refuses the next one), and that it accepts `prompt_logprobs=K`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tip_cli.config.schema import ConfigError, TeacherConfig
from tip_cli.errors import UserError
from tip_cli.servers import (
    PROBE_TEXT,
    HTTPRefused,
    check_tokenizer,
    pick_model,
    request,
    resume_hint,
    served_models,
    with_retries,
)
from tip_cli.teacher.topk import json_rows, targets

START_HINT = "start it with `vllm serve MODEL --port PORT --max-logprobs K` (README: A teacher on its own server)"
WHAT = "teacher server"


class TeacherServerError(UserError, ConnectionError):
    """The teacher server stopped answering mid-run; the message names the URL and the checkpoint to resume from."""


class ServerTeacher:
    """Top-K teacher log-probs from `vllm serve` replicas; same interface as `VLLMTeacher`."""

    def __init__(self, cfg: TeacherConfig, model: str, vocab: int, run_dir: Path | None = None):
        self.cfg, self.urls, self.model, self.topk, self.vocab = cfg, list(cfg.url), model, cfg.topk, vocab
        self.run_dir = run_dir
        self._ahead: dict[tuple, Future] = {}  # sequences scored ahead (prefetch), by (ids, positions)
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def connect(
        cls, cfg: TeacherConfig, tokenizer: PreTrainedTokenizerBase, vocab: int, run_dir: Path | None = None
    ) -> ServerTeacher:
        """Check every replica against the student's tokenizer (raise ConfigError naming what differs); the client."""
        cards = {url: served_models(url, cfg.timeout_s, WHAT, START_HINT) for url in cfg.url}
        model = pick_model(cards, cfg.model, WHAT, "teacher.model")
        teacher = cls(cfg, model, vocab, run_dir)
        for url in cfg.url:
            check_tokenizer(url, model, tokenizer, vocab, cfg.timeout_s, WHAT, START_HINT)
            teacher._check_topk(url, tokenizer)
        return teacher

    def _check_topk(self, url: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """One scored probe: the server accepts prompt_logprobs=K and its ids lie in the shared vocabulary."""
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        try:
            self._score(url, ids, [len(ids) - 2])
        except HTTPRefused as err:
            raise ConfigError(f"teacher server {url} refused teacher.topk={self.topk} prompt log-probs ({err}); "
                              f"restart it with --max-logprobs {self.topk} or lower teacher.topk") from err
        except ConfigError:  # token ids outside the shared vocabulary
            raise
        except (OSError, ValueError) as err:  # no answer, or no prompt log-probs in it
            raise ConfigError(f"teacher server {url} gave no prompt log-probs ({err!r}); {START_HINT}") from err

    def _score(self, url: str, seq: list[int], positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sequence's top-K candidates at `positions` from the replica at `url` ([R, M] ids, log-probs and the
        rows' widths, for `topk.best_k`), read from the answer's bytes (~1.3 kB of JSON per position)."""
        body = {"model": self.model, "prompt": seq, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.topk, "add_special_tokens": False}
        rows = json_rows(request(url + "/v1/completions", body, self.cfg.timeout_s, raw=True), len(seq), positions)
        if rows[0].size and (top := int(rows[0].max())) >= self.vocab:
            raise ConfigError(f"teacher server {url} returned token id {top}, outside the "
                              f"{self.vocab} ids teacher and student share")
        return rows

    def _score_with_retries(self, i: int, seq: list[int], positions: list[int]):
        """Sequence i on replica i mod R; try a on replica (i + a) mod R after a doubling backoff (servers.backoff)."""
        def on(a: int) -> str:
            return self.urls[(i + a) % len(self.urls)]

        try:  # ConfigError (token ids outside the shared vocabulary) is raised as it is
            return with_retries(lambda a: self._score(on(a), seq, positions), self.cfg.retries, self.cfg.backoff_s,
                                retry_on=(OSError, ValueError), fatal=(HTTPRefused, ConfigError))
        except HTTPRefused as failure:  # the server answered and refused: a retry would be refused too
            raise TeacherServerError(f"teacher server refused a request: {failure}") from failure
        except ConfigError:
            raise
        except (OSError, ValueError) as err:  # down, timed out, or a truncated answer, at every try
            raise TeacherServerError(
                f"teacher server {on(self.cfg.retries)} did not answer after {self.cfg.retries + 1} attempts "
                f"(last error: {err}); training stopped: {resume_hint(self.run_dir)}"
            ) from err

    def _submit(self, i: int, seq: list[int], positions: list[int]) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=len(self.urls) * self.cfg.concurrency)
        return self._pool.submit(self._score_with_retries, i, seq, positions)

    def prefetch(self, seq: list[int], positions: list[int]) -> None:
        """Start scoring a sequence now (a rollout that has finished while others still generate); the
        `topk_logprobs` call that asks for it takes the answer."""
        self._ahead[(tuple(seq), tuple(positions))] = self._submit(len(self._ahead), seq, positions)

    @torch.no_grad()
    def topk_logprobs(self, sequences: list[list[int]], positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sequence s and each position t in positions[s] (t predicts token t + 1), the teacher's top-K
        token ids and log-probs of the next token: ([N, K] int64, [N, K] float32), rows in the given order.
        Sequences prefetched earlier are not scored again."""
        futures = [self._ahead.pop((tuple(s), tuple(p)), None) or self._submit(i, s, p)
                   for i, (s, p) in enumerate(zip(sequences, positions, strict=True))]
        return targets([f.result() for f in futures], self.topk)

