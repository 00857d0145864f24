"""The student (and with parallel.shard_teacher the teacher) sharded with FSDP2 over the torchrun ranks, and gathered
whole for generation.

`shard` makes each decoder layer one FSDP2 unit and has FSDP *sum* the ranks' gradients (each rank's loss is already
divided by the global token count); `gathered` holds the whole model unsharded while an engine generates, so HF
decoding runs without per-layer all-gathers (vLLM keeps its own copy, refreshed by its `sync_weights`). Without a
process group both pass through (tip_cli.train.parallel.active).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tip_cli.config.schema import ConfigError, ParallelConfig
from tip_cli.models import Pair
from tip_cli.train import parallel, precision


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


def shard(pair: Pair, cfg: ParallelConfig, prec: precision.Precision) -> None:
    """FSDP2 on the student (optionally offloading shards, grads and optimizer state to CPU) under the run's
    precision, gradients summed over ranks; with `parallel.shard_teacher` the teacher too (inference only). No-op
    without a process group."""
    if not parallel.active():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy

    if cfg.cpu_offload and pair.device.type != "cuda":
        raise ConfigError("parallel.cpu_offload=true moves shards off the GPU: it needs CUDA (on CPU they already are)")
    mesh = init_device_mesh(pair.device.type, (parallel.world_size(),))
    # bf16_mixed: fp32 shards and AdamW state, bf16 parameters in forward/backward, gradients reduced in fp32
    policy = prec.mp_policy()
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
