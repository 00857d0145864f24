"""Scale-out over torchrun ranks: the student sharded with FSDP2, rollouts split, token selection over the global batch.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK set) every rank, each step:
  1. generates the rollouts of its contiguous slice of the step's prompts (`my_slice`): the HF engine with the whole
     student gathered for the duration (`gathered`), so decoding runs without per-layer all-gathers; vLLM with its
     own copy, which `sync_weights` refreshes one gathered parameter at a time;
  2. runs the teacher (a full replica by default, no grads, no optimizer) and the sharded student on its own rows;
  3. all-gathers the compact per-token scores H, D [N_r] (`select_tokens`), so the normalisation, the quadrant
     thresholds and the top-K budget are computed over the global batch, identically on every rank (same generator
     seed), and keeps the selected indices that fall in its own slice;
  4. divides its loss by the global kept (or total) count and has FSDP *sum* the gradients across ranks (its
     default is the mean), so the summed loss and the step equal one process on the whole batch.
An evaluation is split over the ranks (`RankShard`: each generates and grades its share of the benchmark, the
records are gathered); a checkpoint's files are hashed by the ranks in parallel (`hash_shares`). Only rank 0 logs,
prints and writes checkpoints' HF exports, manifests and eval results. Without torchrun every function here
is the single-process identity and no process group exists; torchrun with one process still shards (a world of 1),
which is how `train.cpu_offload` runs on a single GPU.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from tip_cli.config.schema import ConfigError, TipConfig, TrainConfig
from tip_cli.models import Pair, pick_device
from tip_cli.selection import quadrants, selectors
from tip_cli.selection.signal import Signal, signal_metrics
from tip_cli.train import precision

DCP_DIR = "dcp"  # inside checkpoints/step_N/: the sharded model + optimizer state (torch.distributed.checkpoint)


_JOB = {"joined": False, "owned": False}  # set by setup(): a torchrun job joined, and whether we made its group


def active() -> bool:
    """Whether this process is one rank of a torchrun job. A process group alone does not say so: vLLM's in-process
    engine creates a one-rank group of its own."""
    return _JOB["joined"] and dist.is_available() and dist.is_initialized()


def may_skip(n_kept: int) -> bool:
    """Whether a micro-batch with `n_kept` selected tokens may skip its forward and backward: only when nothing is
    kept and this is not a sharded rank (FSDP ranks must run every forward and backward alike)."""
    return n_kept == 0 and not active()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 logs, prints and writes the files every rank would otherwise write alike."""
    return rank() == 0


def setup(device_name: str) -> torch.device:
    """Join the torchrun job that RANK / WORLD_SIZE / LOCAL_RANK describe (NCCL for CUDA tensors, gloo for CPU ones)
    and return this rank's device; without those variables, no process group and the device of `train.device`.
    A process group that exists already (made by the caller) is used as it is."""
    device = pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
        _JOB["owned"] = True
    _JOB["joined"] = True
    return device


def teardown() -> None:
    """Leave the torchrun job; destroy the process group only if `setup` created it (a caller's is the caller's)."""
    if active() and _JOB["owned"]:
        _release_vllm_groups()
        if dist.is_initialized():
            dist.destroy_process_group()
    _JOB["joined"] = _JOB["owned"] = False


def _release_vllm_groups() -> None:
    """In torchrun mode vLLM builds its groups on this job's process group: they go first, or vLLM's own shutdown at
    exit destroys them after it ("Invalid process group specified"). A no-op where vLLM was never imported."""
    state = sys.modules.get("vllm.distributed.parallel_state")
    if state is not None:
        state.destroy_model_parallel()
        state.destroy_distributed_environment()  # vLLM's world group, then the default group


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check(cfg: TipConfig) -> None:
    """What a run needs of the launch, checked before any model is loaded."""
    world = world_size()
    if cfg.train.prompts_per_step % world:
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} does not split over {world} ranks: each rank "
            f"generates an equal slice of the step's prompts; use a multiple of {world}"
        )
    if cfg.train.cpu_offload and not active():
        raise ConfigError("train.cpu_offload=true offloads FSDP2 shards: launch with torchrun (--nproc_per_node 1 is fine)")


def my_slice(items: list) -> list:
    """This rank's contiguous share of a step's items, so rank order concatenates back to the single-process order."""
    share = len(items) // world_size()
    return items[rank() * share : (rank() + 1) * share]


def rank_seed(seed: int) -> int:
    """A per-rank seed for the step's global torch RNG (rank 0 keeps `seed`); rollouts take `derive_seed(seed, step, rank)`."""
    return seed + 1_000_000_007 * rank()


# ---------------------------------------------------------------------------------------------------------------------
# Sharding


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The model's transformer blocks, by the class names HF marks as not to be split (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"{type(model).__name__}: no decoder layers found to shard (its _no_split_modules is {sorted(names)})")
    return layers


def _fully_shard(model, mesh, offload, mp_policy=None) -> None:
    """Each decoder layer one FSDP2 unit; the root holds the rest (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = mp_policy or MixedPrecisionPolicy()
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, offload_policy=offload, mp_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=offload, mp_policy=policy)
    # tip runs a model as `base_model(...)` and then reads `lm_head.weight` itself (tip_cli.losses), never through
    # model.forward. FSDP2 gathers the root's parameters only around a forward of the root, so the base model's
    # forward is registered as one: gathered on entry, kept so through the loss (a root does not reshard after
    # forward), reduce-scattered and resharded after backward.
    base = model.base_model
    model.tip_base_forward = base.forward
    register_fsdp_forward_method(model, "tip_base_forward")
    base.forward = model.tip_base_forward


def shard(pair: Pair, cfg: TrainConfig) -> None:
    """FSDP2 on the student (optionally offloading shards, grads and optimizer state to CPU), gradients summed over
    ranks; with `train.shard_teacher` the teacher too (inference only). No-op without a process group."""
    if not active():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy

    if cfg.cpu_offload and pair.device.type != "cuda":
        raise ConfigError("train.cpu_offload=true moves shards off the GPU: it needs CUDA (on CPU they already are)")
    mesh = init_device_mesh(pair.device.type, (world_size(),))
    # bf16_mixed: fp32 shards and AdamW state, bf16 parameters in forward/backward, gradients reduced in fp32
    policy = precision.resolve(cfg.precision, "auto", pair.device).mp_policy()
    _fully_shard(pair.student, mesh, CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(), policy)
    for unit in pair.student.modules():
        if isinstance(unit, FSDPModule):
            # each rank's loss is already divided by the global token count, so ranks' gradients add up to the
            # single-process gradient; FSDP's default would divide that sum by the world size
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    if cfg.shard_teacher:
        _fully_shard(pair.teacher, mesh, OffloadPolicy())


@contextmanager
def gathered(model, engine) -> Iterator[None]:
    """The whole model unsharded inside the block, so `engine`'s generation (rollouts, evaluation) decodes without an
    all-gather per layer and token. Every rank enters it; HF generate then keeps ranks in step (synced_gpus), so all
    ranks must call it equally often. A plain (unsharded) model, or an engine with weights of its own (vLLM, synced
    after each step), passes through."""
    from torch.distributed.fsdp import FSDPModule

    units = [] if engine.own_weights else [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # FSDP's defaults: the root keeps its own


# ---------------------------------------------------------------------------------------------------------------------
# Selection over the global batch


@dataclass
class Selection:
    """The selected tokens of one step, and what the loss and the logs need of them."""

    stats: quadrants.TokenStats  # over the selection's scope: the global batch, or this rank's tokens (scope local)
    kept: torch.Tensor  # [K] indices into stats
    local: torch.Tensor  # [K_r] indices into this rank's N_r tokens: the ones its loss is built on
    normalizer: int  # the loss's divisor over all ranks: kept tokens (loss.norm=selected) or all tokens (total)
    metrics: dict[str, float]  # quadrants.stats_metrics, with global token counts


def _gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's x [sizes[r]] in rank order (padded to one length for the collective)."""
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def _all_sizes(*counts: int, device: torch.device) -> torch.Tensor:
    """Every rank's counts: [world, len(counts)] int64."""
    mine = torch.tensor(counts, dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return torch.stack(out).cpu()


def global_count(n: int) -> int:
    """n summed over the ranks of a torchrun job (n itself outside one)."""
    if not active():
        return n
    return int(_all_sizes(n, device=torch.device("cpu")).sum())


def select_tokens(
    entropy: torch.Tensor, divergence: torch.Tensor, seq_id: torch.Tensor, rows: int, cfg: TipConfig,
    generator: torch.Generator | None, signal: Signal | None = None, support: torch.Tensor | None = None,
) -> Selection:
    """Stats and selection for this rank's N_r tokens (entropy, divergence, seq_id and the optional support mass C
    [N_r]; `rows` sequences). C is gathered like H and D.

    `signal` (each token's loss and gradient norm, [N_r] each) is gathered like H and D; its SPEC 7a metrics join
    the selection's, over the same scope, and its grad_sq goes into the stats (the token samples' grad_norm).

    scope global (default): over the tokens of every rank, concatenated in rank order, which is the order one process
    holding the whole batch would have, so the kept set and the normaliser match it exactly. scope local: over this
    rank's tokens only (own normalisation, thresholds and budget; cheaper, no gather), the normaliser still global.
    """
    if active() and cfg.train.selection_scope == "global":
        sizes = _all_sizes(entropy.numel(), rows, device=entropy.device)  # [world, 2]: tokens, sequences
        tokens, seqs = sizes[:, 0].tolist(), sizes[:, 1].tolist()
        first_seq = sum(seqs[: rank()])
        stats = quadrants.compute_stats(
            _gather(entropy, tokens), _gather(divergence, tokens), _gather(seq_id + first_seq, tokens), cfg.importance.axis_spec(),
            None if support is None else _gather(support, tokens),
        )
        kept = selectors.select(stats, cfg.selector.spec(), cfg.budget, generator)  # [K], the same on every rank
        lo = sum(tokens[: rank()])
        local = kept[(kept >= lo) & (kept < lo + tokens[rank()])] - lo
        metrics = quadrants.stats_metrics(stats, kept)
        if signal is not None:
            signal = Signal(*(None if x is None else _gather(x, tokens)
                              for x in (signal.loss, signal.grad_sq, signal.topk_mass)))
        n, k = len(stats), kept.numel()
    else:
        if active() and generator is not None:  # independent noise per rank, as independent replicas would draw
            generator = torch.Generator(generator.device).manual_seed(generator.initial_seed() + rank())
        stats = quadrants.compute_stats(entropy, divergence, seq_id, cfg.importance.axis_spec(), support)
        kept = local = selectors.select(stats, cfg.selector.spec(), cfg.budget, generator)
        metrics = quadrants.stats_metrics(stats, kept)
        n, k = len(stats), kept.numel()
        if active():  # the counts (and so the loss normaliser) over all ranks; the other metrics are this rank's
            n, k = _all_sizes(n, k, device=entropy.device).sum(0).tolist()
            metrics |= {"tokens/total": float(n), "tokens/kept": float(k), "tokens/kept_frac": k / n if n else 0.0}
    if signal is not None:
        stats.grad_sq = signal.grad_sq
        metrics |= signal_metrics(stats, kept, signal)
    return Selection(stats, kept, local, max(1, k if cfg.loss.norm == "selected" else n), metrics)


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank (itself outside torchrun), so that all ranks take the same branch."""
    if not active():
        return bool(flag)
    box = torch.tensor([int(bool(flag))])  # on CPU, as global_count's: the job's group has gloo for CPU tensors
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return bool(box.item())


def merge_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One step's metrics over all ranks: each rank's share of the loss summed; rollout means averaged (ranks hold
    equal row counts); phase times and peak memory the slowest rank's, throughput too. Selection metrics are global
    already."""
    if not active():
        return metrics
    rows: list[dict[str, float]] = [{} for _ in range(world_size())]
    dist.all_gather_object(rows, metrics)
    out = dict(metrics)
    for key in metrics:
        values = [r[key] for r in rows]
        if key == "loss":
            out[key] = sum(values)
        elif key.startswith("rollout/"):
            out[key] = sum(values) / len(values)
        elif key.startswith("time/") or key == "perf/peak_mem_gb":
            out[key] = max(values)
        elif key == "perf/tokens_per_s":
            out[key] = min(values)
    return out


class RankShard:
    """An evaluation split over the ranks (tip_cli.eval.benchmark.Shard): rank r takes the contiguous rows
    [r * s, (r + 1) * s) with s = ceil(n / world), the last ranks' shares padded with copies of the last row to s,
    because HF generate on a sharded model keeps the ranks in step and so needs as many calls on each. Rank order
    concatenates the shares back to the row order, the padding last, where `gather` cuts it off."""

    def split(self, rows: list) -> list:
        share = -(-len(rows) // world_size())
        mine = rows[rank() * share : (rank() + 1) * share]
        return mine + rows[-1:] * (share - len(mine))

    def gather(self, out: list, n: int) -> list:
        parts: list[list] = [[] for _ in range(world_size())]
        dist.all_gather_object(parts, out)
        return [x for part in parts for x in part][:n]


def eval_shard() -> RankShard | None:
    """How this process evaluates a benchmark: its share under torchrun, every row without (None)."""
    return RankShard() if active() else None


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


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
    if not active():
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
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(student, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / DCP_DIR)
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # on rank 0
    if is_main():
        state = {"scheduler": scheduler.state_dict(), "world_size": world_size()}
        write_checkpoint(tmp, step, student, tokenizer, state, state_dict=_export(full, export_dtype))
    del full
    dist.barrier()  # every file is written: the ranks hash them in parallel, each its share
    sizes = checkpoint_files(tmp)
    mine = [name for name, owner in hash_shares(sizes, world_size()).items() if owner == rank()]
    hashed: list[dict] = [{} for _ in range(world_size())]
    dist.all_gather_object(hashed, file_entries(tmp, mine))
    if is_main():
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
    if written_by != (world_size() if active() else 0):
        wrote = f"{written_by} torchrun ranks" if written_by else "a run without torchrun"
        now = f"runs on {world_size()} torchrun ranks" if active() else "runs without torchrun"
        raise ConfigError(f"{ckpt.path} was written by {wrote}, but this run {now}; resume it as it was launched "
                          "(torchrun --nproc_per_node N), or start a new out_dir")
    if active():
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
