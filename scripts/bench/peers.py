"""One training step's forward, loss and backward as each compared trainer takes it, on the same pair and tokens:
naive full-logit KD, TRL's DistillationTrainer loss, Liger's fused linear JSD and tip's `distill_step`. All use the
reverse KL (TRL's and Liger's generalised JSD at beta = 1), so their first losses agree. Each returns the loss; a
step function takes (pair, batch, meter, times) and may note phase peaks and seconds in `times`."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from tip_cli.models import Pair, head_weight, response_hidden
from tip_cli.rollout.batch import Batch
from tip_cli.train import recipe
from tip_cli.train import step as train_step

if TYPE_CHECKING:
    from .measure import Meter


def naive_loss(pair: Pair, batch: Batch, meter: Meter, times: dict) -> float:
    """What a generic KD trainer does: full [B, T, V] logits of both models, log-softmax and reverse KL over all of
    them, then the mean over response positions."""
    v = pair.vocab
    ids, attn = batch.input_ids, batch.attention_mask
    logits_s = pair.student(input_ids=ids, attention_mask=attn, use_cache=False).logits[..., :v]  # [B, T, V]
    with torch.no_grad():
        logits_t = pair.teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits[..., :v]  # [B, T, V]
    logp_s, logp_t = logits_s.float().log_softmax(-1), logits_t.float().log_softmax(-1)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)  # [B, T]
    loss = kl[batch.target_mask].mean()
    loss.backward()
    return loss.item()


def tip_runner(cfg):
    """tip's `distill_step` as the trainer calls it; the loss phase starts when it calls the selected-token loss."""
    step, specs = 0, {}

    def run(pair: Pair, batch: Batch, meter: Meter, times: dict) -> float:
        nonlocal step
        step += 1
        spec = specs.get(pair.device) or specs.setdefault(pair.device, recipe.specs(cfg, pair.device).step)
        generator = torch.Generator().manual_seed(step)
        loss_fn = train_step.selected_token_loss

        def marked(*args, **kwargs):
            if "pre_loss_peak" not in times:
                times["pre_loss_peak"] = meter.peak()
                meter.reset()
            return loss_fn(*args, **kwargs)

        train_step.selected_token_loss = marked  # a probe only: the call goes through unchanged
        try:
            stats, _, kept = train_step.distill_step(pair, batch, spec, generator, times)
        finally:
            train_step.selected_token_loss = loss_fn
        times["kept"] = int(kept.numel())
        return stats["loss"]

    return run


def trl_runner(pair: Pair):
    """TRL's DistillationTrainer loss (`_compute_loss`: both backbones, then the chunked generalised JSD over the
    completion positions; beta=1 is reverse KL, as tip and naive use), on a trainer instance that holds just the
    attributes that method reads (`__init__` needs a tokenizer, a dataset and a generation setup, none of which the
    loss touches)."""
    from accelerate import Accelerator
    from trl.models.utils import _ForwardRedirection
    from trl.trainer.distillation_trainer import DistillationTrainer

    t = object.__new__(DistillationTrainer)
    t.model, t.teacher_model = pair.student, pair.teacher
    t.accelerator = Accelerator(cpu=pair.device.type == "cpu")
    t.model_kwarg_keys = inspect.signature(pair.student.forward).parameters.keys()
    t._is_vlm = False
    t._forward_redirection = _ForwardRedirection()
    t.beta, t.temperature = 1.0, 1.0

    def run(pair: Pair, batch: Batch, meter: Meter, times: dict) -> float:
        p = batch.input_ids.shape[1] - int(batch.target_mask[0].sum())  # every row: same prompt length, no padding
        inputs = {
            "prompt_ids": batch.input_ids[:, :p], "prompt_mask": batch.attention_mask[:, :p].long(),
            "completion_ids": batch.input_ids[:, p:], "completion_mask": batch.attention_mask[:, p:].long(),
        }
        loss, _, _ = t._compute_loss(pair.student, inputs, None)
        loss.backward()
        return loss.item()

    return run


def liger_loss(pair: Pair, batch: Batch, meter: Meter, times: dict) -> float:
    """Liger-Kernel's fused linear JSD (Triton, GPU only) with beta=1 (reverse KL) on the response positions.
    liger-kernel >= 0.8 takes `shift_labels` (positions to ignore) as a fifth argument; None = every row counts."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    h_s = response_hidden(pair.student, batch)  # [N, d_S]
    with torch.no_grad():
        h_t = response_hidden(pair.teacher, batch)  # [N, d_T]
    v = pair.vocab
    jsd = LigerFusedLinearJSD(jsd_beta=1.0)
    loss = jsd(h_s, head_weight(pair.student)[:v], h_t, head_weight(pair.teacher)[:v], None)
    loss.backward()
    return loss.item()
