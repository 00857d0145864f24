"""Peak memory, step time and tokens/s of one OPD training step: naive full-logit KD vs TRL vs Liger vs tip (by
budget), with a FLOP estimate of the lm_head + loss share of each step (`flop_parts`).

Every mode runs one full step (forward, scoring + selection where it has one, loss, backward, AdamW step) on the
same random-init models and tokens, each in its own subprocess so that its peak is its own (bench/measure.py: peak
over the step, and over loss + backward). tip's loss+bwd phase starts when `distill_step` calls the selected-token
loss (after scoring and selection); the naive, TRL and Liger steps (bench/peers.py) have no scoring, so theirs is the
whole forward + loss + backward. The report is the table of every mode with its ratios to naive and to tip
full-token, and what each budget can save by the FLOP model (bench/flops.py).

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
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench import measure
from bench.flops import budget_ceiling, step_flops
from bench.presets import (
    FULL,
    MODELS,
    PRECISIONS,
    PRESETS,
    Bench,
    Mode,
    default_modes,
    resolve_shape,
    spec_of,
)

from tip_cli.models import pick_device


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
    """Measure every mode (one subprocess each) and return the report: settings, rows with ratios, FLOP ceiling."""
    rows = []
    device = pick_device(bench.device)
    for mode in modes:
        t0 = time.perf_counter()
        reason = measure.skip_reason(mode, bench)
        result = {"skipped": reason} if reason else measure.run_mode(mode, bench)
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
        "memory": "CUDA max_memory_allocated" if device.type == "cuda" else f"peak RSS (VmHWM), {measure.MMAP_ENV}",
        "torch_cpu_allocator_peak": None,  # torch has no CPU allocator statistics (no torch.cpu.memory_stats)
        "flops": budget_ceiling(bench, budgets),
        "rows": rows,
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
        print(compared)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        measure.child_main(sys.argv[2], sys.argv[3])
    else:
        main()
