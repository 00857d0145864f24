"""What the clients of running `vllm serve` replicas share (the teacher's, tip_cli.teacher.server, and the student's,
tip_cli.rollout.server, and the weight pusher): JSON over HTTP, tries repeated after a doubling backoff
(`with_retries`), the wait for a server just started (`wait_serving`), and the start-up checks that a replica is
the model the trainer expects.

`served_models` and `pick_model` find the served model (the one a replica lists, or the configured name) and
`check_tokenizer` compares the replica's tokenizer with the student's: a probe text's token ids from the server's
`/tokenize`, and the size of the vocabulary (the server accepts the last id of the shared vocabulary, tokens or model
rows whichever is larger, and refuses the next one). Every failure is a ConfigError naming the replica, as `what` calls it ("teacher server").
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tip_cli.checkpoint import latest_checkpoint
from tip_cli.config.schema import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")

# Chat markup, digits, punctuation, accents, CJK and an emoji: pieces where two tokenizers tend to disagree.
PROBE_TEXT = "What is 12 + 345? Think step by step.\n\tThe answer is 357. Naïve café, 東京, 🙂 {x_1}^2 = ½!"


class HTTPRefused(ConnectionError):
    """A request that reached the server and was refused (4xx): retrying will not help."""


def request(url: str, body: dict | None, timeout: float, raw: bool = False) -> dict | bytes:
    """GET (body None) or POST JSON to `url`; the decoded JSON answer, or its bytes when `raw`. Raises HTTPRefused
    on a 4xx answer, ConnectionError on a 5xx one, OSError when there is no answer (HTTPRefused is a
    ConnectionError, so a caller that retries any failure catches both)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = resp.read()
            return answer if raw else json.loads(answer)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:  # vLLM's error answer: {"error": {"message": ...}}
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        detail = str(detail)[:500]
        if 400 <= err.code < 500:
            raise HTTPRefused(f"HTTP {err.code} from {url}: {detail}") from err
        raise ConnectionError(f"HTTP {err.code} from {url}: {detail}") from err


def backoff(base_s: float, failures: int) -> float:
    """Seconds to wait before the next try after `failures` failed ones: `base_s`, doubling, at most 64 * base_s."""
    return base_s * 2 ** min(failures - 1, 6)


def with_retries(attempt: Callable[[int], T], retries: int, backoff_s: float,
                 retry_on: tuple[type[Exception], ...] = (OSError, ValueError, KeyError),
                 fatal: tuple[type[Exception], ...] = (HTTPRefused,)) -> T:
    """attempt(a) for a = 0, 1, ... retries until one returns, waiting backoff(backoff_s, a) before try a > 0; the
    last try's error is raised. An error in `fatal` (a refusal, which a retry would get again) or outside `retry_on`
    is raised at once."""
    for a in range(retries):
        try:
            return attempt(a)
        except fatal:
            raise
        except retry_on:
            time.sleep(backoff(backoff_s, a + 1))
    return attempt(retries)


def wait_serving(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> float:
    """Seconds until a server that `proc` started answers `url`/v1/models; RuntimeError with the end of its `log`
    when it exits first or does not answer within timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}; the end of {log}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return time.monotonic() - start
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the server for {url} did not answer within {timeout_s:.0f} s; the end of {log}:\n"
                       f"{log.read_text(errors='replace')[-4000:]}")


def served_models(url: str, timeout: float, what: str, hint: str) -> dict[str, dict]:
    """The models a replica serves (`/v1/models`: name -> card, with max_model_len); ConfigError when it does not
    answer."""
    try:
        return {m["id"]: m for m in request(url + "/v1/models", None, timeout)["data"]}
    except (OSError, ValueError, KeyError, HTTPRefused) as err:
        raise ConfigError(f"{what} {url} is not reachable or not an OpenAI-compatible server ({err}); {hint}") from err


def pick_model(cards: dict[str, dict[str, dict]], model: str | None, what: str, key: str) -> str:
    """The served model every replica must have: `model` when set (the config's `key`), else the one model all of
    them list."""
    if model is None:
        only = {next(iter(ids)) for ids in cards.values() if len(ids) == 1}
        if len(only) != 1 or any(len(ids) != 1 for ids in cards.values()):
            raise ConfigError(f"set {key}: the {what}s serve {({u: list(ids) for u, ids in cards.items()})}, not "
                              "one single model")
        model = only.pop()
    for url, ids in cards.items():
        if model not in ids:
            raise ConfigError(f"{what} {url} serves {list(ids)}, not {key}={model!r}; set {key} to one of them or "
                              "serve that model")
    return model


def post(url: str, path: str, model: str, body: dict, timeout: float, what: str, hint: str) -> dict:
    """POST to a replica during the start-up checks: ConfigError when it does not answer, HTTPRefused on a 4xx."""
    try:
        return request(url + path, {"model": model, **body}, timeout)
    except HTTPRefused:
        raise
    except (OSError, ValueError) as err:  # URLError, timeouts and refused connections are OSErrors
        raise ConfigError(f"{what} {url} is not reachable ({err}); {hint}") from err


def check_tokenizer(url: str, model: str, tokenizer: PreTrainedTokenizerBase, vocab: int, timeout: float,
                    what: str, hint: str) -> None:
    """The probe's ids and the size of the vocabulary must be the student's; ConfigError naming what differs."""
    probe = PROBE_TEXT
    if tokenizer.chat_template:  # the special tokens of the chat markup, as text the server must parse alike
        probe = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_TEXT}], tokenize=False,
                                              add_generation_prompt=True)
    ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
    theirs = post(url, "/tokenize", model, {"prompt": probe, "add_special_tokens": False}, timeout, what, hint)["tokens"]
    if theirs != ours:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
        raise ConfigError(
            f"{what} {url} ({model}) tokenizes differently from the student: the probe text gives {len(theirs)} ids "
            f"there and {len(ours)} here, first difference at position {at} (server {theirs[at:at + 5]} vs student "
            f"{ours[at:at + 5]}); serve a model that shares the student's tokenizer"
        )
    # vLLM refuses a prompt id past both its tokenizer's last id and its model's last row (Qwen3's 151,936 rows
    # outnumber its 151,669 tokens), so the probe sits at the last id of the pair's shared vocabulary
    size = max(len(tokenizer), vocab)
    last = size - 1
    for token, should_pass in ((last, True), (last + 1, False)):
        try:
            post(url, "/v1/completions", model, {"prompt": [token], "max_tokens": 1}, timeout, what, hint)
            passed = True
        except HTTPRefused as err:
            if "vocabulary" not in str(err):
                raise ConfigError(f"{what} {url} refused a one-token probe: {err}") from err
            passed = False
        if passed != should_pass:
            raise ConfigError(
                f"{what} {url} ({model}) has a {'smaller' if should_pass else 'larger'} vocabulary than the "
                f"student's {size} ids: it {'refuses' if should_pass else 'accepts'} token id {token}; serve a "
                "model that shares the student's tokenizer"
            )


def resume_hint(run_dir: Path | None, when: str = "once the server is back") -> str:
    """Where a stopped run resumes from: its last checkpoint, named, or that none was saved yet."""
    ckpt = latest_checkpoint(run_dir) if run_dir is not None else None
    if ckpt is None:
        return "no checkpoint was saved yet"
    return f"the last checkpoint is {ckpt.path} (step {ckpt.step}); run the same command again to resume from it {when}"
