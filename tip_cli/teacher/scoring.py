"""The scoring pass (SPEC 2-3): the student's entropy H and the teacher-student divergence D at every response
position (and, for the teachability selector, the support mass C), without grad, chunk by chunk over [chunk, V]
log-probs, before the selector picks the rows to train on."""

from __future__ import annotations

from dataclasses import replace

import torch

from tip_cli.logits import StatsSink, Teacher, compiled, scored_logprobs
from tip_cli.selection.scores import ScoreSpec, stats_from_logits, support_mass, token_stats_chunk
from tip_cli.selection.signal import entropy_reverse_kl_signal, stats_signal_from_logits
from tip_cli.teacher.targets import DenseTeacher


@torch.no_grad()
def score(
    h_s: torch.Tensor, w_s: torch.Tensor, teacher: Teacher, vocab: int, chunk: int, spec: ScoreSpec,
    fused: bool = False, signal: StatsSink | None = None, support_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, Teacher]:
    """H [N] and D [N] (per `spec`) of log softmax(h_s w_s[:vocab]^T) against the teacher, `chunk` rows at a time.

    With `support_k` = k, also C [N] = sum_{v in top-k of p_S} p_T(v) (scores.support_mass; None without): exact
    against a dense teacher; against a top-K teacher the mass of the student's top k that the teacher's list holds,
    a lower bound (scores.topk_support_mass). Also returns each row's student log-partition [N] and the teacher
    carrying its own (a dense teacher), so that the loss on the kept rows need not compute them again. `fused`: the
    default D (reverse KL, full vocabulary) against a dense teacher comes from one torch.compile'd kernel over both
    models' logits (stats_from_logits).
    `signal`, a StatsSink whose `signal` names the loss's (kind, beta), collects each row's loss and squared
    logit-gradient norm (tip_cli.selection.signal) from the same log-probs.
    """
    ent, div, sup, z_s, z_t = [], [], [], [], []
    want = signal is not None and signal.signal is not None
    reverse = not want or signal.signal[0] == "reverse_kl" or (signal.signal[0] == "jsd" and signal.signal[1] >= 1.0)
    fused = fused and isinstance(teacher, DenseTeacher) and spec.plain_reverse_kl and reverse
    for i in range(0, h_s.shape[0], chunk):
        rows = slice(i, i + chunk)
        if fused:
            z_rows = (h_s[rows] @ w_s[:vocab].T, teacher.logits(rows))
            if want:
                h, d, log_z, log_z_t, g2 = compiled(stats_signal_from_logits)(*z_rows)
                signal.add_signal(d, g2)
            else:
                h, d, log_z, log_z_t = compiled(stats_from_logits)(*z_rows)
            if support_k:
                sup.append(support_mass(*z_rows, support_k, log_z_t))
            for out, part in ((ent, h.float()), (div, d.float()), (z_s, log_z), (z_t, log_z_t)):
                out.append(part)
            continue
        logp_s, log_z = scored_logprobs(h_s[rows], w_s, vocab)
        z_s.append(log_z)
        if isinstance(teacher, DenseTeacher):
            logp_t, log_z_t = teacher.scored_target(rows)
            z_t.append(log_z_t)
            if support_k:  # before the divergence below consumes both log-probs
                sup.append(support_mass(logp_s, logp_t, support_k))
            if want and reverse and spec.plain_reverse_kl and logp_s.dtype == logp_t.dtype == torch.float32:
                h, d, g2 = entropy_reverse_kl_signal(logp_s, logp_t)  # D is the loss: one pass gives all three
                signal.add_signal(d, g2)
            else:
                if want:
                    signal.add_signal(*teacher.signal_to(logp_s, logp_t, *signal.signal), logp_t)
                h, d = token_stats_chunk(logp_s, logp_t, spec, consume=True)
            del logp_t
        else:
            h, d = teacher.stats(logp_s, rows, spec)
            if support_k:
                sup.append(teacher.support_mass(logp_s, rows, support_k))
            if want:
                signal.add_signal(*teacher.signal_to(logp_s, teacher.target(rows), *signal.signal))
        ent.append(h)
        div.append(d)
        del logp_s  # before the next chunk's logits, so that two chunks' blocks are never alive together
    if z_t:
        teacher = replace(teacher, log_z=_cat(z_t))
    return _cat(ent), _cat(div), _cat(sup) if support_k else None, _cat(z_s), teacher


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0)
