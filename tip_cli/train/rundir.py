"""A run dir's contract: one writer at a time, the config that made it, and where a re-run picks up.

    run_dir/config.yaml       the config of the run (after `train.resume=override`, the one in force since)
    run_dir/overrides.jsonl   one row per deliberate change: {"step": S, "changed": {key: [old, new]}}; the steps
                              after S ran with the new values (`tip analyze` splits the run there)
    run_dir/tip.lock          host and PID of the process writing the run, held with flock(2) for the run's life
    run_dir/metrics.jsonl, checkpoints/step_N/ (MANIFEST.json last), token_samples/, eval/

A re-run into an existing run dir continues it from its newest verified checkpoint when its config is the one
recorded, up to harmless differences (HARMLESS: save/eval/logging cadence, the logger; train.steps may grow under
a constant schedule). Any other difference stops the run before a model is loaded, listing each key with both
values, unless `train.resume=override` asks for it. A finished run re-run unchanged writes nothing. A run dir with
checkpoints whose config.yaml is missing or unreadable is not continued under any config.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tip_cli.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_trainer_state,
    newest_verified,
    storage_errors,
    verify,
)
from tip_cli.config.compose import load_yaml, to_container, to_yaml
from tip_cli.config.schema import ConfigError, TipConfig
from tip_cli.errors import UserError

LOCK_FILE = "tip.lock"
OVERRIDES_FILE = "overrides.jsonl"
# keys that never change what a run computes: cadence of saves, evals and samples, where logs go, eval batching
HARMLESS = ("train.save_every", "train.eval_every", "train.eval_before", "train.keep_checkpoints",
            "train.token_sample_every", "train.token_sample_size", "train.resume", "train.sigterm_grace_s",
            "eval.batch_size", "logger.",
            "out_dir", "checkpoint")


class RunDirError(UserError, ValueError):
    """The run dir cannot be used as asked (another writer, a changed config); the message says what to do."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _as_dict(cfg: TipConfig) -> dict[str, Any]:
    return to_container(cfg)


def config_changes(old: dict[str, Any], cfg: TipConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose value in `cfg` changes the run recorded as `old` (a config.yaml's dict): key -> (old, new).

    A key the old config lacks (written by an older tip) counts as its default. train.steps may grow when the
    schedule is constant; under cosine/linear, the schedule itself depends on it, so that is a change too."""
    before, after = _flatten(old), _flatten(_as_dict(cfg))
    defaults = _flatten(_as_dict(TipConfig()))
    missing = object()
    changes = {}
    for key in sorted(set(before) | set(after)):
        if key.startswith(HARMLESS):
            continue
        was, now = before.get(key, defaults.get(key, missing)), after.get(key, missing)
        if was == now:
            continue
        if key == "train.steps" and isinstance(was, int) and now > was and cfg.optim.lr_schedule == "constant":
            continue
        changes[key] = (None if was is missing else was, None if now is missing else now)
    return changes


class RunLock:
    """An exclusive flock(2) on run_dir/tip.lock, which names its holder ("host pid"). The kernel drops the lock
    when its process dies, however it dies, so a lock file left by a dead process is simply taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        with storage_errors(run_dir, self.path):
            try:
                self.fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                self.fd, created = os.open(self.path, os.O_RDWR), False
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                os.close(self.fd)
                raise RunDirError(
                    f"{run_dir} is being written by another tip run ({holder}); wait for it to end or stop it, "
                    "or give this run a new out_dir"
                ) from None
            try:
                self.previous = self._holder() if os.fstat(self.fd).st_size else None  # died without releasing
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
            except OSError:  # a full disk: no empty lock file of ours is left behind
                if created:
                    self.path.unlink(missing_ok=True)
                os.close(self.fd)
                raise

    def _holder(self) -> str:
        text = os.pread(self.fd, 256, 0).decode(errors="replace").split()
        return f"host {text[0]}, PID {text[1]}" if len(text) >= 2 else "holder unknown"

    def release(self) -> None:
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


@dataclass
class RunPlan:
    """What `open_run` decided: the checkpoint to resume (None: from scratch), or the final eval of a finished run."""

    checkpoint: Checkpoint | None = None
    complete: dict[str, float] | None = None
    lock: RunLock | None = None  # rank 0's, held until `release`

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _changes_message(run_dir: Path, changes: dict[str, tuple[Any, Any]], step: int) -> str:
    lines = [f"{run_dir} was made with a different config; changed:"]
    lines += [f"  {key}: {old!r} -> {new!r}" for key, old, new in ((k, *v) for k, v in changes.items())]
    lines.append(f"To start afresh, give a new out_dir=PATH; to continue this run from step {step} with the new "
                 f"values (recorded in {OVERRIDES_FILE}), add train.resume=override.")
    return "\n".join(lines)


def _final_eval(run_dir: Path, cfg: TipConfig) -> dict[str, float] | None:
    """The final evaluation of a run that reached train.steps, if it was logged (else None)."""
    from tip_cli.tracking import read_jsonl  # torch: see open_run

    prefix = f"eval/{cfg.benchmark.name}/"
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl", quiet=True)
            if r.get("step") == cfg.train.steps and prefix + "accuracy" in r]
    return {k.removeprefix(prefix): v for k, v in rows[-1].items() if k.startswith(prefix)} if rows else None


def make_run_dir(run_dir: Path) -> bool:
    """Create run_dir (and its parents) unless it exists; whether it was created. A path that is a file, or storage
    that refuses the directory (read-only, no space, no permission), raises in one line naming the path."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"out_dir {run_dir} is a file, not a directory; give out_dir a directory path")
    if run_dir.is_dir():
        return False
    blocked = next((p for p in run_dir.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise RunDirError(f"cannot create out_dir {run_dir}: {blocked} is a file, not a directory")
    with storage_errors(run_dir, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    return True


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run dir records (None: a new run dir). A run dir holding checkpoints but no config.yaml, or an
    unreadable one, is refused whatever the config: continuing it could mix two configs under one record."""
    recorded = run_dir / "config.yaml"
    if not recorded.is_file():
        if list_checkpoints(run_dir):
            raise RunDirError(f"{recorded} is missing, so the config of the checkpoints in {run_dir / 'checkpoints'} "
                              "is unknown; restore config.yaml to continue this run, or give a new out_dir=PATH")
        return None
    try:
        return to_container(load_yaml(recorded))
    except ConfigError as err:
        raise RunDirError(f"{err}; restore it to continue this run, or give a new out_dir=PATH") from None


def _decide(cfg: TipConfig, run_dir: Path, console: Console) -> RunPlan:
    """Rank 0's part of `open_run`."""
    recorded = run_dir / "config.yaml"
    old = recorded_config(run_dir)
    changes = config_changes(old, cfg) if old is not None else {}
    committed = list_checkpoints(run_dir)
    if changes and cfg.train.resume != "override":
        raise RunDirError(_changes_message(run_dir, changes, committed[-1].step if committed else 0))
    if not changes and committed and committed[-1].step == cfg.train.steps and verify(committed[-1]) is None:
        final = _final_eval(run_dir, cfg)
        if final is not None:
            return RunPlan(complete=final)
    make_run_dir(run_dir)
    lock = RunLock(run_dir)
    try:
        if lock.previous:
            console.print(f"[yellow]took over {lock.path} from a run that ended without releasing it ({lock.previous})[/]",
                          soft_wrap=True)
        for partial in (run_dir / "checkpoints").glob(".step_*.tmp"):  # a save cut short; its step is redone
            shutil.rmtree(partial, ignore_errors=True)
        ckpt, skipped = newest_verified(run_dir)
        for bad, reason in skipped:
            console.print(f"[yellow]skipping checkpoint {bad.path}: {reason}[/]", soft_wrap=True)
        if skipped and ckpt is None:  # starting over would overwrite them: a person decides
            raise RunDirError(
                f"{run_dir}: none of its {len(skipped)} checkpoint(s) verifies (listed above with the reason); "
                f"to start over, move {run_dir / 'checkpoints'} away, or give a new out_dir"
            )
        if ckpt is not None and ckpt.step > cfg.train.steps:  # its weights are past the end the config asks for
            raise RunDirError(
                f"{run_dir} has a checkpoint at step {ckpt.step}, past train.steps={cfg.train.steps}: a run does not "
                f"go back; give train.steps >= {ckpt.step} to continue it, or a new out_dir"
            )
        if ckpt is not None:
            # refuses a state that holds code before any model is loaded; mapped, so that resuming reads it once
            load_trainer_state(ckpt, mmap=True)
        with storage_errors(run_dir, recorded):
            if changes:
                row = {"step": ckpt.step if ckpt else 0, "changed": {k: list(v) for k, v in changes.items()},
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                with (run_dir / OVERRIDES_FILE).open("a") as f:
                    f.write(json.dumps(row) + "\n")
                console.print(f"[bold]train.resume=override[/]: from step {row['step']}, "
                              + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items()))
            if changes or not recorded.is_file():
                tmp = recorded.with_name(".config.yaml.tmp")
                tmp.write_text(to_yaml(cfg))
                tmp.replace(recorded)
    except BaseException:
        lock.release()
        raise
    return RunPlan(checkpoint=ckpt, lock=lock)


def open_run(cfg: TipConfig, run_dir: Path, console: Console) -> RunPlan:
    """Check the run dir against `cfg` and take it: rank 0 decides and locks, every rank gets the decision (and
    raises rank 0's error, so that no rank waits on the others)."""
    # imported here: the CLI makes the run dir (make_run_dir) before torch is imported, so that a path that cannot be
    # one fails in a second
    from tip_cli.train import parallel

    plan, error = None, None
    if parallel.is_main():
        try:
            plan = _decide(cfg, run_dir, console)
        except Exception as err:  # every rank must learn of it
            error = err
    decided, failed = parallel.broadcast((None if plan is None else (plan.checkpoint, plan.complete), error))
    if error is not None:
        raise error
    if failed is not None:
        raise failed
    return plan if plan is not None else RunPlan(*decided)
