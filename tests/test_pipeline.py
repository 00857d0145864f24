"""The rollout pipeline's logic (tip_cli.train.pipeline) with a stand-in engine: which weights generate which step,
on which thread, and what the trainer waits for."""

import threading
import time

import pytest

from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError
from tip_cli.train.pipeline import RolloutPipeline


class Engine:
    """Generation that takes `gen_s` seconds and records (step, the version it served, the thread it ran on)."""

    def __init__(self, gen_s: float = 0.0):
        self.version, self.gen_s, self.calls = 0, gen_s, []

    def generate(self, step: int) -> str:
        self.calls.append((step, self.version, threading.current_thread() is threading.main_thread()))
        time.sleep(self.gen_s)
        return f"rollouts {step}"


def run(pipe: RolloutPipeline, engine: Engine, steps: int, train_s: float = 0.0) -> list[dict]:
    """The trainer's loop as tip_cli.train.loop runs it: take, train, settle, push."""
    logged = []
    for step in range(1, steps + 1):
        m = {}
        batch, staleness = pipe.take(step, m)
        assert batch == (step, f"rollouts {step}")
        time.sleep(train_s)
        pipe.settle(m)
        engine.version += 1  # the push of this step's update
        logged.append(m | {"staleness": staleness})
    pipe.close()
    return logged


def make(engine: Engine, max_staleness: int, last: int) -> RolloutPipeline:
    return RolloutPipeline(engine.generate, lambda step, out: (step, out), lambda: engine.version, max_staleness, last)


def test_synchronous_pipeline_generates_each_step_with_the_current_weights_on_the_trainers_thread():
    engine = Engine()
    logged = run(make(engine, 0, 4), engine, 4)
    assert engine.calls == [(1, 0, True), (2, 1, True), (3, 2, True), (4, 3, True)]
    assert [m["staleness"] for m in logged] == [0, 0, 0, 0]
    assert all("time/wait" not in m and m["rollout/staleness"] == 0.0 for m in logged)


def test_staleness_one_generates_the_next_step_in_the_background_on_the_weights_before_this_update():
    engine = Engine()
    logged = run(make(engine, 1, 4), engine, 4)
    # step 1 at once (version 0); step s + 1 while step s trains, from version s - 1; nothing past the last step
    assert engine.calls == [(1, 0, True), (2, 0, False), (3, 1, False), (4, 2, False)]
    assert [m["staleness"] for m in logged] == [0, 1, 1, 1]
    assert [m["rollout/weight_version"] for m in logged] == [0.0, 0.0, 1.0, 2.0]


def test_overlap_hides_generation_behind_training_and_the_wait_is_what_is_left():
    """Generation 0.2 s and training 0.1 s a step: the trainer waits ~0.1 s a step for the background batch, and
    the whole run takes about max(generation, training) a step instead of their sum."""
    steps = 5
    timings = {}
    for staleness in (0, 1):
        engine = Engine(gen_s=0.2)
        start = time.perf_counter()
        logged = run(make(engine, staleness, steps), engine, steps, train_s=0.1)
        timings[staleness] = time.perf_counter() - start
        if staleness:
            waits = [m.get("time/wait", 0.0) for m in logged]
            # steps 1 .. 4 wait (at their push) for the next step's batch; the last has nothing in flight
            assert all(0.05 < w < 0.2 for w in waits[:-1]) and waits[-1] < 0.01, waits
            assert all(m["time/rollout"] >= 0.2 for m in logged)
    assert timings[1] < 0.8 * timings[0], timings


def test_a_pipeline_refuses_rollouts_staler_than_allowed():
    engine = Engine()
    pipe = make(engine, 1, 3)
    pipe.take(1, {})
    engine.version += 2  # two pushes while step 2's rollouts were generated on version 0
    with pytest.raises(RuntimeError, match="2 versions old"):
        pipe.take(2, {})
    pipe.close()


def test_max_staleness_needs_an_engine_that_decodes_outside_the_trainer_and_is_0_or_1():
    with pytest.raises(ConfigError, match="rollout.max_staleness=1 needs rollout.engine=vllm_server"):
        compose_config(["rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match="rollout.max_staleness=2 is not valid; expected 0"):
        compose_config(["rollout=vllm_server", "rollout.url=http://h:1", "rollout.max_staleness=2"])
    cfg = compose_config(["rollout=vllm_server", "rollout.url=[http://h:1/v1,http://g:2]", "rollout.max_staleness=1"])
    assert cfg.rollout.url == ["http://h:1", "http://g:2"] and cfg.rollout.max_staleness == 1
