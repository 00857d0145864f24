"""Metrics: per-phase timers, peak memory, a logger that writes metrics.jsonl and (optionally) W&B, and the token
samples (token_samples/step_N.npz) that `tip analyze` replays selectors on."""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tip_cli.checkpoint import storage_errors
from tip_cli.config.schema import LoggerConfig
from tip_cli.errors import DataError
from tip_cli.selection.quadrants import TokenStats

# The phases of a training step, in seconds, logged every step (SPEC 7, 7a; 0.0 for a phase the step did not run):
# they do not overlap, so they add up to at most time/step. time/wait is the time the trainer waited for samples.
STEP_PHASES = ("time/rollout", "time/teacher", "time/select", "time/train", "time/probe", "time/weight_sync",
               "time/wait")


@contextmanager
def timed(name: str, metrics: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent inside the block to metrics[name]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[name] = metrics.get(name, 0.0) + time.perf_counter() - start


class CudaMemory:
    """torch's allocator counts on one CUDA device, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class PeakMemory:
    """perf/peak_mem_gb: the training phase's peak memory, net of what the rollout engine holds.

    A colocated vLLM engine allocates its weights and KV cache through torch's allocator (its sleep-mode memory
    pool). Asleep, it has unmapped that memory, but torch still counts the blocks as allocated, so
    max_memory_allocated alone would charge the engine's whole pool to every training step. Hence, on CUDA:

        engine  = allocated after the engine is built - allocated before (`engine_build`, once)
        peak    = max allocated since the engine went to sleep (`start`) - engine

    covering the teacher, selection, loss, backward, optimizer step and weight sync; the rollouts themselves are
    not in it. On CPU: the process's peak resident set size (no reset, no engine share). `source` gives the
    allocator's counts (CudaMemory; a fake in tests)."""

    def __init__(self, device: torch.device, source: CudaMemory | None = None):
        self.source = source or (CudaMemory(device) if device.type == "cuda" else None)
        self.engine = 0  # bytes

    @contextmanager
    def engine_build(self) -> Iterator[None]:
        """Around the rollout engine's construction: what it adds to the allocator's count is the engine's."""
        before = self.source.allocated() if self.source else 0
        yield
        if self.source:
            self.engine = max(0, self.source.allocated() - before)

    def start(self) -> None:
        """The engine is asleep: the training phase's peak starts here."""
        if self.source:
            self.source.reset_peak()

    def gb(self) -> float:
        if self.source:
            return (self.source.peak() - self.engine) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def wandb_mode(requested: str) -> str:
    """`auto` is online only when credentials exist, so a machine without them never blocks on a login."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path("~/.netrc").expanduser()
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def read_jsonl(path: Path, quiet: bool = False) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file. A torn last line (a write cut short by a crash) is dropped, with a warning
    naming the file and line unless `quiet`; a bad line before the last is an error naming both."""
    if not path.exists():
        return []
    lines = path.read_bytes().decode(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if number != last:
                raise DataError(f"{path} line {number}: not valid JSON ({err}); each line must be one JSON object") from err
            if not quiet:
                print(f"warning: {path} line {number}: dropping the torn last line (a write cut short by a crash)",
                      file=sys.stderr)
    return rows


def init_wandb(logger, run_dir: Path, **kwargs):
    """A W&B run in `run_dir` for the logger group's project, entity and mode (offline without credentials:
    `wandb_mode`); `kwargs` go to wandb.init as they are (job_type, name, config, id, resume, ...)."""
    import wandb

    return wandb.init(project=logger.project, entity=logger.entity, mode=wandb_mode(str(logger.mode)),
                      dir=str(run_dir), **kwargs)


class MetricsLogger:
    """Appends one JSON line per `log` call to run_dir/metrics.jsonl and mirrors it to W&B when enabled.

    On resume from step k, lines logged after step k by the crashed run are dropped, so the curve has no
    duplicates; the W&B run is resumed by the id saved in the run dir.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict[str, Any], resume_step: int = 0, name: str | None = None):
        self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        with storage_errors(run_dir, self.path):  # replaced whole: a kill mid-write leaves the old file
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self.run = None
        if cfg.name == "wandb":
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.run = init_wandb(cfg, run_dir, id=run_id, resume="allow", config=config, tags=list(cfg.tags), name=name)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **metrics}
        with storage_errors(self.run_dir, self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def save_token_sample(run_dir: Path, step: int, stats: TokenStats, kept: torch.Tensor, limit: int) -> None:
    """Per-token (H, D, quadrant, kept, and ||dl/dz|| as grad_norm and C as support_mass when the step measured
    them) of one rollout batch, at most `limit` tokens drawn uniformly, for analysis: a selector's gradient share can
    be recomputed offline."""
    n = len(stats)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(step))[:limit].sort().values if n > limit else torch.arange(n)
    kept_mask = torch.zeros(n, dtype=torch.bool)
    kept_mask[kept] = True
    out = run_dir / "token_samples"
    path = out / f"step_{step:06d}.npz"

    def pick(x: torch.Tensor) -> np.ndarray:  # the sampled rows, selected where x lives, then copied
        return x[rows.to(x.device)].cpu().numpy()

    extra = {} if stats.grad_sq is None else {"grad_norm": np.sqrt(pick(stats.grad_sq)).astype(np.float32)}
    if stats.support_mass is not None:
        extra["support_mass"] = pick(stats.support_mass).astype(np.float32)
    with storage_errors(run_dir, path):
        out.mkdir(exist_ok=True)
        np.savez_compressed(
            path,
            **extra,
            entropy=pick(stats.entropy).astype(np.float32),
            divergence=pick(stats.divergence).astype(np.float32),
            quadrant=pick(stats.quadrant).astype(np.int8),
            kept=kept_mask[rows].numpy(),
            h_threshold=np.float32(stats.h_thr),
            d_threshold=np.float32(stats.d_thr),
            total_tokens=np.int64(n),
        )
