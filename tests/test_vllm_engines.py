"""The in-process vLLM engines' wiring, checked without a GPU: seeded sampling without per-request seeds. vLLM's
`LLM` is a recording fake here; the real CPU engine runs in test_vllm.py."""

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from tip_cli.config.schema import VLLMConfig
from tip_cli.rollout import vllm as rollout_vllm
from tip_cli.rollout.batch import Sampling, derive_seed


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


def test_seed_sampler_sets_the_rng_the_sampler_draws_from():
    rollout_vllm._seed_sampler(None, 5)
    drawn = torch.randint(0, 2**31, (4,))
    assert torch.equal(drawn, torch.randint(0, 2**31, (4,), generator=torch.Generator().manual_seed(5)))


def test_derived_seeds_differ_across_runs_steps_ranks_and_turns():
    grid = list(itertools.product(range(3), range(40), range(8), range(6)))  # (run seed, step, rank, turn)
    seeds = [derive_seed(*parts) for parts in grid]
    assert len(set(seeds)) == len(grid) and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(*parts) for parts in grid]  # a function of the parts alone: a resume replays
    # the sums they replace coincide: (seed 0, step 1, turn 0) and (seed 0, step 0, turn 1)
    assert derive_seed(0, 1, 0) != derive_seed(0, 0, 1)
