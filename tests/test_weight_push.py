"""The student's weights for `vllm serve` replicas (tip_cli.rollout.weights): the weight file and its checks, the
tip_file engine's registration, and the NCCL path's logic with vLLM's trainer engine faked (no GPU here). Pushes to a
real replica are in test_rollout_server.py, with every other test of the one student replica."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tip_cli.config.schema import ConfigError, RolloutConfig
from tip_cli.rollout import weights
from tip_cli.rollout.vllm_plugin import check_file, file_version, register
from tip_cli.rollout.weights import WeightPusher, WeightPushError, write_weights


def _cfg(urls, **kw) -> RolloutConfig:
    return RolloutConfig(engine="vllm_server", url=urls, **{"retries": 1, "backoff_s": 0.01, "timeout_s": 60.0, **kw})


def _student(micro, noise: float, seed: int):
    """The micro student with N(0, noise^2) added to every parameter."""
    model = AutoModelForCausalLM.from_pretrained(micro["student"], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model


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
