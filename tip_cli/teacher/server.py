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

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tip_cli.checkpoint import latest_checkpoint
from tip_cli.config.schema import ConfigError, TeacherConfig
from tip_cli.errors import UserError
from tip_cli.teacher.topk import json_rows, targets

# Chat markup, digits, punctuation, accents, CJK and an emoji: pieces where two tokenizers tend to disagree.
PROBE_TEXT = "What is 12 + 345? Think step by step.\n\tThe answer is 357. Naïve café, 東京, 🙂 {x_1}^2 = ½!"
START_HINT = "start it with `vllm serve MODEL --port PORT --max-logprobs K` (README: A teacher on its own server)"


class TeacherServerError(UserError, ConnectionError):
    """The teacher server stopped answering mid-run; the message names the URL and the checkpoint to resume from."""


class _HTTPFailure(Exception):
    """A request that reached the server and was refused (4xx): retrying will not help."""


def _request(url: str, body: dict | None, timeout: float, raw: bool = False) -> dict | bytes:
    """GET (body None) or POST JSON to `url`; the decoded JSON answer, or its bytes when `raw`. Raises _HTTPFailure
    on a 4xx answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = resp.read()
            return answer if raw else json.loads(answer)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        if 400 <= err.code < 500:
            raise _HTTPFailure(f"HTTP {err.code} from {url}: {detail}") from err
        raise ConnectionError(f"HTTP {err.code} from {url}: {detail}") from err


class ServerTeacher:
    """Top-K teacher log-probs from `vllm serve` replicas; same interface as `VLLMTeacher`."""

    def __init__(self, cfg: TeacherConfig, model: str, vocab: int, run_dir: Path | None = None):
        self.cfg, self.urls, self.model, self.topk, self.vocab = cfg, list(cfg.url), model, cfg.topk, vocab
        self.run_dir = run_dir

    @classmethod
    def connect(
        cls, cfg: TeacherConfig, tokenizer: PreTrainedTokenizerBase, vocab: int, run_dir: Path | None = None
    ) -> ServerTeacher:
        """Check every replica against the student's tokenizer (raise ConfigError naming what differs); the client."""
        models = {url: _served_models(url, cfg.timeout_s) for url in cfg.url}
        model = cfg.model
        if model is None:
            only = {ids[0] for ids in models.values() if len(ids) == 1}
            if len(only) != 1 or any(len(ids) != 1 for ids in models.values()):
                raise ConfigError(f"set teacher.model: the teacher servers serve {models}, not one single model")
            model = only.pop()
        for url, ids in models.items():
            if model not in ids:
                raise ConfigError(f"teacher server {url} serves {ids}, not teacher.model={model!r}; "
                                  "set teacher.model to one of them or serve that model")
        teacher = cls(cfg, model, vocab, run_dir)
        for url in cfg.url:
            teacher._check_tokenizer(url, tokenizer)
            teacher._check_topk(url, tokenizer)
        return teacher

    def _check_tokenizer(self, url: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """The probe's ids and the size of the vocabulary must be the student's."""
        timeout = self.cfg.timeout_s
        probe = PROBE_TEXT
        if tokenizer.chat_template:  # the special tokens of the chat markup, as text the server must parse alike
            probe = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_TEXT}], tokenize=False,
                                                  add_generation_prompt=True)
        ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
        theirs = self._post(url, "/tokenize", {"prompt": probe, "add_special_tokens": False}, timeout)["tokens"]
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
            raise ConfigError(
                f"teacher server {url} ({self.model}) tokenizes differently from the student: the probe text gives "
                f"{len(theirs)} ids there and {len(ours)} here, first difference at position {at} "
                f"(server {theirs[at:at + 5]} vs student {ours[at:at + 5]}); serve a teacher that shares the "
                "student's tokenizer"
            )
        # vLLM refuses a prompt id past both its tokenizer's last id and its model's last row (Qwen3's 151,936 rows
        # outnumber its 151,669 tokens), so the probe sits at the last id of the pair's shared vocabulary
        size = max(len(tokenizer), self.vocab)
        last = size - 1
        for token, should_pass in ((last, True), (last + 1, False)):
            try:
                self._post(url, "/v1/completions", {"prompt": [token], "max_tokens": 1}, timeout)
                passed = True
            except _HTTPFailure as err:
                if "vocabulary" not in str(err):
                    raise ConfigError(f"teacher server {url} refused a one-token probe: {err}") from err
                passed = False
            if passed != should_pass:
                raise ConfigError(
                    f"teacher server {url} ({self.model}) has a {'smaller' if should_pass else 'larger'} vocabulary "
                    f"than the student's {size} ids: it {'refuses' if should_pass else 'accepts'} "
                    f"token id {token}; serve a teacher that shares the student's tokenizer"
                )

    def _check_topk(self, url: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """One scored probe: the server accepts prompt_logprobs=K and its ids lie in the shared vocabulary."""
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        try:
            self._score(url, ids, [len(ids) - 2])
        except _HTTPFailure as err:
            raise ConfigError(f"teacher server {url} refused teacher.topk={self.topk} prompt log-probs ({err}); "
                              f"restart it with --max-logprobs {self.topk} or lower teacher.topk") from err
        except ConfigError:  # token ids outside the shared vocabulary
            raise
        except (OSError, ValueError) as err:  # no answer, or no prompt log-probs in it
            raise ConfigError(f"teacher server {url} gave no prompt log-probs ({err!r}); {START_HINT}") from err

    def _post(self, url: str, path: str, body: dict, timeout: float) -> dict:
        try:
            return _request(url + path, {"model": self.model, **body}, timeout)
        except (OSError, ValueError) as err:  # URLError, timeouts and refused connections are OSErrors
            raise ConfigError(f"teacher server {url} is not reachable ({err}); {START_HINT}") from err

    def _score(self, url: str, seq: list[int], positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sequence's top-K candidates at `positions` from the replica at `url` ([R, M] ids, log-probs and the
        rows' widths, for `topk.best_k`), read from the answer's bytes (~1.3 kB of JSON per position)."""
        body = {"model": self.model, "prompt": seq, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.topk, "add_special_tokens": False}
        rows = json_rows(_request(url + "/v1/completions", body, self.cfg.timeout_s, raw=True), len(seq), positions)
        if rows[0].size and (top := int(rows[0].max())) >= self.vocab:
            raise ConfigError(f"teacher server {url} returned token id {top}, outside the "
                              f"{self.vocab} ids teacher and student share")
        return rows

    def _score_with_retries(self, i: int, seq: list[int], positions: list[int]):
        """Sequence i on replica i mod R; attempt a on replica (i + a) mod R after backoff * 2^(a-1) seconds."""
        err: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            url = self.urls[(i + attempt) % len(self.urls)]
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                return self._score(url, seq, positions)
            except _HTTPFailure as failure:  # the server answered and refused: a retry would be refused too
                raise TeacherServerError(f"teacher server {url} refused a request: {failure}") from failure
            except ConfigError:  # token ids outside the shared vocabulary
                raise
            except (OSError, ValueError) as failure:  # down, timed out, or a truncated answer
                err = failure
        ckpt = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        resume = (f"the last checkpoint is {ckpt.path} (step {ckpt.step}); run the same command again to resume "
                  "from it once the server is back") if ckpt else "no checkpoint was saved yet"
        raise TeacherServerError(
            f"teacher server {url} did not answer after {self.cfg.retries + 1} attempts "
            f"(last error: {err}); training stopped: {resume}"
        ) from err

    @torch.no_grad()
    def topk_logprobs(self, sequences: list[list[int]], positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sequence s and each position t in positions[s] (t predicts token t + 1), the teacher's top-K
        token ids and log-probs of the next token: ([N, K] int64, [N, K] float32), rows in the given order."""
        pool = ThreadPoolExecutor(max_workers=len(self.urls) * self.cfg.concurrency)
        try:
            futures = [pool.submit(self._score_with_retries, i, s, p)
                       for i, (s, p) in enumerate(zip(sequences, positions, strict=True))]
            results = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return targets(results, self.topk)


def _served_models(url: str, timeout: float) -> list[str]:
    """The model names a replica serves (`/v1/models`); ConfigError when it does not answer."""
    try:
        return [m["id"] for m in _request(url + "/v1/models", None, timeout)["data"]]
    except (OSError, ValueError, KeyError, _HTTPFailure) as err:
        raise ConfigError(f"teacher server {url} is not reachable or not an OpenAI-compatible server "
                          f"({err}); {START_HINT}") from err
