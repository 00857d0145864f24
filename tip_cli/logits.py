"""What the loss and the teacher's side share: log-probs over the shared vocabulary from final hidden states and an
lm_head, the `Teacher` protocol the loss reads the teacher through, the `StatsSink` that collects each row's H, D
and learning signal as a pass computes them, and `compiled`, the torch.compile wrapper of the fused kernels.

tip_cli.losses (the selected-token loss) and tip_cli.teacher (its targets and the scoring pass) both build on this
module and not on each other. Torch and tip_cli.selection only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tip_cli.selection.scores import ScoreSpec
from tip_cli.selection.signal import Signal, topk_mass


def _logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """hidden @ weight[:vocab]^T, at least float32: [C, vocab]."""
    logits = hidden @ weight[:vocab].T
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, log_z: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight[:vocab]^T), at least float32. hidden [C, d], weight [V', d] -> [C, vocab].

    Without grad the log-softmax is taken in place over the logits: one [C, vocab] block instead of two; `log_z`
    [C], the rows' log-partition from an earlier pass over the same rows, saves computing it again.
    """
    logits = _logits(hidden, weight, vocab)
    if logits.requires_grad:
        return torch.log_softmax(logits, dim=-1)
    return logits.sub_((logits.logsumexp(-1) if log_z is None else log_z)[:, None])


@torch.no_grad()
def scored_logprobs(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs` and the rows' log-partition log sum_v exp(logit_v) [C], which the loss can reuse."""
    logits = _logits(hidden, weight, vocab)
    log_z = logits.logsumexp(-1)
    return logits.sub_(log_z[:, None]), log_z


@dataclass
class StatsSink:
    """Collects (H [C], D [C]) per loss chunk, D per `spec` (the importance divergence), in row order; with `signal`
    = the loss's (kind, beta), also each row's loss, squared logit-gradient norm at the distillation temperature and,
    when spec.topk restricts D of a dense teacher, the teacher's top-K mass (tip_cli.selection.signal)."""

    spec: ScoreSpec
    parts: list[tuple[torch.Tensor, torch.Tensor]]
    signal: tuple[str, float] | None = None
    signal_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([p[0] for p in self.parts]), torch.cat([p[1] for p in self.parts])

    def add_signal(self, loss: torch.Tensor, grad_sq: torch.Tensor, logp_t: torch.Tensor | None = None) -> None:
        """One chunk's (l [C], ||g||^2 [C]); logp_t [C, V], a dense teacher's log-probs, gives its top-K mass."""
        mass = topk_mass(logp_t, self.spec.topk) if logp_t is not None and self.spec.topk else None
        self.signal_parts.append((loss.float(), grad_sq.float(), mass))

    def signal_values(self) -> Signal | None:
        """The collected rows in order, or None when nothing was collected."""
        if not self.signal_parts:
            return None
        loss, grad_sq, mass = zip(*self.signal_parts, strict=True)
        return Signal(torch.cat(loss), torch.cat(grad_sq), None if mass[0] is None else torch.cat(mass))


class Teacher(Protocol):
    """The teacher's side of the loss for K rows (tip_cli.teacher.targets: DenseTeacher, TopKTeacher)."""

    dense: bool  # target(rows) is full-vocab log-probs [C, V] (a fresh tensor); then logits(rows) gives raw logits

    def __len__(self) -> int: ...
    def rows(self, index: torch.Tensor | slice) -> Teacher: ...
    def target(self, rows: slice): ...
    def logits(self, rows: slice) -> torch.Tensor: ...
    def divergence_to(self, logp_s: torch.Tensor, target, kind: str, beta: float) -> torch.Tensor: ...
    def stats_to(self, logp_s: torch.Tensor, target, spec: ScoreSpec) -> tuple[torch.Tensor, torch.Tensor]: ...
    def signal_to(self, logp_s: torch.Tensor, target, kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]: ...


@functools.cache
def compiled(fn):
    """`fn` under torch.compile, built on first use, with dynamic shapes: one graph serves every row count and
    vocabulary (a one-row chunk and each new dtype compile once more). A failure to compile (no working Triton or
    C++ compiler, say) stops the run with what to set instead."""
    from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit

    kernel = torch.compile(fn, dynamic=True, fullgraph=True)

    @functools.wraps(fn)
    def run(*args):
        try:
            return kernel(*args)
        except (BackendCompilerFailed, FailOnRecompileLimitHit) as err:
            raise RuntimeError(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                               "set loss.backend=eager to run the same formulas without compiling") from err

    return run
