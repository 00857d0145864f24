"""What SPEC 7a's learning-signal metrics (train.signal_metrics) cost: one training step with them on against
off, side by side in one run, on the same pair and tokens.

    python scripts/bench_signal_metrics.py                        # small shape: 2 rows of 512 response tokens, CPU
    python scripts/bench_signal_metrics.py --shape qwen3 --rows 2 --seq 4096     # a GPU

For each setting (`--settings`: the scored path at budget 0.5 and the full-token path by default) the two modes
alternate step by step (one untimed warm-up step each, then `--steps` timed ones, the order flipped every repeat so
that neither mode always runs first); the table gives each mode's median step time, wall clock and this process's
CPU time (the steadier measure on a shared machine), and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench.presets import PRESETS, Bench, build_pair, make_batch, resolve_shape

from tip_cli.cli import compose_config
from tip_cli.train import recipe
from tip_cli.train import step as train_step

MODES = ("off", "on")


def timed_step(pair, batch, spec) -> tuple[tuple[float, float], dict]:
    """One distill_step from zeroed gradients: ((wall seconds, CPU seconds), metrics)."""
    pair.student.zero_grad(set_to_none=True)
    if pair.device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    metrics, _, _ = train_step.distill_step(pair, batch, spec, torch.Generator().manual_seed(0), {})
    if pair.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0, time.process_time() - c0), metrics


def compare(pair, batch, overrides: list[str], steps: int) -> dict:
    """Median step seconds (wall, CPU) with the metrics off and on, interleaved; the 'on' metrics of the last step."""
    cfgs = {m: compose_config([*overrides, f"train.signal_metrics={m == 'on'}"]) for m in MODES}
    specs = {m: recipe.specs(cfg, pair.device).step for m, cfg in cfgs.items()}  # built once, outside the timed steps
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    metrics = {}
    for i in range(steps + 1):
        for mode in MODES if i % 2 else reversed(MODES):
            seconds, m = timed_step(pair, batch, specs[mode])
            if i:  # the first step of each mode warms up
                times[mode].append(seconds)
            if mode == "on":
                metrics = m
    wall = {m: statistics.median(t[0] for t in times[m]) for m in MODES}
    cpu = {m: statistics.median(t[1] for t in times[m]) for m in MODES}
    return {"off_s": wall["off"], "on_s": wall["on"], "ratio": wall["on"] / wall["off"], "off_cpu_s": cpu["off"],
            "on_cpu_s": cpu["on"], "cpu_ratio": cpu["on"] / cpu["off"], "metrics": metrics}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="small", help=f"one of {', '.join(PRESETS)}, or STUDENT:TEACHER")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, default=0, help="response tokens per row (0: the shape's default)")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--vocab", type=int, default=0, help="vocabulary (0: the shape's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--settings", default="selector=soft_or,budget=0.5;selector=all",
                   help="tip config overrides, comma-separated; settings separated by ';'")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    student, teacher, preset = resolve_shape(args.shape)
    bench = Bench(vocab=args.vocab or preset.vocab, student=student, teacher=teacher, shape=args.shape,
                  seq=args.seq or preset.seq, prompt=args.prompt, batch=args.rows, device=args.device)
    pair = build_pair(bench)
    batch = make_batch(bench, pair.vocab, pair.device)
    report = {}
    print(f"{args.shape} pair, vocab {pair.vocab}, {args.rows} rows x {bench.seq} response tokens "
          f"(+{args.prompt} prompt), {pair.device}, {torch.get_num_threads()} threads; median of {args.steps} steps")
    print("| setting | off s | on s | on / off | off CPU s | on CPU s | on / off (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(";"):
        r = report[setting] = compare(pair, batch, [s for s in setting.split(",") if s], args.steps)
        print(f"| {setting} | {r['off_s']:.3f} | {r['on_s']:.3f} | {r['ratio']:.3f} | {r['off_cpu_s']:.3f} | "
              f"{r['on_cpu_s']:.3f} | {r['cpu_ratio']:.3f} |")
    return report


if __name__ == "__main__":
    main()
