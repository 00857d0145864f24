"""The seed helpers give the integers runs have always used, so a run seeded before them replays bit for bit."""

import random

import pytest
import torch

from tip_cli.envs.toy_agent import generate_tasks
from tip_cli.seeds import derive_seed, stream_seed
from tip_cli.train.schedule import prompt_indices

SEEDS = [0, 1, 7, 42, 2**31 - 1, -3]


@pytest.mark.parametrize("seed", SEEDS)
def test_stream_seed_is_seed_times_1_000_003_plus_i(seed):
    for i in (0, 1, 2, 999, 1_000_002, 10**6 + 5):
        assert stream_seed(seed, i) == seed * 1_000_003 + i
        assert type(stream_seed(seed, i)) is int


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_prompt_order_is_the_per_epoch_shuffle_seeded_by_the_stream(seed):
    n, per_step = 7, 3
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)).tolist() for e in range(4)]
    flat = [i for perm in perms for i in perm]
    for step in range(1, 9):
        assert prompt_indices(n, per_step, step, seed) == flat[(step - 1) * per_step : step * per_step]


@pytest.mark.parametrize("seed", [0, 5])
def test_toy_agent_tasks_draw_from_the_stream(seed):
    from tip_cli.envs.toy_agent import NAMES

    for task in generate_tasks(4, seed, start=2):
        i = int(task.id.rsplit("-", 1)[1])
        name, _ = random.Random(seed * 1_000_003 + i).choice(NAMES)
        assert task.prompt.startswith(f"{name} buys ")


def test_derive_seed_separates_tuples_that_sum_alike():
    assert derive_seed(0, 1, 0) != derive_seed(0, 0, 1) and derive_seed(1, 2) == derive_seed(1, 2)
    assert 0 <= derive_seed(2**40, 7, 3) < 2**63


@pytest.mark.parametrize("seed", [0, 9])
def test_a_training_step_seeds_its_generator_and_the_global_rng_from_the_stream(seed):
    from types import SimpleNamespace

    from tip_cli.train.loop import step_generator

    for step in (1, 4):
        gen = step_generator(SimpleNamespace(loop=SimpleNamespace(seed=seed)), step)
        drawn_global = torch.rand(3)
        want = seed * 1_000_003 + step
        assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(want)))
        assert torch.equal(drawn_global, torch.rand(3, generator=torch.Generator().manual_seed(want)))  # rank 0
