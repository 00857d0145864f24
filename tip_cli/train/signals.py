"""Stopping on SIGINT or SIGTERM with one line naming the run's last checkpoint, never a traceback.

SIGINT (Ctrl-C) stops at once. SIGTERM is what SLURM sends before it preempts a job (SIGKILL follows after its own
grace time): inside the training loop the step in flight may finish within train.sigterm_grace_s, and is then saved
as a checkpoint before the run stops; past that time, with a grace of 0, or outside the loop (loading, the final
evaluation), the run stops at once. Either way, re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class Interrupted(BaseException):
    """A signal stopped the run. A BaseException, as KeyboardInterrupt is, so that no `except Exception` (a retry,
    a storage check) holds it up; args[0] is the signal's name."""


def _stop(signum: int, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only it may install handlers


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Within the block SIGTERM raises Interrupted wherever the process is (the CLI's default for a whole job)."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Stop:
    requested: bool = False  # SIGTERM came: save the step in flight when it ends, then stop


@contextmanager
def sigterm_grace(grace_s: float) -> Iterator[Stop]:
    """Within the block a SIGTERM sets `Stop.requested` and leaves the work grace_s seconds (a second SIGTERM, or
    SIGALRM at the end of them, raises Interrupted); the caller checks `requested` after each step. The previous
    handlers are back on exit."""
    stop = Stop()
    if not _main_thread():
        yield stop
        return

    def on_term(signum: int, frame) -> None:
        if stop.requested or grace_s <= 0:
            _stop(signum, frame)
        stop.requested = True
        signal.setitimer(signal.ITIMER_REAL, grace_s)

    previous = signal.signal(signal.SIGTERM, on_term), signal.signal(signal.SIGALRM, lambda *_: _stop(signal.SIGTERM, None))
    try:
        yield stop
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGALRM, previous[1])
