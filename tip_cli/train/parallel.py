"""Scale-out over torchrun ranks: the process group, each rank's share of the work, and what the ranks exchange.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK set) every rank, each step:
  1. generates the rollouts of its contiguous slice of the step's prompts (`my_slice`), the student gathered for the
     duration (tip_cli.train.sharding: FSDP2);
  2. runs the teacher (a full replica by default, no grads, no optimizer) and the sharded student on its own rows;
  3. all-gathers the compact per-token scores H, D [N_r] (`select_tokens`: tip_cli.selection.global_select with this
     job's gathers), so the normalisation, the quadrant thresholds and the top-K budget are computed over the global
     batch, identically on every rank, and keeps the selected indices that fall in its own slice;
  4. divides its loss by the global kept (or total) count and has FSDP *sum* the gradients across ranks (its
     default is the mean), so the summed loss and the step equal one process on the whole batch.
An evaluation is split over the ranks (`RankShard`: each generates and grades its share of the benchmark, the
records are gathered); checkpoints are written and resumed by tip_cli.train.checkpoints. Only rank 0 logs, prints
and writes the files every rank would otherwise write alike. Without torchrun every function here is the
single-process identity and no process group exists; torchrun with one process still shards (a world of 1), which
is how `parallel.cpu_offload` runs on a single GPU.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from tip_cli.config.schema import ConfigError, ParallelConfig, TrainConfig
from tip_cli.models import pick_device
from tip_cli.selection import global_select
from tip_cli.selection.global_select import Selection
from tip_cli.selection.signal import Signal
from tip_cli.train.spec import SelectionSpec

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


def check(train: TrainConfig, par: ParallelConfig) -> None:
    """What a run needs of the launch, checked before any model is loaded."""
    world = world_size()
    if train.prompts_per_step % world:
        raise ConfigError(
            f"train.prompts_per_step={train.prompts_per_step} does not split over {world} ranks: each rank "
            f"generates an equal slice of the step's prompts; use a multiple of {world}"
        )
    if par.cpu_offload and not active():
        raise ConfigError("parallel.cpu_offload=true offloads FSDP2 shards: launch with torchrun (--nproc_per_node 1 is fine)")


def my_slice(items: list) -> list:
    """This rank's contiguous share of a step's items, so rank order concatenates back to the single-process order."""
    share = len(items) // world_size()
    return items[rank() * share : (rank() + 1) * share]


def rank_seed(seed: int) -> int:
    """A per-rank seed for the step's global torch RNG (rank 0 keeps `seed`); rollouts take `derive_seed(seed, step, rank)`."""
    return seed + 1_000_000_007 * rank()


# ---------------------------------------------------------------------------------------------------------------------
# Selection over the global batch: tip_cli.selection.global_select, with torch.distributed's gathers


def _gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's x [sizes[r], ...] in rank order along the first dim (padded to one length for the
    collective)."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
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


def ranks() -> global_select.Ranks:
    """This process among the ranks, as global selection takes it: the job's all-gathers, or the identity."""
    return global_select.Ranks(rank(), _all_sizes, _gather) if active() else global_select.ONE


def select_tokens(
    entropy: torch.Tensor, divergence: torch.Tensor, seq_id: torch.Tensor, rows: int, spec: SelectionSpec,
    generator: torch.Generator | None, signal: Signal | None = None, support: torch.Tensor | None = None,
) -> Selection:
    """global_select.select_tokens for this rank's N_r tokens (entropy, divergence, seq_id and the optional support
    mass C [N_r]; `rows` sequences) under `spec`: the axes, the selector, the budget, the rank scope and the loss's norm."""
    return global_select.select_tokens(
        entropy, divergence, seq_id, rows, spec.axis, spec.selector, spec.budget, generator, signal,
        rank_scope=spec.rank_scope, norm=spec.norm, ranks=ranks(), support=support,
    )



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
