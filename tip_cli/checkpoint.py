"""Checkpoints: `checkpoints/step_N/` holds the student in HF format plus the optimizer and scheduler state
(under torchrun, the optimizer and the sharded model are in step_N/dcp/ instead: tip_cli.train.checkpoints).

A checkpoint is written to a hidden temp dir and renamed into place, so a run killed mid-save leaves the previous
checkpoint intact and never a half-written one. The last file written into it is MANIFEST.json (every other
file's size and sha256): a checkpoint counts only when its manifest verifies, so one damaged later (a truncated
copy, a bad disk) is skipped with the reason, and the one before it is used. Training state is plain tensors and
numbers, loaded with `torch.load(weights_only=True)`: a checkpoint that holds any other pickled object is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tip_cli.errors import UserError

STATE_FILE = "trainer_state.pt"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# errnos that mean "this storage cannot take the write": reported in one line instead of a traceback
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
# what writers that are not Python's own raise (torch's zip writer a RuntimeError, safetensors its own error) when a
# write comes up short, as on a full disk
_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter failed|unexpected pos|file write failed|"
                           r"StorageFull|No space left|Read-only file system|Permission denied")


class StorageError(UserError, OSError):
    """A write into the run dir failed for lack of space or permission; the message is one line."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that must not be loaded (its state holds pickled code) or that cannot be (damaged)."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Checkpoints of a run that were committed (renamed into place), oldest first; see `verified_checkpoints`."""
    root = run_dir / "checkpoints"
    found = [
        Checkpoint(int(m.group(1)), p)
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda c: c.step)


def is_run_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoints/step_N dir of a run (whose eval results belong beside it)."""
    return bool(_STEP_DIR.match(path.name)) and path.parent.name == "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(ckpt_dir: Path) -> dict[str, int]:
    """Every file of ckpt_dir but its manifest: relative path -> size in bytes, sorted by path."""
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in files}


def file_entries(ckpt_dir: Path, names) -> dict[str, dict]:
    """The manifest entries {"size", "sha256"} of the files `names` (relative to ckpt_dir)."""
    return {name: {"size": (ckpt_dir / name).stat().st_size, "sha256": _sha256(ckpt_dir / name)} for name in names}


def write_manifest(ckpt_dir: Path, entries: dict[str, dict] | None = None) -> None:
    """MANIFEST.json: {"files": {relative path: {"size", "sha256"}}} of every file in ckpt_dir, written last.
    `entries` already hashed (by the ranks that share the hashing of a sharded checkpoint) are taken as given; the
    other files are hashed here."""
    entries = dict(entries or {})
    entries |= file_entries(ckpt_dir, [name for name in checkpoint_files(ckpt_dir) if name not in entries])
    (ckpt_dir / MANIFEST).write_text(json.dumps({"files": dict(sorted(entries.items()))}, indent=1))


def verify(ckpt: Checkpoint) -> str | None:
    """Why `ckpt` cannot be used (a missing or unreadable manifest, a missing, resized or changed file), or None."""
    manifest = ckpt.path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the save did not finish, or it predates manifests)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, want in entries.items():
        path = ckpt.path / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']} (truncated?)"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum in {MANIFEST}"
    return None


def newest_verified(run_dir: Path) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest checkpoint whose manifest verifies, and the newer ones skipped with the reason for each."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        reason = verify(ckpt)
        if reason is None:
            return ckpt, skipped
        skipped.append((ckpt, reason))
    return None, skipped


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    return newest_verified(run_dir)[0]


def staging_dir(run_dir: Path, step: int) -> Path:
    """The hidden dir step_N is written into before `commit_checkpoint` renames it into place."""
    return run_dir / "checkpoints" / f".step_{step}.tmp"


def free_space(path: Path) -> str:
    """Free space on the file system holding `path` (its nearest existing parent), e.g. '1.2 GiB free', or ''."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB free"
    except OSError:
        return ""


@contextmanager
def storage_errors(run_dir: Path, path: Path, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a write that fails for lack of space or permission into a one-line StorageError naming the path, the
    free space and the run's last good checkpoint; `cleanup` (a partial staging dir) is removed first."""
    try:
        yield
    except Exception as err:
        is_storage = isinstance(err, OSError) and err.errno in STORAGE_ERRNOS
        if not (is_storage or (not isinstance(err, OSError) and _WRITE_FAILED.search(str(err)))):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        where = Path(err.filename) if isinstance(err, OSError) and err.filename else path
        what = os.strerror(err.errno) if is_storage else f"the write failed (disk full?): {str(err).splitlines()[0][:120]}"
        last = latest_checkpoint(run_dir)
        parts = [f"cannot write {where}: {what}", free_space(where),
                 f"last good checkpoint: {last.path if last else 'none'}"]
        if cleanup is not None:
            parts.append(f"removed the partial {cleanup.name}")
        raise StorageError(err.errno if is_storage else errno.EIO, "; ".join(p for p in parts if p)) from err


def write_checkpoint(tmp: Path, step: int, model, tokenizer, trainer_state: dict, state_dict: dict | None = None) -> None:
    """The student in HF format, its tokenizer and the trainer state; `state_dict` stands in for the model's own
    (the gathered weights of a sharded model)."""
    import torch  # here, not at the top: the CLI checks a run dir's storage (make_run_dir) before torch loads

    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, **trainer_state}, tmp / STATE_FILE)


def commit_checkpoint(run_dir: Path, tmp: Path, step: int, keep: int = 0, entries: dict[str, dict] | None = None
                      ) -> Path:
    """Seal the finished `tmp` with its manifest (`entries`: files hashed already) and rename it to step_N; with
    keep > 0, delete all but the newest `keep` checkpoints."""
    final = run_dir / "checkpoints" / f"step_{step}"
    with storage_errors(run_dir, tmp, cleanup=tmp):
        write_manifest(tmp, entries)
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
    with storage_errors(run_dir, tmp, cleanup=tmp):
        write_checkpoint(tmp, step, model, tokenizer, trainer_state, state_dict)
    return commit_checkpoint(run_dir, tmp, step, keep)


def load_trainer_state(ckpt: Checkpoint, mmap: bool = False) -> dict:
    """The step, optimizer and scheduler state: tensors and plain data only (weights_only), never code. With `mmap`
    the tensors are mapped from the file, not read: the refusal of code costs the unpickling alone."""
    import torch

    path = ckpt.path / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain data "
            f"({_unsupported(str(err))}); tip never writes those, so this run dir may not be "
            "what it seems: check where it came from, or start a new out_dir"
        ) from err


def _unsupported(message: str) -> str:
    """What torch's weights_only refusal found: the pickled global it names, else its first line up to the advice
    that follows (to allowlist the global, which is not what a refusal on safety grounds should suggest)."""
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if named:
        return f"the global {named.group(1)}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return re.split(r"\s*(?:Please|Check the documentation|You can use)", (lines or ["unpickling refused"])[0])[0]
