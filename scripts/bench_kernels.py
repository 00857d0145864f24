"""The eager and the compiled (`loss.backend=compiled`) softmax work of one [C, V] chunk, side by side in one run.

    python scripts/bench_kernels.py                                    # C 256, V 151,936, d 256, fp32, this device
    python scripts/bench_kernels.py --rows 1024 --dtype bfloat16       # a GPU-sized chunk

Times, per chunk (median of --repeat): the two lm_head matmuls alone (student and teacher logits, which both
backends share), then the scoring pass's H and D (tip_cli.teacher.scoring.score) and the loss chunk's value and
gradients (tip_cli.losses.selected_token_loss, closed-form reverse KL) under each backend. It prints each backend's
time, the part of it beyond the matmuls (the softmax, KL, entropy and gradient work the kernels fuse), and the
compiled / eager ratio of both. The first call of each compiled kernel (its compilation) is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tip_cli.losses import LossSpec, selected_token_loss
from tip_cli.selection.scores import ScoreSpec
from tip_cli.teacher.scoring import score
from tip_cli.teacher.targets import DenseTeacher


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median seconds of fn() over `repeat` calls, after one untimed call (compilation, caches)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256, help="rows C of the chunk")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--dim", type=int, default=256, help="hidden size of both models")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    c, v, d = args.rows, args.vocab, args.dim
    h_s, h_t = (torch.randn(c, d, device=device, generator=g, dtype=dtype) for _ in range(2))
    w_s, w_t = (torch.randn(v, d, device=device, generator=g, dtype=dtype) * d**-0.5 for _ in range(2))
    teacher = DenseTeacher(h_t, w_t, v)
    w_grad = w_s.clone().requires_grad_()

    def matmuls():
        return h_s @ w_s.T, h_t @ w_t.T

    def scoring(fused: bool):
        return lambda: score(h_s, w_s, teacher, v, c, ScoreSpec(), fused)

    def loss(fused: bool):
        def run():
            h = h_s.clone().requires_grad_()
            selected_token_loss(h, w_grad, teacher, LossSpec(v, chunk=c, normalizer=float(c), compiled=fused)).backward()
        return run

    base = timed(matmuls, args.repeat, device)
    print(f"chunk [{c}, {v}], d {d}, {args.dtype} on {device}: the two logit matmuls {base * 1e3:.1f} ms")
    report = {"matmuls_s": base}
    for name, make in (("scoring H, D", scoring), ("loss + gradients", loss)):
        eager, fused = timed(make(False), args.repeat, device), timed(make(True), args.repeat, device)
        rest_e, rest_c = eager - base, fused - base
        report[name] = {"eager_s": eager, "compiled_s": fused}
        beyond = (f"{rest_e * 1e3:.1f} -> {rest_c * 1e3:.1f} ms ({rest_c / rest_e:.2f}x)" if rest_c > 0 and rest_e > 0
                  else "within the matmuls' own spread")
        print(f"- {name}: eager {eager * 1e3:.1f} ms, compiled {fused * 1e3:.1f} ms ({fused / eager:.2f}x); "
              f"beyond the two logit matmuls: {beyond}")
    return report


if __name__ == "__main__":
    main()
