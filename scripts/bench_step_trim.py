"""One training step on rows of spread-out lengths, with every micro-batch at the rollout batch's full width
against each cut to its own longest row (tip_cli.rollout.batch.Batch.rows), side by side in one run.

    python scripts/bench_step_trim.py                         # small shape, 8 rows, mean 100 / max 512 tokens
    python scripts/bench_step_trim.py --rows 16 --mean 800 --max 4096 --shape qwen3-1.7b:qwen3-8b   # a GPU

The response lengths mimic a rollout batch's long tail: one row at --max, the others exponential around the mean
that leaves the batch at --mean. The two modes alternate step by step on the same pair and tokens (one untimed
warm-up step each); the table gives each mode's median step time, the token slots the models' forwards run over
(rows x width, summed over the micro-batches, for the student's and the teacher's passes alike) and the loss.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench.presets import PRESETS, Bench, build_pair, resolve_shape

from tip_cli.cli import compose_config
from tip_cli.rollout.batch import Batch, pack
from tip_cli.train import recipe
from tip_cli.train import step as train_step


def full_width_rows(self: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) at the whole batch's width: micro-batches as they were before the cut."""
    return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.target_mask[start:stop])


def lengths(rows: int, mean: int, longest: int, seed: int) -> list[int]:
    """Response lengths: one row at `longest`, the rest exponential, scaled so that the batch's mean is `mean`."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.empty(rows - 1).exponential_(generator=g)
    rest = (rest * (mean * rows - longest) / rest.sum()).round().clamp(1, longest).long().tolist()
    return [longest, *rest]


def make_batch(bench: Bench, spread: list[int], vocab: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(bench.seed + 1)
    draw = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    return pack([draw(bench.prompt) for _ in spread], [draw(n) for n in spread], pad_id=0).to(device)


def slots(batch: Batch, micro: int) -> int:
    """Token positions the forwards of one pass run over: rows x width per micro-batch."""
    return sum(mb.input_ids.numel() for mb, _, _ in train_step.micro_slices(batch, micro))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="small", help=f"one of {', '.join(PRESETS)}, or STUDENT:TEACHER")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--mean", type=int, default=100, help="mean response tokens per row")
    p.add_argument("--max", type=int, default=512, help="the longest row's response tokens")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--micro", type=int, default=2, help="train.micro_batch_size")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--overrides", default="selector=soft_or,budget=0.5", help="tip config overrides, comma-separated")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    student, teacher, preset = resolve_shape(args.shape)
    bench = Bench(vocab=preset.vocab, student=student, teacher=teacher, shape=args.shape, prompt=args.prompt,
                  device=args.device)
    pair = build_pair(bench)
    spread = lengths(args.rows, args.mean, args.max, bench.seed)
    batch = make_batch(bench, spread, pair.vocab, pair.device)
    cfg = compose_config([*args.overrides.split(","), f"train.micro_batch_size={args.micro}"])
    cut_rows = Batch.rows
    modes = {"full width": full_width_rows, "cut per micro-batch": cut_rows}
    times: dict[str, list[float]] = {m: [] for m in modes}
    spec = recipe.specs(cfg, pair.device).step  # built once, outside the timed steps
    losses, widths = {}, {}
    for i in range(args.steps + 1):
        for name, rows in modes.items():
            Batch.rows = rows
            try:
                pair.student.zero_grad(set_to_none=True)
                if pair.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m, _, _ = train_step.distill_step(pair, batch, spec, torch.Generator().manual_seed(0), {})
                if pair.device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first step of each mode warms up
                    times[name].append(time.perf_counter() - t0)
                losses[name], widths[name] = m["loss"], slots(batch, args.micro)
            finally:
                Batch.rows = cut_rows
    print(f"{args.shape} pair, {args.rows} rows, response lengths mean {sum(spread) / len(spread):.0f} max "
          f"{max(spread)} (+{args.prompt} prompt), micro-batch {args.micro} rows, {cfg.selector.name} at budget "
          f"{cfg.budget}, {pair.device}, {torch.get_num_threads()} threads; median of {args.steps} steps")
    print("| micro-batches | step s | token slots per pass | loss |")
    print("|---|---|---|---|")
    for name in modes:
        print(f"| {name} | {statistics.median(times[name]):.2f} | {widths[name]:,} | {losses[name]:.6f} |")
    full, cut = (statistics.median(times[n]) for n in modes)
    print(f"speed-up {full / cut:.2f}x; token slots {widths['full width'] / widths['cut per micro-batch']:.2f}x fewer")


if __name__ == "__main__":
    main()
