"""A run's checkpoints, written and resumed under the launch that made them.

Single process: the HF student with the optimizer and scheduler state (tip_cli.checkpoint's format). Under torchrun:
the sharded model and optimizer state as a torch.distributed.checkpoint in step_N/dcp/ (every rank writes its
shards), rank 0 adds the HF export, and the ranks hash the files in parallel (`hash_shares`) before rank 0 commits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from tip_cli.checkpoint import (
    Checkpoint,
    checkpoint_files,
    commit_checkpoint,
    file_entries,
    load_trainer_state,
    save_checkpoint,
    staging_dir,
    write_checkpoint,
)
from tip_cli.config.schema import ConfigError
from tip_cli.train import parallel

DCP_DIR = "dcp"  # inside checkpoints/step_N/: the sharded model + optimizer state (torch.distributed.checkpoint)


def _export(state_dict: dict, dtype: torch.dtype | None) -> dict:
    """The HF export's tensors in the pair's dtype (fp32 master weights are written as the pair's bf16)."""
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state_dict.items()}


def save(run_dir: Path, step: int, student, tokenizer, optimizer, scheduler, keep: int,
         export_dtype: torch.dtype | None = None) -> None:
    """Write checkpoints/step_N atomically. Single process: HF student + optimizer/scheduler (tip_cli.checkpoint).
    Under torchrun: the sharded model and optimizer state as a torch.distributed.checkpoint in step_N/dcp/ (every
    rank writes its shards; the file system must be shared), and rank 0 adds the full student as a HF export (what
    `tip eval` reads), the tokenizer, and the step, scheduler and world size in trainer_state.pt.

    The HF export is written in `export_dtype` (the pair's); when that is narrower than the student's own (fp32 master
    weights under bf16_mixed), the exact weights go into trainer_state.pt (single process) or dcp/ (torchrun)."""
    if not parallel.active():
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        own = student.state_dict()
        export = _export(own, export_dtype)
        if any(export[k].dtype != v.dtype for k, v in own.items()):
            state["master_weights"] = own
        save_checkpoint(run_dir, step, student, tokenizer, state, keep, state_dict=export)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    tmp = staging_dir(run_dir, step)
    if parallel.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(student, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / DCP_DIR)
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # on rank 0
    if parallel.is_main():
        state = {"scheduler": scheduler.state_dict(), "world_size": parallel.world_size()}
        write_checkpoint(tmp, step, student, tokenizer, state, state_dict=_export(full, export_dtype))
    del full
    dist.barrier()  # every file is written: the ranks hash them in parallel, each its share
    sizes = checkpoint_files(tmp)
    mine = [name for name, owner in hash_shares(sizes, parallel.world_size()).items() if owner == parallel.rank()]
    hashed: list[dict] = [{} for _ in range(parallel.world_size())]
    dist.all_gather_object(hashed, file_entries(tmp, mine))
    if parallel.is_main():
        commit_checkpoint(run_dir, tmp, step, keep, {name: e for part in hashed for name, e in part.items()})
    dist.barrier()


def hash_shares(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Which rank hashes each file of a sharded checkpoint (relative path -> size): a rank's own DCP shards
    (dcp/__R_*.distcp, the bulk: model and AdamW state) its own, so they are read back where they were written; the
    rest (HF export, tokenizer, metadata) largest first to the rank with the fewest bytes so far."""
    owner, load = {}, [0] * world
    for name, size in sizes.items():
        stem = Path(name).name
        if Path(name).parent.name == DCP_DIR and stem.startswith("__") and stem.endswith(".distcp"):
            r = int(stem[2:].split("_")[0])
            if r < world:
                owner[name] = r
                load[r] += size
    for name in sorted((n for n in sizes if n not in owner), key=lambda n: (-sizes[n], n)):
        owner[name] = min(range(world), key=lambda r: (load[r], r))
        load[owner[name]] += sizes[name]
    return owner


def resume(ckpt: Checkpoint, student, optimizer, scheduler) -> int:
    """Restore optimizer and scheduler (and, under torchrun, the sharded model) from `ckpt`; returns its step.

    A checkpoint resumes under the launch that wrote it: the same number of torchrun ranks, or no torchrun."""
    state = load_trainer_state(ckpt)
    written_by = state.get("world_size", 0)  # 0: without torchrun (tip_cli.checkpoint's format, no world size)
    if written_by != (parallel.world_size() if parallel.active() else 0):
        wrote = f"{written_by} torchrun ranks" if written_by else "a run without torchrun"
        now = f"runs on {parallel.world_size()} torchrun ranks" if parallel.active() else "runs without torchrun"
        raise ConfigError(f"{ckpt.path} was written by {wrote}, but this run {now}; resume it as it was launched "
                          "(torchrun --nproc_per_node N), or start a new out_dir")
    if parallel.active():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(student, optimizer)
        loaded = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(loaded, checkpoint_id=ckpt.path / DCP_DIR)
        set_state_dict(student, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    else:
        if "master_weights" in state:  # the HF export was rounded to the pair's dtype; continue from the exact weights
            student.load_state_dict(state["master_weights"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]
