"""The parameter-space gradient probe (SPEC 7a): how far the budgeted step points from the full-token one.

Every `train.grad_probe_every` steps, once the budgeted loss's gradient g_B is accumulated and before clipping, one
more backward of the full-token loss over all N response tokens, divided by the same normaliser n, gives g_F. At the
logits g_B is then exactly the kept rows of g_F, so the two differ by the dropped tokens' gradient alone. Logged,
over all the student's parameters:

    grad/param_cosine     = <g_B, g_F> / (|g_B| |g_F|)
    grad/param_norm_ratio = |g_B| / |g_F|

g_B is set aside meanwhile (the same tensors, no copy) and put back, so the optimizer update is bit for bit the one
without the probe; the probe holds a second set of gradients while it runs. A step that keeps every token has no
probe: g_B = g_F by construction, and a logged 1 would read as a measurement. Nor does a step whose gradients are
not finite (the trainer skips its update).

Under FSDP2 each rank holds a shard of every gradient (a DTensor): <g_B, g_F>, |g_B|^2 and |g_F|^2 are the sums of
the ranks' local ones, all-reduced over the shards' group. A plain gradient is the whole of it on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

COSINE, NORM_RATIO = "grad/param_cosine", "grad/param_norm_ratio"


def due(every: int, step: int | None, metrics: dict[str, float]) -> bool:
    """Whether `step` probes: every `every` steps (0 = never), when the selection dropped some token. `metrics`
    holds the step's global token counts, so every rank decides alike."""
    return bool(every) and step is not None and step % every == 0 and metrics["tokens/kept"] < metrics["tokens/total"]


def inner_products(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> torch.Tensor:
    """(<a, b>, |a|^2, |b|^2) [3] float64 over paired gradients (None: zero), each product in at least fp32.

    DTensor shards contribute their local part, and the three sums are all-reduced over their group."""
    sums, group = [], None
    for x, y in zip(a, b, strict=True):
        if x is None and y is None:
            continue
        x, y = (torch.zeros_like(y) if x is None else x), (torch.zeros_like(x) if y is None else y)
        if hasattr(x, "to_local"):  # a DTensor: FSDP2's 1-D mesh over the ranks
            group = x.device_mesh.get_group()
            x, y = x.to_local(), y.to_local()
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, y = x.detach().flatten().to(dtype), y.detach().flatten().to(dtype)
        sums.append(torch.stack([torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)]).double())
    total = torch.stack(sums).sum(0) if sums else torch.zeros(3, dtype=torch.float64)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


def param_cosine(model: torch.nn.Module, accumulator, full_losses: Iterable[torch.Tensor]) -> dict[str, float]:
    """The probe, with g_B in the parameters' .grad: back-propagates `full_losses` (the full-token loss, one per
    micro-batch, in order; built lazily, so each forward runs after g_B is set aside) through `accumulator`
    (tip_cli.train.step.Accumulator), compares, and puts g_B back. Returns the two metrics, or {} when a norm is
    zero or a sum not finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    budgeted = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        for i, loss in enumerate(full_losses):
            accumulator.backward(i, loss)
        accumulator.total()
        dot, bb, ff = inner_products(budgeted, [p.grad for p in params]).tolist()
    finally:
        for p, g in zip(params, budgeted, strict=True):
            p.grad = g
    if not (math.isfinite(dot) and math.isfinite(bb) and math.isfinite(ff)) or bb <= 0 or ff <= 0:
        return {}
    return {COSINE: dot / math.sqrt(bb * ff), NORM_RATIO: math.sqrt(bb / ff)}
