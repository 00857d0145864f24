"""Checkpoints: `checkpoints/step_N/` holds the student in HF format plus the optimizer and scheduler state
(under torchrun, the optimizer and the sharded model are in step_N/dcp/ instead: tip_cli.distributed).

A checkpoint is written to a hidden temp dir and renamed into place, so a run killed mid-save leaves the previous
checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    found = [
        Checkpoint(int(m.group(1)), p)
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def staging_dir(run_dir: Path, step: int) -> Path:
    """The hidden dir step_N is written into before `commit_checkpoint` renames it into place."""
    return run_dir / "checkpoints" / f".step_{step}.tmp"


def write_checkpoint(tmp: Path, step: int, model, tokenizer, trainer_state: dict, state_dict: dict | None = None) -> None:
    """The student in HF format, its tokenizer and the trainer state; `state_dict` stands in for the model's own
    (the gathered weights of a sharded model)."""
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, **trainer_state}, tmp / STATE_FILE)


def commit_checkpoint(run_dir: Path, tmp: Path, step: int, keep: int = 0) -> Path:
    """Rename the finished `tmp` to step_N; with keep > 0, delete all but the newest `keep` checkpoints."""
    final = run_dir / "checkpoints" / f"step_{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old.path)
    return final


def save_checkpoint(
    run_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 0, state_dict: dict | None = None
) -> Path:
    """Write step_N atomically; with keep > 0, delete all but the newest `keep` checkpoints."""
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, step, model, tokenizer, trainer_state, state_dict)
    return commit_checkpoint(run_dir, tmp, step, keep)


def load_trainer_state(ckpt: Checkpoint) -> dict:
    return torch.load(ckpt.path / STATE_FILE, map_location="cpu", weights_only=False)
