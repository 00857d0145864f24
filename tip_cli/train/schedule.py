"""What a step trains on and how it updates: the prompts of each step, the optimizer and the lr schedule."""

from __future__ import annotations

import math

import torch

from tip_cli.config.schema import OptimConfig
from tip_cli.seeds import stream_seed


def prompt_indices(num_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompts of a step: consecutive slices of a per-epoch shuffle, so a resumed run sees the same prompts."""
    perms: dict[int, list[int]] = {}  # one shuffle per epoch the step touches (usually one)
    out = []
    for pos in range((step - 1) * per_step, step * per_step):
        epoch, offset = divmod(pos, num_prompts)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(stream_seed(seed, epoch))
            perms[epoch] = torch.randperm(num_prompts, generator=gen).tolist()
        out.append(perms[epoch][offset])
    return out


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over `params`. When every parameter is on CUDA, the fused kernel: torch's
    default there (foreach) computes sqrt(v) for a whole parameter group into new tensors, a temporary as large as
    the (local shards of the) weights; fused updates each parameter in place in one kernel. Elsewhere (CPU, shards
    offloaded to CPU) torch's default, the per-parameter loop."""
    params = list(params)
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if on_cuda else None)


def lr_lambda(o: OptimConfig, steps: int):
    """The lr's factor at a step: linear warmup over optim.warmup_steps, then optim.lr_schedule to `steps`
    (train.steps)."""

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        if o.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if o.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, o: OptimConfig,
                   steps: int) -> None:
    """After restoring a checkpoint's optimizer and scheduler, put this config's lr, weight decay and schedule in
    force at the restored step: lr = optim.lr * lr_lambda(step). With the config that wrote the checkpoint this
    is the value restored; after `train.resume=override` it is the new one."""
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    factor = lr_lambda(o, steps)
    scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = o.lr, o.weight_decay
        group["lr"] = o.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
