"""Peak memory, step time and tokens/s of one OPD training step: naive full-logit KD vs TRL vs Liger vs tip (by
budget), with a FLOP estimate of the lm_head + loss share of each step (`flop_parts`).

Every mode runs one full step (forward, scoring + selection where it has one, loss, backward, AdamW step) on the
same random-init models and tokens, each in its own subprocess so that its peak is its own. Memory, per step:

    peak      = peak over the whole step      - the model-only baseline (RSS or CUDA allocated once models exist)
    loss+bwd  = peak over loss and backward   - the memory held when the step starts (models + AdamW state)

tip's loss+bwd phase starts when `distill_step` calls the selected-token loss (after scoring and selection); the
naive, TRL and Liger steps have no scoring, so theirs is the whole forward + loss + backward. On CPU the peaks are the
kernel's VmHWM (reset per phase via /proc/self/clear_refs) with MALLOC_MMAP_THRESHOLD_ set, so that glibc returns
freed tensors to the OS and RSS tracks live tensors; on CUDA they are max_memory_allocated.

The random pair is built directly on the device in the compute dtype (no fp32 CPU copy first). `--shape` names
it: a preset pair (`toy`: the 20M-parameter pair of `make bench`, nearly all lm_head; `small`: a pair with Qwen3's
proportions of backbone to lm_head, a few minutes on CPU; `qwen3`: the real shapes) or `STUDENT:TEACHER` of the
model presets (e.g. `qwen3-1.7b:qwen3-8b`). `--precision` is fp32, bf16 (weights and AdamW in bf16) or
bf16_mixed (fp32 weights, forward and loss under bf16 autocast); `--grad-checkpointing` recomputes the student's
layers in backward in every mode alike.

    python scripts/bench_memory.py                      # default: the toy shape, 2048 response tokens
    python scripts/bench_memory.py --shape small --budgets 0.5,0.1 --selectors soft_or --chunks default
    python scripts/bench_memory.py --shape qwen3-1.7b:qwen3-8b --precision bf16   # 2 x 4096 tokens, one GPU
    python scripts/bench_memory.py --model Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-1.7B
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tip_cli.cli import compose_config
from tip_cli.models import Pair, enable_checkpointing, head_weight, pick_device, response_hidden
from tip_cli.rollout.batch import Batch, pack
from tip_cli.toy import build as toy_build
from tip_cli.toy.sft import ModelSpec
from tip_cli.train import step as train_step
from tip_cli.train.chunks import chunk_rows

FULL = "full"  # loss chunk >= N: the loss holds all K kept rows at once (its O(K x V) regime)
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: big buffers via mmap, returned to the OS on free


QWEN3_VOCAB = 151_936
# Random-init model presets (Qwen3 architecture). The Qwen3 rows are the published configs' sizes.
MODELS: dict[str, ModelSpec] = {
    "toy-student": toy_build.STUDENT,
    "toy-teacher": toy_build.TEACHER,
    # Qwen3-1.7B / Qwen3-8B scaled down 8x in width (and the vocabulary 37x), so that the lm_head and loss are about
    # the same share of the step's FLOPs as at the real shapes (12% vs 11%, step_flops), unlike the toy pair (92%)
    "small-student": ModelSpec(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=768),
    "small-teacher": ModelSpec(hidden=512, layers=6, heads=8, kv_heads=2, intermediate=1536, tie_embeddings=False),
    "qwen3-0.6b": ModelSpec(hidden=1024, layers=28, heads=16, kv_heads=8, intermediate=3072, head_dim=128),
    "qwen3-1.7b": ModelSpec(hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144, head_dim=128),
    "qwen3-4b": ModelSpec(hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728, head_dim=128),
    "qwen3-8b": ModelSpec(hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, head_dim=128,
                          tie_embeddings=False),
}


@dataclass(frozen=True)
class Preset:
    """A named pair and the defaults it runs at (each can be overridden on the command line)."""

    pair: str  # STUDENT:TEACHER of MODELS
    vocab: int
    seq: int  # response tokens per row
    batch: int


PRESETS: dict[str, Preset] = {
    "toy": Preset("toy-student:toy-teacher", QWEN3_VOCAB, seq=2048, batch=1),
    "small": Preset("small-student:small-teacher", 4096, seq=512, batch=1),
    "qwen3": Preset("qwen3-1.7b:qwen3-8b", QWEN3_VOCAB, seq=4096, batch=2),  # Qwen3-8B teaching Qwen3-1.7B
}
PRECISIONS = ("auto", "fp32", "bf16", "bf16_mixed")


def resolve_shape(shape: str) -> tuple[ModelSpec, ModelSpec, Preset]:
    """`--shape` -> (student, teacher, defaults): a PRESETS name, or STUDENT:TEACHER of MODELS (Qwen3 defaults)."""
    preset = PRESETS.get(shape) or next((p for p in PRESETS.values() if p.pair == shape), None)
    preset = preset or Preset(shape, QWEN3_VOCAB, seq=4096, batch=2)
    names = preset.pair.split(":")
    unknown = [n for n in names if n not in MODELS]
    if len(names) != 2 or unknown:
        raise SystemExit(f"--shape {shape!r}: expected one of {', '.join(PRESETS)} or STUDENT:TEACHER of "
                         f"{', '.join(MODELS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return MODELS[names[0]], MODELS[names[1]], preset


@dataclass(frozen=True)
class Bench:
    vocab: int = QWEN3_VOCAB
    student: ModelSpec = toy_build.STUDENT
    teacher: ModelSpec = toy_build.TEACHER
    shape: str = "toy"
    model: str | None = None  # HF id or path of the student (the random pair when None)
    teacher_model: str | None = None  # defaults to `model`
    seq: int = 2048  # response tokens per row
    prompt: int = 32  # prompt tokens per row
    batch: int = 1
    warmup: int = 1
    steps: int = 3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | bf16_mixed
    grad_checkpointing: bool = False  # on the student, in every mode
    threads: int = 0  # CPU threads per mode (0: torch's default, one per core)
    score_chunk: int | None = None  # tip's importance.chunk_size (rows scored at once) when not the default

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    def precision_on(self, device: torch.device) -> str:
        return ("bf16" if device.type == "cuda" else "fp32") if self.precision == "auto" else self.precision

    def weight_dtype(self, device: torch.device) -> torch.dtype:
        """bf16 weights only in pure bf16; bf16_mixed keeps fp32 master weights and autocasts."""
        return torch.bfloat16 if self.precision_on(device) == "bf16" else torch.float32

    def autocast(self, device: torch.device):
        if self.precision_on(device) == "bf16_mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()


@dataclass(frozen=True)
class Mode:
    kind: str  # naive | tip | trl | liger
    selector: str = "all"
    budget: float = 1.0
    chunk: int | str | None = None  # tip's loss.chunk_size: None = the product default, FULL = N
    backend: str = "auto"  # tip's loss.backend (auto: compiled kernels on CUDA, eager on CPU)

    @property
    def name(self) -> str:
        if self.kind != "tip":
            return self.kind
        return f"tip {self.selector}" + ("" if self.backend == "auto" else f" [{self.backend}]")

    def overrides(self, bench: Bench) -> list[str]:
        """tip's config overrides for this mode."""
        chunk = bench.tokens if self.chunk == FULL else self.chunk
        return [f"selector={self.selector}", f"budget={self.budget}", f"loss.backend={self.backend}",
                *([f"loss.chunk_size={chunk}"] if chunk else []),
                *([f"importance.chunk_size={bench.score_chunk}"] if bench.score_chunk else [])]


def default_modes(
    chunks: list[int | str | None], budgets=(0.5, 0.3, 0.1), selectors=("soft_or", "entropy"), backends=("auto",)
) -> list[Mode]:
    """naive, TRL, Liger, then per loss chunk: tip full-token and tip at the budgets. At the default chunk every
    selector at every budget; at other chunks, to save time, the first selector at the highest and lowest budget
    (memory depends on how many tokens are kept, not on which). Each tip mode once per loss.backend of `backends`."""
    modes = [Mode("naive"), Mode("trl"), Mode("liger")]
    for backend in backends:
        for chunk in chunks:
            modes.append(Mode("tip", "all", 1.0, chunk, backend))
            if chunk is None:
                modes += [Mode("tip", sel, b, chunk, backend) for sel in selectors for b in budgets]
            else:
                modes += [Mode("tip", selectors[0], b, chunk, backend) for b in dict.fromkeys((max(budgets), min(budgets)))]
    return modes


# ---------------------------------------------------------------- memory meters


def _proc_kb(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in {path}")


class Meter:
    """Current and peak memory in MB: CUDA allocated on GPU, resident set size on CPU; `reset` restarts the peak."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        return _proc_kb("/proc/self/status", "VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _proc_kb("/proc/self/status", "VmHWM") / 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


# ---------------------------------------------------------------- models and tokens


def qwen3(spec: ModelSpec, vocab: int, dtype: torch.dtype, device: torch.device):
    """A random-init Qwen3 causal LM, created on `device` in `dtype` (no fp32 CPU copy first)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        intermediate_size=spec.intermediate, max_position_embeddings=32_768, tie_word_embeddings=spec.tie_embeddings,
    )
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_pair(bench: Bench) -> Pair:
    """The student (trainable) and teacher (frozen) at the benchmark's device and dtype; same seed, same weights."""
    from transformers import AutoModelForCausalLM

    device = pick_device(bench.device)
    dtype = bench.weight_dtype(device)
    torch.manual_seed(bench.seed)
    if bench.model:
        student = AutoModelForCausalLM.from_pretrained(bench.model, dtype=dtype, device_map=device)
        teacher = AutoModelForCausalLM.from_pretrained(bench.teacher_model or bench.model, dtype=dtype,
                                                       device_map=device)
    else:
        student, teacher = qwen3(bench.student, bench.vocab, dtype, device), qwen3(bench.teacher, bench.vocab, dtype, device)
    student.train().requires_grad_(True)
    teacher.eval().requires_grad_(False)
    if bench.grad_checkpointing:
        enable_checkpointing(student)
    vocab = min(head_weight(student).shape[0], head_weight(teacher).shape[0])
    return Pair(student, teacher, None, vocab, device)


def make_batch(bench: Bench, vocab: int, device: torch.device) -> Batch:
    """`batch` rows of random prompt + response tokens, all of the same length (no padding)."""
    gen = torch.Generator().manual_seed(bench.seed + 1)
    rows = [torch.randint(0, vocab, (bench.prompt + bench.seq,), generator=gen).tolist() for _ in range(bench.batch)]
    return pack([r[: bench.prompt] for r in rows], [r[bench.prompt :] for r in rows], pad_id=0).to(device)


# ---------------------------------------------------------------- one step per mode: forward, loss, backward


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
    step = 0

    def run(pair: Pair, batch: Batch, meter: Meter, times: dict) -> float:
        nonlocal step
        step += 1
        generator = torch.Generator().manual_seed(step)
        loss_fn = train_step.selected_token_loss

        def marked(*args, **kwargs):
            if "pre_loss_peak" not in times:
                times["pre_loss_peak"] = meter.peak()
                meter.reset()
            return loss_fn(*args, **kwargs)

        train_step.selected_token_loss = marked  # a probe only: the call goes through unchanged
        try:
            stats, _, kept = train_step.distill_step(pair, batch, cfg, generator, times)
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


# ---------------------------------------------------------------- estimates: FLOPs and memory


def backbone_params(spec: ModelSpec) -> int:
    """Weights of the decoder layers (q, k, v, o and the SwiGLU MLP; norms left out): the matmuls every token of
    the sequence pays for, unlike the embedding (a lookup) and the lm_head (only where logits are needed)."""
    attention = spec.hidden * spec.head_dim * 2 * (spec.heads + spec.kv_heads)
    return spec.layers * (attention + 3 * spec.hidden * spec.intermediate)


def total_params(spec: ModelSpec, vocab: int) -> int:
    return backbone_params(spec) + vocab * spec.hidden * (1 if spec.tie_embeddings else 2)


def kept_count(mode: Mode, n: int) -> int:
    """K = max(1, floor(b N + 0.5)) (SPEC 5); every token for selector=all."""
    return n if mode.kind != "tip" or mode.selector == "all" else max(1, math.floor(mode.budget * n + 0.5))


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


def model_gb(bench: Bench, device: torch.device) -> float:
    """Weights of both models, plus the student's gradients and AdamW's two moments (in the weights' dtype)."""
    width = bench.weight_dtype(device).itemsize
    return width * (4 * total_params(bench.student, bench.vocab) + total_params(bench.teacher, bench.vocab)) / 2**30


def rough_peak_gb(mode: Mode, bench: Bench) -> float:
    """fp32 [rows, V] tensors the mode holds at its peak, by the counts measured at 2k tokens (README, Performance):
    naive ~8 of [T, V]; tip ~4 of [min(K, loss chunk), V] in the loss (the closed-form reverse KL), ~4 of
    [score chunk, V] while scoring; TRL ~11.5 tiles of [min(N, 4096), 32768]."""
    vocab = bench.vocab
    device = pick_device(bench.device)
    n = bench.tokens
    if mode.kind == "naive":
        elements = 8.5 * bench.batch * (bench.seq + bench.prompt) * vocab
    elif mode.kind == "trl":
        elements = 12 * min(n, 4096) * min(vocab, 32768)
    elif mode.kind == "tip":
        kept = kept_count(mode, n)
        chunk = n if mode.chunk == FULL else chunk_rows(mode.chunk, vocab, device)
        score = min(n, chunk_rows(bench.score_chunk, vocab, device))
        elements = max(4.5 * min(kept, chunk), 4.5 * score) * vocab
    else:
        return 0.0
    return elements * 4 / 2**30


def skip_reason(mode: Mode, bench: Bench) -> str | None:
    """Why `mode` cannot run here: a missing package, no GPU for Liger, or (on CPU) too little free memory, which
    would bring the kernel's OOM killer onto whatever process is largest, not necessarily ours."""
    device = pick_device(bench.device)
    if mode.kind == "trl" and not _importable("trl"):
        return "trl not installed: pip install -e '.[bench]'"
    if mode.kind == "liger":
        if device.type != "cuda":
            return "liger-kernel's fused linear JSD needs Triton on a GPU"
        if not _importable("liger_kernel"):
            return "liger-kernel not installed: pip install liger-kernel"
    if device.type == "cpu":
        need = rough_peak_gb(mode, bench) + (0 if bench.model else model_gb(bench, device))
        free = _proc_kb("/proc/meminfo", "MemAvailable") / 2**20
        if need > 0.9 * free:
            return f"needs ~{need:.0f} GiB, {free:.0f} GiB available"
    return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- the child: measure one mode


def measure(mode: Mode, bench: Bench) -> dict:
    """Build the pair, run warm-up + measured steps of `mode`, return its memory and time per step."""
    if reason := skip_reason(mode, bench):
        return {"skipped": reason}
    device = pick_device(bench.device)
    pair = build_pair(bench)
    batch = make_batch(bench, pair.vocab, device)
    meter = Meter(device)
    loss_chunk = None
    if mode.kind == "tip":
        cfg = compose_config(mode.overrides(bench))
        step_fn, loss_chunk = tip_runner(cfg), chunk_rows(cfg.loss.chunk_size, pair.vocab, device)
    else:
        step_fn = trl_runner(pair) if mode.kind == "trl" else {"naive": naive_loss, "liger": liger_loss}[mode.kind]
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=1e-6)
    gc.collect()
    baseline = meter.now()
    rows = []
    for _ in range(bench.warmup + bench.steps):
        gc.collect()
        start = meter.now()
        times: dict = {}
        meter.reset()
        t0 = time.perf_counter()
        with bench.autocast(device):
            loss = step_fn(pair, batch, meter, times)
        loss_peak = meter.peak()
        meter.reset()
        torch.nn.utils.clip_grad_norm_(pair.student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        step_peak = max(times.get("pre_loss_peak", 0.0), loss_peak, meter.peak())
        rows.append({
            "loss": loss, "step_s": step_s, "peak_mb": step_peak - baseline, "loss_peak_mb": loss_peak - start,
            "select_s": times.get("time/select"), "teacher_s": times.get("time/teacher"), "kept": times.get("kept"),
        })
    first_loss = rows[0]["loss"]  # same weights and tokens in every mode: full-token modes agree here
    warmup, rows = rows[: bench.warmup], rows[bench.warmup :]
    shares = [r["select_s"] / r["step_s"] for r in rows if r["select_s"] is not None]
    return {
        "n_tokens": int(batch.target_mask.sum()),
        "kept": rows[-1]["kept"] if rows[-1]["kept"] is not None else int(batch.target_mask.sum()),
        "loss_chunk": loss_chunk,
        "first_loss": first_loss,
        "baseline_mb": baseline,
        "peak_mb": max(r["peak_mb"] for r in rows),
        "loss_peak_mb": max(r["loss_peak_mb"] for r in rows),
        "step_s": statistics.median(r["step_s"] for r in rows),
        "tokens_per_s": int(batch.target_mask.sum()) / statistics.median(r["step_s"] for r in rows),
        "select_share": statistics.median(shares) if shares else None,
        "steps": rows,
        "warmup_steps": warmup,
    }


def child_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    shapes = {key: ModelSpec(**spec["bench"][key]) for key in ("student", "teacher")}
    bench = Bench(**{**spec["bench"], **shapes})
    result = measure(Mode(**spec["mode"]), bench)
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent: one subprocess per mode


def run_mode(mode: Mode, bench: Bench, timeout: float | None = None) -> dict:
    """Measure `mode` in a fresh Python process (clean peak); a crash (e.g. out of memory) becomes an `error`."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"mode": asdict(mode), "bench": asdict(bench)}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec), str(out)]
        env = {**os.environ, **MMAP_ENV, **({"OMP_NUM_THREADS": str(bench.threads)} if bench.threads else {})}
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
            return {"error": f"exit {proc.returncode}{killed}: {tail[0]}"}
        return json.loads(out.read_text())


def _ratio(x: float | None, ref: float | None) -> float | None:
    return x / ref if x is not None and ref else None


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios of peak, loss+bwd peak and s/step to `naive` and to tip full-token (budget 1.0) of the same loss chunk;
    naive, TRL and Liger rows compare to the first tip full-token row (the default chunk unless --chunks says)."""
    ok = [r for r in rows if "peak_mb" in r]
    naive = next((r for r in ok if r["mode"] == "naive"), None)
    full = {(r["chunk"], r.get("backend")): r for r in ok if r["selector"] == "all" and r["mode"].startswith("tip")}
    for r in ok:
        ref = full.get((r["chunk"], r.get("backend"))) if r["mode"].startswith("tip") else next(iter(full.values()), None)
        for key in ("peak_mb", "loss_peak_mb", "step_s"):
            r[f"{key}_x_naive"] = _ratio(r[key], naive and naive[key])
            r[f"{key}_x_tip_full"] = _ratio(r[key], ref and ref[key])
    return rows


def targets(rows: list[dict], checkpointing: bool = False) -> list[dict]:
    """The targets, checked on this run's numbers (`value` None when a row is missing). The `toy` ones hold on CPU at
    the toy shape; the `qwen3` ones are set for the real-shape preset on a GPU (with `checkpointing`: the
    gradient-checkpointing targets instead of the plain ones against the fastest and leanest). The tip rows are
    those of the first loss.backend measured."""
    backend = next((r.get("backend", "auto") for r in rows if r["mode"].startswith("tip")), "auto")
    rows = [r for r in rows if not r["mode"].startswith("tip") or r.get("backend", "auto") == backend]

    def get(mode, budget, key, chunk=None):
        match = (r for r in rows if (r["mode"].split(" [")[0], r["budget"], r["chunk"]) == (mode, budget, chunk))
        return next((r.get(key) for r in match), None)

    def check(shape, name, value, limit):
        met = None if value is None else value <= limit
        return {"shape": shape, "target": name, "value": value, "limit": limit, "met": met}

    out, trl_peak = [], get("trl", 1.0, "peak_mb")
    for chunk in dict.fromkeys(r["chunk"] for r in rows if r["mode"].split(" [")[0] == "tip all"):
        tag = "default chunk" if chunk is None else f"loss chunk {chunk}"
        for budget, limit in ((0.5, 0.45), (0.1, 0.2)):
            out.append(check("toy", f"loss+bwd peak, soft_or {budget} / tip full ({tag})",
                             get("tip soft_or", budget, "loss_peak_mb_x_tip_full", chunk), limit))
    out += [
        check("toy", "step peak, tip full / naive", get("tip all", 1.0, "peak_mb_x_naive"), 0.6),
        check("toy", "loss+bwd peak, tip full / naive", get("tip all", 1.0, "loss_peak_mb_x_naive"), 0.6),
        check("toy", "step peak, tip full / trl", _ratio(get("tip all", 1.0, "peak_mb"), trl_peak), 1.0),
        check("toy", "step peak, tip soft_or 0.5 / trl", _ratio(get("tip soft_or", 0.5, "peak_mb"), trl_peak), 1.0),
        check("toy", "scoring+selection share of the tip full-token step", get("tip all", 1.0, "select_share"), 0.10),
    ]
    tip_s, tip_peak = get("tip all", 1.0, "step_s"), get("tip all", 1.0, "peak_mb")
    if checkpointing:
        out += [
            check("qwen3", "step time, tip full / trl (checkpointing)", _ratio(tip_s, get("trl", 1.0, "step_s")), 0.95),
            check("qwen3", "loss+bwd peak, tip full / trl (checkpointing)",
                  _ratio(get("tip all", 1.0, "loss_peak_mb"), get("trl", 1.0, "loss_peak_mb")), 0.9),
        ]
    else:
        others = [r for r in rows if r["mode"] in ("naive", "trl", "liger") and "step_s" in r]
        fastest = min((r["step_s"] for r in others), default=None)
        leanest = min((r["peak_mb"] for r in others), default=None)
        out += [
            check("qwen3", "step time, tip full / fastest of naive, trl, liger", _ratio(tip_s, fastest), 0.95),
            check("qwen3", "step peak, tip full / leanest of naive, trl, liger", _ratio(tip_peak, leanest), 1.0),
        ]
    out += [
        check("qwen3", "step time, soft_or 0.1 / tip full", get("tip soft_or", 0.1, "step_s_x_tip_full"), 0.93),
        check("qwen3", "step time, soft_or 0.5 / tip full", get("tip soft_or", 0.5, "step_s_x_tip_full"), 1.0),
        check("qwen3", "scoring+selection share, soft_or 0.1", get("tip soft_or", 0.1, "select_share"), 0.08),
        check("qwen3", "scoring+selection share, soft_or 0.5", get("tip soft_or", 0.5, "select_share"), 0.08),
    ]
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(rows: list[dict]) -> str:
    head = ("| mode | budget | loss chunk | kept | peak MB | x naive | x tip full | loss+bwd MB | x naive | x tip full "
            "| s/step | x naive | x tip full | tokens/s | scoring+selection | lm_head+loss FLOPs (est.) | first loss |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        chunk = "-" if r["mode"] in ("naive", "trl", "liger") else _fmt(r.get("loss_chunk"), "d")
        if "peak_mb" not in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['mode']} | {r['budget']:g} | {chunk} | {why} |" + " |" * 11
                         + f" {_pct(r.get('head_share'))} | |")
            continue
        lines.append(
            f"| {r['mode']} | {r['budget']:g} | {chunk} | {r['kept']} "
            f"| {r['peak_mb']:.0f} | {_fmt(r['peak_mb_x_naive'], '.2f')} | {_fmt(r['peak_mb_x_tip_full'], '.2f')} "
            f"| {r['loss_peak_mb']:.0f} | {_fmt(r['loss_peak_mb_x_naive'], '.2f')} "
            f"| {_fmt(r['loss_peak_mb_x_tip_full'], '.2f')} "
            f"| {r['step_s']:.2f} | {_fmt(r['step_s_x_naive'], '.2f')} | {_fmt(r['step_s_x_tip_full'], '.2f')} "
            f"| {_fmt(r.get('tokens_per_s'), '.0f')} | {_pct(r['select_share'])} | {_pct(r.get('head_share'))} "
            f"| {_fmt(r.get('first_loss'), '.6f')} |"
        )
    return "\n".join(lines)


def backend_text(rows: list[dict]) -> str:
    """Per tip mode measured under more than one loss.backend: each backend's s/step and scoring share beside the
    first backend's (`--backends`, e.g. auto,compiled)."""
    lines, first = [], {}
    for r in rows:
        if not r["mode"].startswith("tip") or "step_s" not in r:
            continue
        key = (r["selector"], r["budget"], r["chunk"])
        if key not in first:
            first[key] = r
            continue
        ref = first[key]
        lines.append(f"- tip {r['selector']} {r['budget']:g}: loss.backend={r['backend']} / {ref['backend']}: "
                     f"s/step {r['step_s'] / ref['step_s']:.2f}x; scoring+selection {_pct(r['select_share'])} "
                     f"vs {_pct(ref['select_share'])}")
    return "\n".join(lines)


def ceiling_text(ceiling: dict) -> str:
    """One line per budget: what the budget can save at best, by the FLOP estimate, and what tip's scoring leaves."""
    share = ceiling["head_share_full_token"]
    lines = [f"lm_head + loss: {share:.1%} of a full-token step's FLOPs (estimate, step_flops)."]
    for b, best in ceiling["best_case_step_x_full"].items():
        lines.append(f"- budget {b}: step >= {best:.3f}x full-token at best (free scoring); "
                     f"{ceiling['tip_step_x_full'][b]:.3f}x with tip's scoring pass")
    return "\n".join(lines)


def run(modes: list[Mode], bench: Bench, log=print) -> dict:
    """Measure every mode (one subprocess each) and return the report: settings, rows with ratios, targets."""
    rows = []
    device = pick_device(bench.device)
    for mode in modes:
        t0 = time.perf_counter()
        reason = skip_reason(mode, bench)
        result = {"skipped": reason} if reason else run_mode(mode, bench)
        row = {"mode": mode.name, "selector": mode.selector, "budget": mode.budget, "chunk": mode.chunk,
               "backend": mode.backend, **result,
               **step_flops(mode, bench)}
        rows.append(row)
        status = result.get("skipped") or result.get("error")
        status = status or f"peak {result['peak_mb']:.0f} MB, {result['step_s']:.2f} s/step"
        chunk = mode.chunk or "default"
        log(f"[{time.perf_counter() - t0:5.1f} s] {mode.name} budget={mode.budget:g} chunk={chunk}: {status}")
    add_ratios(rows)
    budgets = sorted({m.budget for m in modes if m.kind == "tip" and m.selector != "all"} | {0.5, 0.1}, reverse=True)
    return {
        "bench": asdict(bench),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "precision": bench.precision_on(device),
        "memory": "CUDA max_memory_allocated" if device.type == "cuda" else f"peak RSS (VmHWM), {MMAP_ENV}",
        "torch_cpu_allocator_peak": None,  # torch has no CPU allocator statistics (no torch.cpu.memory_stats)
        "flops": budget_ceiling(bench, budgets),
        "rows": rows,
        "targets": targets(rows, bench.grad_checkpointing),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="toy",
                   help=f"random pair: one of {', '.join(PRESETS)}, or STUDENT:TEACHER of {', '.join(MODELS)}")
    p.add_argument("--model", help="HF id or path of the student (instead of a random pair)")
    p.add_argument("--teacher", help="HF id or path of the teacher (default: --model)")
    p.add_argument("--seq", type=int, help="response tokens per row (default: the shape's)")
    p.add_argument("--prompt", type=int, default=Bench.prompt, help="prompt tokens per row")
    p.add_argument("--batch", type=int, help="rows (default: the shape's)")
    p.add_argument("--vocab", type=int, help="vocabulary of the random pair (default: the shape's)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 on CUDA, fp32 on CPU; bf16_mixed = fp32 weights under bf16 autocast")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the student's layers in backward")
    p.add_argument("--steps", type=int, default=Bench.steps, help="measured steps (median time, max memory)")
    p.add_argument("--warmup", type=int, default=Bench.warmup)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per mode (0: one per core)")
    p.add_argument("--budgets", default="0.5,0.3,0.1")
    p.add_argument("--selectors", default="soft_or,entropy")
    p.add_argument("--chunks", default="default,full",
                   help="tip loss.chunk_size values to run: 'default' (the config's), 'full' (>= N), or numbers")
    p.add_argument("--score-chunk", type=int, help="tip's importance.chunk_size (default: the config's)")
    p.add_argument("--modes", default="naive,trl,liger,tip", help="subset of naive,trl,liger,tip")
    p.add_argument("--backends", default="auto",
                   help="tip's loss.backend per tip mode, comma-separated: auto, eager, compiled (e.g. eager,compiled)")
    p.add_argument("--out", default="bench_memory.json")
    return p.parse_args(argv)


def spec_of(ref: str) -> tuple[ModelSpec, int]:
    """A checkpoint's sizes (Qwen/Llama-style configs), for the FLOP estimate, and its vocabulary."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(ref).get_text_config()
    heads = c.num_attention_heads
    spec = ModelSpec(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
                     kv_heads=getattr(c, "num_key_value_heads", None) or heads, intermediate=c.intermediate_size,
                     head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                     tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
    return spec, c.vocab_size


def bench_from_args(args: argparse.Namespace) -> Bench:
    student, teacher, preset = resolve_shape(args.shape)
    vocab = args.vocab or preset.vocab
    if args.model:
        (student, vocab_s), (teacher, vocab_t) = spec_of(args.model), spec_of(args.teacher or args.model)
        vocab = min(vocab_s, vocab_t)
    return Bench(vocab=vocab, student=student, teacher=teacher, shape=args.shape, model=args.model,
                 teacher_model=args.teacher, seq=args.seq or preset.seq, prompt=args.prompt,
                 batch=args.batch or preset.batch, steps=args.steps, warmup=args.warmup, device=args.device,
                 precision=args.precision, grad_checkpointing=args.grad_checkpointing, threads=args.threads,
                 score_chunk=args.score_chunk)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = bench_from_args(args)
    chunks = [None if c == "default" else c if c == FULL else int(c) for c in args.chunks.split(",")]
    kinds = set(args.modes.split(","))
    budgets, selectors = tuple(map(float, args.budgets.split(","))), tuple(args.selectors.split(","))
    modes = [m for m in default_modes(chunks, budgets, selectors, tuple(args.backends.split(","))) if m.kind in kinds]
    report = run(modes, bench, log=lambda s: print(s, file=sys.stderr, flush=True))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report["rows"]))
    print()
    print(ceiling_text(report["flops"]))
    print()
    if compared := backend_text(report["rows"]):
        print(compared + "\n")
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"- {t['shape']} target: {t['target']}: {_fmt(t['value'], '.2f')} (target <= {t['limit']:g}) {verdict}")
    return report


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
