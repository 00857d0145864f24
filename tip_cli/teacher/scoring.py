"""The scoring pass (SPEC 2-3): the student's entropy H and the teacher-student divergence D at every response
position, without grad, chunk by chunk over [chunk, V] log-probs, before the selector picks the rows to train on."""

from __future__ import annotations

from dataclasses import replace

import torch

from tip_cli.losses import compiled, scored_logprobs
from tip_cli.selection.scores import ScoreSpec, stats_from_logits, token_stats_chunk
from tip_cli.teacher.targets import DenseTeacher, Teacher


@torch.no_grad()
def score(
    h_s: torch.Tensor, w_s: torch.Tensor, teacher: Teacher, vocab: int, chunk: int, spec: ScoreSpec,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Teacher]:
    """H [N] and D [N] (per `spec`) of log softmax(h_s w_s[:vocab]^T) against the teacher, `chunk` rows at a time.

    Also returns each row's student log-partition [N] and the teacher carrying its own (a dense teacher), so that
    the loss on the kept rows need not compute them again. `fused`: the default D (reverse KL, full vocabulary)
    against a dense teacher comes from one torch.compile'd kernel over both models' logits (stats_from_logits).
    """
    ent, div, z_s, z_t = [], [], [], []
    fused = fused and isinstance(teacher, DenseTeacher) and spec.plain_reverse_kl
    for i in range(0, h_s.shape[0], chunk):
        rows = slice(i, i + chunk)
        if fused:
            h, d, log_z, log_z_t = compiled(stats_from_logits)(h_s[rows] @ w_s[:vocab].T, teacher.logits(rows))
            for out, part in ((ent, h.float()), (div, d.float()), (z_s, log_z), (z_t, log_z_t)):
                out.append(part)
            continue
        logp_s, log_z = scored_logprobs(h_s[rows], w_s, vocab)
        z_s.append(log_z)
        if isinstance(teacher, DenseTeacher):
            logp_t, log_z_t = teacher.scored_target(rows)
            z_t.append(log_z_t)
            h, d = token_stats_chunk(logp_s, logp_t, spec, consume=True)
            del logp_t
        else:
            h, d = teacher.stats(logp_s, rows, spec)
        ent.append(h)
        div.append(d)
        del logp_s  # before the next chunk's logits, so that two chunks' blocks are never alive together
    if z_t:
        teacher = replace(teacher, log_z=_cat(z_t))
    return _cat(ent), _cat(div), _cat(z_s), teacher


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0)
