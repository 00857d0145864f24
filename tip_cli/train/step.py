"""One training step (SPEC 1-5) on a rollout batch: teacher scoring -> token selection -> selected-token loss.

  2. the teacher runs on the same tokens; we keep its final hidden states at the N response positions [N, d_T]
     (its [N, V] log-probs are recomputed chunk by chunk where needed, never stored), or, with
     teacher.backend=vllm_topk (or vllm_server), its top-K log-probs [N, K] from a vLLM engine (or server);
  3. the student's entropy H and the teacher-student divergence D are computed for all N positions without grad,
     and the selector keeps K of them;
  4. the loss (SPEC section 1) is built only for the K kept positions (tip_cli.losses) and back-propagated.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tip_cli.config.schema import ConfigError, TipConfig
from tip_cli.losses import (
    DenseTeacher,
    LossSpec,
    StatsSink,
    Teacher,
    TopKTeacher,
    scored_logprobs,
    selected_token_loss,
)
from tip_cli.models import (
    Pair,
    final_hidden,
    head_weight,
)
from tip_cli.rollout.batch import Batch
from tip_cli.selection import selectors
from tip_cli.selection.quadrants import TokenStats
from tip_cli.selection.scores import token_stats_chunk
from tip_cli.tracking import timed
from tip_cli.train import parallel, precision
from tip_cli.train.chunks import chunk_rows


def valid_hidden(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Final hidden states at the response positions, row-major over [B, T], divided by `temperature`: [N, d].

    (h / T) W^T = logits / T, so every log-prob built from them (H, D, the loss) is that of softmax(logits / T).
    """
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)[batch.target_mask]
    return hidden if temperature == 1.0 else hidden / temperature


def student_hidden(pair: Pair, batch: Batch, temperature: float, prec: precision.Precision) -> torch.Tensor:
    """`valid_hidden` of the student in the compute dtype: its forward under bf16 autocast when bf16_mixed (fp32
    master weights); the lm_head matmuls of scoring and the loss then follow the hidden states' dtype."""
    with prec.autocast(pair.device, pair.student):
        return valid_hidden(pair.student, batch, temperature).to(prec.compute)


def distill_temperature(cfg: TipConfig) -> float:
    """The T of softmax(logits / T) that H, D and the loss compare, for both models: loss.temperature when set, else
    the distribution the rollouts were sampled from (rollout.temperature; 1 for greedy rollouts), as TRL's
    distillation losses do."""
    if cfg.loss.temperature is not None:
        return cfg.loss.temperature
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def _finite(*xs: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def skipped_step(n_tokens: int) -> tuple[dict, None, torch.Tensor]:
    """distill_step's result when H or D is not finite: no loss, no selection (a selector must never rank NaN)."""
    n = float(parallel.global_count(n_tokens))
    return {"loss": math.nan, "tokens/total": n, "tokens/kept": 0.0, "tokens/kept_frac": 0.0}, None, torch.zeros(0)


def micro_slices(batch: Batch, micro: int) -> list[tuple[Batch, int, int]]:
    """Split rows into micro-batches; each comes with the range [lo, hi) of its tokens in the flat [N] order."""
    counts = batch.target_mask.sum(1).tolist()
    out, lo = [], 0
    for start in range(0, batch.input_ids.shape[0], micro):
        hi = lo + sum(counts[start : start + micro])
        out.append((batch.rows(start, start + micro), lo, hi))
        lo = hi
    return out


@torch.no_grad()
def score(
    h_s: torch.Tensor, teacher: Teacher, pair: Pair, cfg: TipConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Teacher]:
    """Student entropy H [N] and divergence D [N] from the hidden states, chunk by chunk over [chunk, V].

    Also returns each row's student log-partition [N] and the teacher carrying its own (a dense teacher), so that
    the loss on the kept rows need not compute them again.
    """
    w_s = head_weight(pair.student).to(h_s.dtype)  # the compute dtype
    chunk = chunk_rows(cfg.importance.chunk_size, pair.vocab, h_s.device)
    ent, div, z_s, z_t = [], [], [], []
    for i in range(0, h_s.shape[0], chunk):
        rows = slice(i, i + chunk)
        logp_s, log_z = scored_logprobs(h_s[rows], w_s, pair.vocab)
        z_s.append(log_z)
        if isinstance(teacher, DenseTeacher):
            logp_t, log_z_t = teacher.scored_target(rows)
            z_t.append(log_z_t)
            h, d = token_stats_chunk(logp_s, logp_t, cfg.importance.score_spec(), consume=True)
            del logp_t
        else:
            h, d = teacher.stats(logp_s, rows, cfg.importance.score_spec())
        ent.append(h)
        div.append(d)
        del logp_s  # before the next chunk's logits, so that two chunks' blocks are never alive together
    if z_t:
        teacher = replace(teacher, log_z=_cat(z_t))
    return _cat(ent), _cat(div), _cat(z_s), teacher


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def teacher_targets(
    pair: Pair, batch: Batch, parts: list[tuple[Batch, int, int]], scorer=None, temperature: float = 1.0
) -> Teacher:
    """The teacher's view of the N response positions: its hidden states (divided by `temperature`), or top-K
    log-probs from `scorer` (at T = 1 only: tip_cli.train.loop.check_temperature)."""
    if scorer is not None:  # a VLLMTeacher
        lengths = batch.attention_mask.sum(1).tolist()
        seqs = [row[:n] for row, n in zip(batch.input_ids.tolist(), lengths, strict=True)]
        positions = [m.nonzero()[:, 0].tolist() for m in batch.target_mask.cpu()]
        ids, logp = scorer.topk_logprobs(seqs, positions)
        return TopKTeacher(ids.to(pair.device), logp.to(pair.device))
    hidden = torch.cat([valid_hidden(pair.teacher, mb, temperature) for mb, _, _ in parts])  # [N, d_T]
    return DenseTeacher(hidden, head_weight(pair.teacher), pair.vocab)


def loss_spec(cfg: TipConfig, pair: Pair, normalizer: float) -> LossSpec:
    """The loss group of `cfg` as the method's plain arguments, over the pair's shared vocabulary."""
    chunk = chunk_rows(cfg.loss.chunk_size, pair.vocab, pair.device)
    return LossSpec(pair.vocab, cfg.loss.kind, cfg.loss.jsd_beta, chunk, normalizer)


def distill_step(
    pair: Pair, batch: Batch, cfg: TipConfig, generator: torch.Generator, metrics: dict, scorer=None
) -> tuple[dict, TokenStats, torch.Tensor]:
    """Teacher scoring, selection, and the loss's backward for one rollout batch.

    Returns the step's statistics, the per-token stats [N] and the kept indices [K]; under torchrun, those of the
    global batch (tip_cli.train.parallel), while the loss is built on this rank's share of the kept tokens. `scorer`
    (a VLLMTeacher or ServerTeacher) replaces the in-process teacher when teacher.backend=vllm_topk or vllm_server.

    With a single micro-batch the student's forward with grad also provides the scores (no second pass); with
    several, a no-grad scoring pass runs first, because the budget is global over the whole rollout batch. When the
    selector keeps every token anyway (selectors.keeps_all), there is no scoring pass: the loss pass computes each
    row's H and D from the log-probs it has in hand, and selection runs afterwards, for the statistics only.

    H, D and the loss compare softmax(logits / T) of both models, T = distill_temperature(cfg). The student's passes
    compute under the run's precision (tip_cli.train.precision: bf16 autocast under bf16_mixed). When H or D is not
    finite the step stops before selection (stats None, loss NaN) and the trainer skips its update.
    """
    prec = precision.resolve(cfg.train.precision, cfg.pair.dtype, pair.device)
    temp = distill_temperature(cfg)
    micro = cfg.train.micro_batch_size or batch.input_ids.shape[0]
    parts = micro_slices(batch, micro)
    with timed("time/teacher", metrics):
        teacher = teacher_targets(pair, batch, parts, scorer, temp)
    seq_id = batch.target_mask.nonzero()[:, 0]  # [N]
    if selectors.keeps_all(cfg.selector.spec(), cfg.budget):
        return _full_token_step(pair, batch, parts, teacher, seq_id, cfg, generator, metrics, temp, prec)
    fused = len(parts) == 1
    with timed("time/train", metrics):
        h_fused = student_hidden(pair, batch, temp, prec) if fused else None  # [N, d_S], with grad
    with timed("time/select", metrics):
        if fused:
            h_s_scores = h_fused.detach()
        else:
            with torch.no_grad():
                h_s_scores = torch.cat([student_hidden(pair, mb, temp, prec) for mb, _, _ in parts])
        ent, div, log_z_s, teacher = score(h_s_scores, teacher, pair, cfg)
        if not parallel.all_true(_finite(ent, div)):  # every rank skips together
            return skipped_step(ent.numel())
        # stats, selection and the loss normaliser over every rank's tokens under torchrun; this batch's otherwise
        sel = parallel.select_tokens(ent, div, seq_id, batch.input_ids.shape[0], cfg, generator)
        kept = sel.local.to(pair.device)  # [K_r], indices into this batch's N tokens
        del h_s_scores
    normalizer = sel.normalizer
    loss_total = 0.0
    with timed("time/train", metrics):
        for mb, lo, hi in parts:
            local = kept[(kept >= lo) & (kept < hi)]
            if local.numel() == 0 and not parallel.active():  # sharded ranks run every forward and backward alike
                continue
            h_s = h_fused if fused else student_hidden(pair, mb, temp, prec)
            loss = selected_token_loss(
                h_s[local - lo], head_weight(pair.student), teacher.rows(local), loss_spec(cfg, pair, normalizer),
                log_z=log_z_s[local],
            )
            loss.backward()
            loss_total += loss.item()
    return {"loss": loss_total, **sel.metrics}, sel.stats, sel.kept.cpu()


def _full_token_step(
    pair: Pair, batch: Batch, parts: list[tuple[Batch, int, int]], teacher: Teacher, seq_id: torch.Tensor,
    cfg: TipConfig, generator: torch.Generator, metrics: dict, temp: float, prec: precision.Precision,
) -> tuple[dict, TokenStats, torch.Tensor]:
    """distill_step when every token is kept: one loss pass over all N rows that also yields their (H, D)."""
    normalizer = max(1, parallel.global_count(int(seq_id.numel())))  # N = K: either loss.norm divides by it
    sink = StatsSink(cfg.importance.score_spec(), [])
    loss_total = 0.0
    with timed("time/train", metrics):
        for mb, lo, hi in parts:
            loss = selected_token_loss(
                student_hidden(pair, mb, temp, prec), head_weight(pair.student), teacher.rows(slice(lo, hi)),
                loss_spec(cfg, pair, normalizer), sink,
            )
            loss.backward()
            loss_total += loss.item()
    with timed("time/select", metrics):
        ent, div = sink.tensors() if sink.parts else (torch.zeros(0, device=pair.device),) * 2
        if not parallel.all_true(_finite(ent, div)):
            return skipped_step(ent.numel())
        sel = parallel.select_tokens(ent, div, seq_id, batch.input_ids.shape[0], cfg, generator)
    if sel.kept.numel() != len(sel.stats):
        raise RuntimeError(f"selector {cfg.selector.name} at budget {cfg.budget} kept {sel.kept.numel()} of "
                           f"{len(sel.stats)} tokens, but the loss was built on all of them")
    return {"loss": loss_total, **sel.metrics}, sel.stats, sel.kept.cpu()


def check_temperature(cfg: TipConfig) -> None:
    """A vLLM top-K teacher (in process or a server) returns log-probs at T = 1, which cannot be re-tempered
    without the rest of the vocabulary."""
    if cfg.teacher.backend in ("vllm_topk", "vllm_server") and distill_temperature(cfg) != 1.0:
        raise ConfigError(
            f"teacher.backend={cfg.teacher.backend} scores at temperature 1, but H, D and the loss would compare "
            f"softmax(logits / {distill_temperature(cfg)}) (rollout.temperature={cfg.rollout.temperature}); "
            "set loss.temperature=1 or use teacher.backend=hf"
        )
