"""The FLOP model of one benchmark step: the backbones' weight matmuls, their attention, and the lm_head + loss,
whose share of a full-token step bounds what a token budget can save (`budget_ceiling`)."""

from __future__ import annotations

from tip_cli.selection.selectors import budget_count
from tip_cli.toy.sft import ModelSpec

from .presets import Bench, Mode


def backbone_params(spec: ModelSpec) -> int:
    """Weights of the decoder layers (q, k, v, o and the SwiGLU MLP; norms left out): the matmuls every token of
    the sequence pays for, unlike the embedding (a lookup) and the lm_head (only where logits are needed)."""
    attention = spec.hidden * spec.head_dim * 2 * (spec.heads + spec.kv_heads)
    return spec.layers * (attention + 3 * spec.hidden * spec.intermediate)


def total_params(spec: ModelSpec, vocab: int) -> int:
    return backbone_params(spec) + vocab * spec.hidden * (1 if spec.tie_embeddings else 2)


def kept_count(mode: Mode, n: int) -> int:
    """K of n response tokens: the selector's budget count (SPEC 5), every token for selector=all."""
    return n if mode.kind != "tip" or mode.selector == "all" else budget_count(n, mode.budget)


def flop_parts(mode: Mode, bench: Bench) -> dict:
    """FLOP estimate of one step of `mode`: the backbones' weight matmuls, their attention, and the lm_head + loss
    (2 FLOPs a multiply-add; a backward pass costs twice its forward):

        backbone  = (6 + 2c) P_S T + 2 P_T T             (student forward + backward, teacher forward)
        attention = (3 + c) A_S + A_T,   A = 2 L h d_head T_row^2 B   (q k^T and p v over the causal half)
        head      = 6 R V d_S + 2 R V d_T                (student lm_head forward + backward, teacher forward)
        tip, budget < 1:  2 N V (d_S + d_T)  +  6 K V d_S + 2 K V d_T    (scoring all N rows without grad, then
                                                                          the loss on the K kept rows)

    P = backbone_params; T = B (prompt + seq) tokens through the backbones; R = the rows a mode projects (N = B seq
    response rows for tip and Liger; all T for naive and for TRL, whose model call forms every position's logits);
    c = 1 with gradient checkpointing (the student's forward again
    in backward). The elementwise softmax/KL work, about 10 V a row, is left out (under 1% of 8 V d for d >= 128).
    So the lm_head + loss share of a full-token step, f = head / (backbone + head), bounds what a budget b can save:
    at best f (1 - b), were scoring free; tip's scoring pass costs 2 N V (d_S + d_T) of it back.
    """
    s, t, v, c = bench.student, bench.teacher, bench.vocab, int(bench.grad_checkpointing)
    row = bench.prompt + bench.seq
    tokens, n = bench.batch * row, bench.tokens

    def attention(spec: ModelSpec) -> float:
        return 2 * spec.layers * spec.heads * spec.head_dim * row**2 * bench.batch

    backbone = ((6 + 2 * c) * backbone_params(s) + 2 * backbone_params(t)) * tokens
    per_row = 6 * v * s.hidden + 2 * v * t.hidden
    if mode.kind in ("naive", "trl"):
        head = per_row * tokens
    elif mode.kind == "tip" and kept_count(mode, n) < n:
        head = 2 * n * v * (s.hidden + t.hidden) + per_row * kept_count(mode, n)
    else:
        head = per_row * n
    return {"backbone": backbone, "attention": (3 + c) * attention(s) + attention(t), "head": head}


def step_flops(mode: Mode, bench: Bench) -> dict:
    """The step's estimated FLOPs, those of the lm_head + loss, and their share (flop_parts)."""
    parts = flop_parts(mode, bench)
    total = sum(parts.values())
    return {"step_flops": total, "head_flops": parts["head"], "head_share": parts["head"] / total}


def budget_ceiling(bench: Bench, budgets) -> dict:
    """What a budget can save at best (free scoring) and what tip's scoring leaves, from `step_flops`."""
    full = step_flops(Mode("tip"), bench)
    share = full["head_share"]
    return {
        "head_share_full_token": share,
        "best_case_step_x_full": {str(b): 1 - share * (1 - b) for b in budgets},
        "tip_step_x_full": {str(b): step_flops(Mode("tip", "soft_or", b), bench)["step_flops"] / full["step_flops"]
                            for b in budgets},
    }
