"""The student on its own servers: rollouts from running `vllm serve` replicas (rollout.engine=vllm_server).

Each prompt goes to a replica's OpenAI-compatible `/v1/completions` as token ids with every sampling field set from
tip's settings (softmax(logits / T) cut by top_p / top_k, no penalties: the server would otherwise apply the
checkpoint's generation_config.json) and a seed of its own, derived from the call's seed and the prompt's place,
so a call's responses follow from its prompts and seed; the answer's token ids come back as they are
(`return_token_ids`), never re-tokenised text. Prompts are spread round-robin over the live replicas, `concurrency`
requests in flight per replica. A replica that stops answering mid-generation is dropped and its prompts go to the
others; with none left the run stops, naming the last checkpoint (a rerun of the same command resumes from it).

The replicas decode with their own copy of the student (`own_weights`): after each optimizer update `sync_weights`
pushes the new weights to every live replica (tip_cli.rollout.weights: a file every replica reads, or vLLM's NCCL
engine) as version v + 1 (v counts optimizer steps), and each replica reports the version it serves (`/weight_info`), which every response
records (`Generation.versions`). At start-up `connect` checks each replica as the teacher's client does
(tip_cli.servers: the served model, the tokenizer's ids on a probe, the vocabulary) and pushes the trainer's student
(version 0, or a resumed run's checkpoint step), so a resumed run rolls out from its checkpoint, not from what the
server loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tip_cli.config.schema import ConfigError, RolloutConfig
from tip_cli.errors import DataError, UserError
from tip_cli.rollout.batch import Generation, Sampling, eos_ids, trim_at_eos
from tip_cli.seeds import derive_seed
from tip_cli.servers import (
    HTTPRefused,
    backoff,
    check_tokenizer,
    pick_model,
    request,
    resume_hint,
    served_models,
)

WHAT = "student server"
START_HINT = ("start it with `VLLM_SERVER_DEV_MODE=1 python -m tip_cli.rollout.serve --model STUDENT --port PORT` "
              "(docs: Deployment)")


class RolloutServerError(UserError, ConnectionError):
    """No student replica is left to generate on, or one refused a request; the message names the replicas and the
    checkpoint to resume from."""


class ServerEngine:
    """Rollouts from `vllm serve` replicas of the student; same interface as `VLLMEngine`."""

    own_weights = True  # the replicas decode with their copy of the student, pushed after each update

    def __init__(self, cfg: RolloutConfig, model: str, urls: list[str], context: dict[str, int], eos: set[int],
                 pusher=None, run_dir: Path | None = None):
        self.cfg, self.model, self.context, self.eos_ids = cfg, model, context, eos
        self.pusher, self.run_dir = pusher, run_dir
        self._urls = list(urls)  # the live replicas, where no pusher holds them
        self.version = 0  # the weight version every live replica serves: the optimizer steps behind its weights
        self.on_done: Callable[[int, list[int], list[list[int]]], None] | None = None  # per finished prompt

    @property
    def urls(self) -> list[str]:
        """The live replicas, one list for prompts and weights: the pusher's (a replica it gives up on leaves it, and
        one dropped here gets no more weights), or the engine's own without a pusher."""
        return self.pusher.urls if self.pusher is not None else self._urls

    @classmethod
    def connect(cls, cfg: RolloutConfig, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, vocab: int,
                run_dir: Path, dtype=None, pusher=None, version: int = 0) -> ServerEngine:
        """Check every replica against the student's tokenizer (ConfigError naming what differs), set up their
        weight transfer, and push the student's weights (in `dtype`) as `version` (the optimizer steps behind
        them: a resumed run's checkpoint step) through `pusher` (tip_cli.rollout.weights.WeightPusher, built from
        `cfg` when None)."""
        cards = {url: served_models(url, cfg.timeout_s, WHAT, START_HINT) for url in cfg.url}
        model = pick_model(cards, cfg.model, WHAT, "rollout.model")
        for url in cfg.url:
            check_tokenizer(url, model, tokenizer, vocab, cfg.timeout_s, WHAT, START_HINT)
        context = {url: int(cards[url][model].get("max_model_len") or 0) for url in cfg.url}
        if pusher is None:
            from tip_cli.rollout.weights import WeightPusher

            pusher = WeightPusher(cfg, run_dir, dtype)
        pusher.connect(student)
        engine = cls(cfg, model, cfg.url, context, eos_ids(student.generation_config.eos_token_id, tokenizer),
                     pusher, run_dir)
        engine.sync_weights(student, version=version)
        return engine

    def _body(self, prompt: list[int], sampling: Sampling, seed: int | None, max_len: int) -> dict:
        """Every sampling field from tip's settings; max_tokens cut to what fits the replica's context."""
        room = max_len - len(prompt) if max_len else sampling.max_new_tokens
        if room < 1:
            raise DataError(f"a prompt of {len(prompt)} tokens fills the student server's whole context of {max_len} "
                            "tokens: nothing can be generated; shorten the prompt or serve with a larger "
                            "--max-model-len")
        sample = sampling.temperature > 0
        return {
            "model": self.model, "prompt": prompt, "n": sampling.n,
            "temperature": sampling.temperature if sample else 0.0, "top_p": sampling.top_p if sample else 1.0,
            "top_k": sampling.top_k if sample and sampling.top_k > 0 else -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "max_tokens": min(sampling.max_new_tokens, room), "seed": seed,
            "stop_token_ids": sorted(self.eos_ids | set(sampling.stop_token_ids)), "ignore_eos": False,
            "return_token_ids": True, "skip_special_tokens": False, "add_special_tokens": False,
            "logprobs": 0 if sampling.logprobs else None,
        }

    def _complete(self, url: str, prompt: list[int], sampling: Sampling, seed: int | None) -> tuple[list, list, int]:
        """One prompt's `n` responses from the replica at `url`: token ids, their log-probs, and the version the
        replica served after answering (a push never lands mid-request: pushes wait for generation to finish)."""
        answer = request(url + "/v1/completions", self._body(prompt, sampling, seed, self.context.get(url, 0)),
                         self.cfg.timeout_s)
        stops = self.eos_ids | set(sampling.stop_token_ids)
        tokens, logprobs = [], []
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            row = trim_at_eos(list(choice["token_ids"]), stops)
            tokens.append(row)
            if sampling.logprobs:
                logprobs.append(list(choice["logprobs"]["token_logprobs"][: len(row)]))
        return tokens, logprobs, self.version

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 on_batch: Callable[[int], None] | None = None) -> Generation:
        """`sampling.n` responses per prompt, grouped by prompt. Prompt i is asked of replica i mod R; a failed
        request goes to the next live replica after a doubling backoff, and a replica that fails rollout.retries + 1
        times is dropped (one line)."""
        seeds = [None if sampling.seed is None else derive_seed(sampling.seed, i) for i in range(len(prompts))]
        results: dict[int, tuple[list, list, int]] = {}
        pending = list(range(len(prompts)))
        attempts = [0] * len(prompts)
        failures = dict.fromkeys(self.urls, 0)
        with ThreadPoolExecutor(max_workers=max(1, len(self.urls)) * self.cfg.concurrency) as pool:
            running = {}
            while pending or running:
                if not self.urls:
                    raise RolloutServerError(f"no student server is left to generate on (rollout.url={self.cfg.url}); "
                                             f"training stopped: {resume_hint(self.run_dir)}")
                for i in pending:
                    url = self.urls[(i + attempts[i]) % len(self.urls)]
                    running[pool.submit(self._complete, url, prompts[i], sampling, seeds[i])] = (i, url)
                pending = []
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, url = running.pop(fut)
                    try:
                        results[i] = fut.result()
                    except HTTPRefused as err:  # the replica answered and refused: another would refuse too
                        raise RolloutServerError(f"student server {url} refused a request: {err}") from err
                    except (OSError, ValueError, KeyError) as err:  # down, timed out, or a truncated answer
                        attempts[i] += 1
                        failures[url] = failures.get(url, 0) + 1
                        if failures[url] > self.cfg.retries:
                            self.drop(url, f"no answer after {failures[url]} attempts (last error: {err})")
                        time.sleep(backoff(self.cfg.backoff_s, failures[url]))
                        pending.append(i)
                        continue
                    if self.on_done is not None:
                        self.on_done(i, prompts[i], results[i][0])
        tokens = [row for i in range(len(prompts)) for row in results[i][0]]
        logprobs = [row for i in range(len(prompts)) for row in results[i][1]] if sampling.logprobs else None
        versions = [results[i][2] for i in range(len(prompts)) for _ in results[i][0]]
        if on_batch:
            on_batch(len(tokens))
        return Generation(tokens, logprobs, versions)

    def check_prompts(self, lengths: list[int], max_new_tokens: int) -> None:
        """ConfigError, before the first step, when the longest prompt leaves a replica's context no room to answer
        (a shorter answer than max_new_tokens is only cut, as the other engines cut it)."""
        longest = max(lengths, default=0)
        for url, n in self.context.items():
            if n and longest >= n:
                raise ConfigError(f"student server {url} serves a context of {n} tokens and the longest training prompt "
                                  f"has {longest}: nothing could be generated for it; restart the server with "
                                  f"--max-model-len {longest + max_new_tokens} or more, or shorten the prompts")

    def drop(self, url: str, why: str) -> None:
        """Take a replica out of the pool (it gets no more prompts, nor weights); one line says so."""
        if url in self.urls:
            self.urls.remove(url)
            print(f"student server {url} dropped: {why}; {len(self.urls)} left", flush=True)

    def sync_weights(self, model: PreTrainedModel, version: int | None = None) -> None:
        """Push the student's weights to every live replica as the next version (or `version`); a replica the
        pusher gives up on is dropped or stops the run (rollout.on_push_failure)."""
        version = self.version + 1 if version is None else version
        self.pusher.push(model, version)  # the replicas it gives up on leave self.urls
        self.version = version

    def sleep(self) -> None:  # the replicas' memory is their own
        pass

    def wake(self) -> None:
        pass

