"""Where a step's rollouts come from in time: generated at the step (rollout.max_staleness=0), or generated while the
previous step trained (max_staleness=1).

With max_staleness=1, once step s has its rollouts the generation of step s + 1's starts in a background thread on
the student servers (which serve version s - 1: the weights before step s's update), while step s scores, selects,
trains and updates. Before the update is pushed the trainer waits for that generation to end (a push never lands
mid-request, so every response has one version), and step s + 1 then trains on rollouts one version old: H, D, the
selection and the loss are still computed with the current student, at learner time. The trainer's idle seconds,
waiting for samples, are `time/wait`; the background generation's own seconds are the step's `time/rollout`.

With a teacher server, each prompt's responses are sent for scoring as soon as they are generated
(ServerTeacher.prefetch), while the rest of the batch is still generating. A run that resumes discards the batch that
was in flight and generates its first step at once, from the checkpoint's weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tip_cli.rollout.sources import Rollout
from tip_cli.tracking import timed


@dataclass
class Generated:
    """A step's rollouts with the seconds their generation took and the weight version that generated them."""

    step: int
    out: object  # what the rollout source's `generate` returned
    seconds: float
    version: int


class RolloutPipeline:
    """Step s's generated rollouts, at most `max_staleness` weight versions old (0 or 1).

    `generate(step)` produces a step's raw rollouts (on the engine, any thread), `pack(step, out)` turns them into
    the training batch (on the trainer's thread), `version()` is the weight version the engine serves now, and `last`
    is the final step (nothing is generated past it)."""

    def __init__(self, generate: Callable[[int], object], pack: Callable[[int, object], Rollout],
                 version: Callable[[], int], max_staleness: int, last: int):
        self.generate, self.pack, self.version, self.max_staleness, self.last = generate, pack, version, max_staleness, last
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if max_staleness else None
        self.ahead: Future | None = None

    def _generate(self, step: int) -> Generated:
        version, start = self.version(), time.perf_counter()
        out = self.generate(step)
        return Generated(step, out, time.perf_counter() - start, version)

    def take(self, step: int, m: dict) -> tuple[Rollout, int]:
        """Step `step`'s rollouts as a batch and their staleness (versions behind the engine's current one); the
        next step's generation starts in the background when max_staleness allows it."""
        if self.ahead is not None:
            with timed("time/wait", m):
                got = self.ahead.result()
            self.ahead = None
        else:
            got = self._generate(step)
        if got.step != step:  # a bug, not a user's fault: the loop asked out of order
            raise RuntimeError(f"rollouts of step {got.step} were generated for step {step}")
        staleness = self.version() - got.version
        if not 0 <= staleness <= self.max_staleness:
            raise RuntimeError(f"step {step} would train on rollouts {staleness} versions old "
                               f"(rollout.max_staleness={self.max_staleness})")
        m["time/rollout"] = m.get("time/rollout", 0.0) + got.seconds
        m["rollout/staleness"] = float(staleness)
        m["rollout/weight_version"] = float(got.version)
        if self.pool is not None and step < self.last:
            self.ahead = self.pool.submit(self._generate, step + 1)
        return self.pack(step, got.out), staleness

    def settle(self, m: dict) -> None:
        """Wait for the generation in flight to end (before a weight push); the wait is the trainer's idle time."""
        if self.ahead is not None and not self.ahead.done():
            with timed("time/wait", m):
                self.ahead.exception()

    def close(self) -> None:
        """Discard the generation in flight (an interrupted or finished run)."""
        if self.pool is not None:
            if self.ahead is not None:
                self.ahead.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.ahead = None, None
