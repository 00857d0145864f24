"""The in-process vLLM engines' wiring, checked without a GPU: the engine arguments under torchrun (against vLLM's
own executor code where vLLM is installed), one sleep-mode engine per process, sleep level 2 with the weights
reloaded before waking, and seeded sampling without per-request seeds. vLLM's `LLM` is a recording fake here; the
real CPU engine runs in test_vllm.py."""

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tip_cli.config.schema import ConfigError, TeacherConfig, VLLMConfig
from tip_cli.rollout import vllm as rollout_vllm
from tip_cli.rollout.batch import Sampling
from tip_cli.seeds import derive_seed
from tip_cli.teacher import vllm as teacher_vllm

INT64 = np.iinfo(np.int64)
TORCHRUN_RANK1 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def _torchrun(monkeypatch, env):
    for key in TORCHRUN_RANK1:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_engines_under_torchrun_run_in_vllms_torchrun_mode(monkeypatch):
    _torchrun(monkeypatch, {})
    alone = rollout_vllm.engine_kwargs("m", VLLMConfig(), torch.bfloat16, seed=3)
    assert "distributed_executor_backend" not in alone  # one process: vLLM's own choice
    ranks = []
    for rank in ("0", "1"):
        _torchrun(monkeypatch, TORCHRUN_RANK1 | {"RANK": rank, "LOCAL_RANK": rank})
        ranks.append(rollout_vllm.engine_kwargs("m", VLLMConfig(), torch.bfloat16, seed=3))
        teacher = teacher_vllm.engine_kwargs("t", VLLMConfig(), torch.bfloat16, seed=3, sleep=False)
        assert teacher["distributed_executor_backend"] == "external_launcher"
    assert [k["distributed_executor_backend"] for k in ranks] == ["external_launcher"] * 2
    assert ranks[0]["seed"] == ranks[1]["seed"] == 3  # vLLM's rule for ranks that share an engine holds trivially
    assert ranks[0]["tensor_parallel_size"] == 1
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 under torchrun"):
        rollout_vllm.engine_kwargs("m", VLLMConfig(tensor_parallel_size=2), torch.bfloat16, seed=3)


def test_vllms_torchrun_executor_takes_the_gpu_of_the_local_rank(monkeypatch):
    """vLLM's own code: the executor the arguments select reads the device from LOCAL_RANK, where the
    single-process executor (what an engine without the argument gets) takes device index 0 on every rank."""
    pytest.importorskip("vllm")
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    _torchrun(monkeypatch, TORCHRUN_RANK1)
    kwargs = rollout_vllm.engine_kwargs("m", VLLMConfig(), torch.bfloat16, seed=0)
    parallel = SimpleNamespace(distributed_executor_backend=kwargs["distributed_executor_backend"])
    executor = Executor.get_class(SimpleNamespace(parallel_config=parallel))
    assert executor._distributed_args(None) == ("env://", 1, 1)  # (init method, rank, local rank)
    uni = SimpleNamespace(vllm_config=SimpleNamespace(device_config=SimpleNamespace(device=torch.device("cuda"))))
    assert UniProcExecutor._distributed_args(uni)[1:] == (0, 0)


def test_at_most_one_sleep_mode_engine_per_process(monkeypatch):
    monkeypatch.setattr(rollout_vllm, "_on_cpu", lambda: False)  # the CUDA defaults
    assert rollout_vllm.engine_kwargs("m", VLLMConfig(), torch.bfloat16, 0)["enable_sleep_mode"] is True
    assert "enable_sleep_mode" not in rollout_vllm.engine_kwargs("m", VLLMConfig(), torch.bfloat16, 0, sleep=False)
    fake = FakeVLLM()
    monkeypatch.setattr(teacher_vllm, "import_vllm", lambda: fake)
    teacher_vllm.VLLMTeacher("t", VLLMConfig(), torch.bfloat16, topk=5)
    assert "enable_sleep_mode" not in fake.built[-1] and fake.built[-1]["max_logprobs"] == 5
    with pytest.raises(ConfigError, match="one sleep-mode engine per process"):
        TeacherConfig(backend="vllm_topk", vllm=VLLMConfig(enable_sleep_mode=True))


@dataclass
class FakeLLM:
    """Records the calls tip makes on `vllm.LLM`; generate returns one completion of token 7 per sample."""

    kwargs: dict
    calls: list = field(default_factory=list)

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append(("generate", len(requests), params))
        done = [SimpleNamespace(index=c, token_ids=[7], logprobs=None) for c in range(params.n)]
        return [SimpleNamespace(outputs=done) for _ in requests]

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("rpc", method, args, sorted(kwargs or {})))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def apply_model(self, fn):
        self.calls.append(("apply_model",))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


class FakeVLLM:
    def __init__(self):
        self.built: list[dict] = []

    def LLM(self, **kwargs):  # noqa: N802 (vllm.LLM)
        self.built.append(kwargs)
        return FakeLLM(kwargs)

    @staticmethod
    def SamplingParams(**kwargs):  # noqa: N802 (vllm.SamplingParams)
        return SimpleNamespace(**kwargs)


@pytest.fixture
def engine(monkeypatch):
    pytest.importorskip("vllm")  # generate imports vllm.inputs.TokensPrompt
    monkeypatch.setattr(rollout_vllm, "import_vllm", FakeVLLM)
    tok = SimpleNamespace(eos_token_id=2)
    return rollout_vllm.VLLMEngine("m", tok, VLLMConfig(enable_sleep_mode=True), torch.float32, seed=0)


def test_a_seeded_call_seeds_the_workers_rng_and_no_request(engine):
    engine.generate([[1, 2], [3]], Sampling(n=2, seed=11))
    rpc, gen = engine.llm.calls
    assert rpc == ("rpc", rollout_vllm._seed_sampler, (11,), [])
    _, n_requests, params = gen
    # one SamplingParams for the batch and no seed in it: vLLM would give request i, sample c its own generator
    # (a loop over requests at every step) and seed + c, shared with request i + 1's sample c - 1 under seed + i
    assert n_requests == 2 and params.n == 2 and not hasattr(params, "seed")
    engine.llm.calls.clear()
    engine.generate([[1]], Sampling(n=1))
    assert [c[0] for c in engine.llm.calls] == ["generate"]  # unseeded: the RNG as it is


def test_seed_sampler_sets_the_rngs_the_samplers_draw_from():
    """V1 runner: torch's RNG (the batch's noise); V2 runner: NumPy's (a seed per request, drawn as vLLM does)."""
    seed = derive_seed(1, 2, 3)  # 63 bits: more than np.random.seed takes as one integer
    rollout_vllm._seed_sampler(None, seed)
    drawn, per_request = torch.randint(0, 2**31, (4,)), np.random.randint(INT64.min, INT64.max, size=3)
    assert torch.equal(drawn, torch.randint(0, 2**31, (4,), generator=torch.Generator().manual_seed(seed)))
    rollout_vllm._seed_sampler(None, seed)
    assert np.array_equal(per_request, [np.random.randint(INT64.min, INT64.max) for _ in range(3)])
    rollout_vllm._seed_sampler(None, seed + 1)
    assert not np.array_equal(per_request, np.random.randint(INT64.min, INT64.max, size=3))


def test_sleep_discards_the_weights_and_the_sync_reloads_them_before_waking(engine):
    engine.sleep()
    engine.sync_weights(torch.nn.Linear(2, 2))
    engine.generate([[1]], Sampling())
    names = [c[0] if c[0] != "rpc" else c[1] for c in engine.llm.calls]
    assert engine.llm.calls[0] == ("sleep", 2)
    assert names[:3] == ["sleep", "wake_up", "reload_weights"] and engine.llm.calls[1] == ("wake_up", ["weights"])
    assert ("wake_up", ["kv_cache"]) in engine.llm.calls and names[-1] == "generate"
    engine.llm.calls.clear()
    engine.sleep()
    with pytest.raises(RuntimeError, match="sync_weights"):  # waking on discarded weights would sample garbage
        engine.generate([[1]], Sampling())


def test_derived_seeds_differ_across_runs_steps_ranks_and_turns():
    grid = list(itertools.product(range(3), range(40), range(8), range(6)))  # (run seed, step, rank, turn)
    seeds = [derive_seed(*parts) for parts in grid]
    assert len(set(seeds)) == len(grid) and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(*parts) for parts in grid]  # a function of the parts alone: a resume replays
    # the sums they replace coincide: (seed 0, step 1, turn 0) and (seed 0, step 0, turn 1)
    assert derive_seed(0, 1, 0) != derive_seed(0, 0, 1)
