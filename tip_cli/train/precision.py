"""Numeric precision of a run (`train.precision`): which dtype the student's weights and AdamW state are kept in,
and which dtype the forward and backward passes compute in.

    bf16_mixed  fp32 master weights and AdamW state, bf16 compute (autocast; under FSDP2 a MixedPrecisionPolicy
                with bf16 parameters and fp32 gradient reduction). The default on CUDA. The loss's [C, V] logits
                are bf16 GEMM outputs, its softmax and KL fp32; the lm_head gradient adds up in fp32 onto the
                master weight (tip_cli.losses.selected_token_loss).
    bf16        bf16 weights, AdamW state and compute. Half the memory of the weights and optimizer, but an AdamW
                update smaller than a weight's bf16 spacing (about |w| / 256) rounds away: at lr 1e-6 and weights of
                scale 0.02 almost no parameter changes. A warning says so below lr 1e-5.
    fp32        fp32 everywhere. The default on CPU.

The teacher is inference only: it is loaded in the compute dtype (or pair.dtype when set). Checkpoints' HF exports
are written in that dtype too, the dtype the pair is distributed in; the fp32 master weights ride along in the
trainer state (or the sharded checkpoint), so a resumed run continues from them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16_mixed", "bf16", "fp32")
PURE_BF16_MIN_LR = 1e-5  # below it most pure-bf16 AdamW updates round away (weights of scale 0.02)


@dataclass(frozen=True)
class Precision:
    mode: str  # bf16_mixed | bf16 | fp32
    master: torch.dtype  # the student's parameters and AdamW state
    compute: torch.dtype  # matmuls of the forward and backward passes
    pair: torch.dtype  # the teacher's weights and the HF export's

    @property
    def mixed(self) -> bool:
        return self.mode == "bf16_mixed"

    def autocast(self, device: torch.device, model: torch.nn.Module | None = None):
        """bf16 autocast for the student's passes under bf16_mixed; a no-op otherwise, and for an FSDP2 model, whose
        MixedPrecisionPolicy already computes in bf16."""
        if not self.mixed or _is_fsdp(model):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute)

    def mp_policy(self):
        """FSDP2's policy: bf16 parameters in forward and backward, gradients reduced and kept in fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.mixed:
            return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()


def _is_fsdp(model) -> bool:
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def resolve(mode: str, pair_dtype: str, device: torch.device) -> Precision:
    """The precision `train.precision` names on `device` (auto: bf16_mixed on CUDA, fp32 elsewhere); pair.dtype
    other than auto sets the teacher's and the export's dtype."""
    if mode not in PRECISIONS:
        raise ValueError(f"train.precision={mode!r}; expected one of: {', '.join(PRECISIONS)}")
    if mode == "auto":
        mode = "bf16_mixed" if device.type == "cuda" else "fp32"
    compute = torch.float32 if mode == "fp32" else torch.bfloat16
    master = torch.bfloat16 if mode == "bf16" else torch.float32
    pair = compute if pair_dtype == "auto" else getattr(torch, pair_dtype)
    return Precision(mode, master, compute, pair)


def warn_pure_bf16(prec: Precision, lr: float) -> None:
    """Pure bf16 at a small learning rate mostly does not train: say so once, with the fix."""
    if prec.mode == "bf16" and lr < PURE_BF16_MIN_LR:
        warnings.warn(
            f"train.precision=bf16 at optim.lr={lr:g}: AdamW updates below a weight's bf16 spacing (~|w|/256) "
            "round away, so most parameters will not change; use train.precision=bf16_mixed (fp32 master weights)",
            stacklevel=2,
        )
