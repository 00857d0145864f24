"""Synchronous vs overlapped rollouts, side by side: the embedded pair distilled with its rollouts on a student
`vllm serve` (vLLM's CPU build here), once with rollout.max_staleness=0 and once with 1, on the same server.

    .venv/bin/python scripts/bench_pipeline.py [--steps 40] [--seeds 0 1 2] [--out outputs/bench_pipeline]

The server (tip_cli.rollout.serve: `vllm serve` + tip's file weight transfer) runs on its own core(s) and each
`tip train` on the others, one thread, so generation and training can overlap as they would on separate GPUs. Every
run starts by pushing its own student to the server (version 0), so runs share the server but not its weights. It
prints, per mode, the wall time per step (the mean over the steps after the first), each phase's share of it
(tip_cli.tracking.STEP_PHASES), the generation tokens/s and the final greedy accuracy (mean [min, max] over seeds),
then the overlapped/synchronous ratio of the wall time per step. Needs vLLM (`make setup-vllm`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tip_cli.servers import wait_serving  # noqa: E402
from tip_cli.tracking import STEP_PHASES  # noqa: E402

MODES = {"sync": 0, "overlap": 1}


def pin(cores: str) -> list[str]:
    """A command prefix that keeps a process on `cores` (taskset), or nothing where taskset is missing."""
    return ["taskset", "-c", cores] if shutil.which("taskset") else []


def start_server(student: str, port: int, cores: str, log: Path) -> subprocess.Popen:
    """The student's server on `cores`, its output in `log`."""
    cmd = [*pin(cores), sys.executable, "-m", "tip_cli.rollout.serve", "--model", student, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--seed", "0",
           "--kv-cache-memory-bytes", str(2**28), "--max-model-len", "512"]
    env = os.environ | {"VLLM_CPU_OMP_THREADS_BIND": cores.replace(",", "|") if "-" not in cores else cores}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=ROOT)


def train(url: str, staleness: int, seed: int, steps: int, run_dir: Path, cores: str, extra: list[str]) -> float:
    """One `tip train` run (one thread, on `cores`); its wall seconds."""
    overrides = ["rollout=vllm_server", f"rollout.url={url}", f"rollout.max_staleness={staleness}", f"seed={seed}",
                 f"train.steps={steps}", "train.eval_every=0", "train.save_every=0", "train.token_sample_every=0",
                 "logger=none", f"out_dir={run_dir}", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.monotonic()
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        code = subprocess.run([*pin(cores), sys.executable, "-m", "tip_cli.cli", "train", *overrides], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code:
        sys.exit(f"tip train ({run_dir.name}) exited with {code}; see {run_dir.parent / (run_dir.name + '.log')}")
    return time.monotonic() - start


def summary(run_dir: Path) -> dict[str, float]:
    """Mean per-step wall time and phases over the steps after the first, tokens/s, and the final accuracy."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "time/step" in r and r["step"] > 1]
    out = {k: mean(r.get(k, 0.0) for r in steps) for k in ("time/step", *STEP_PHASES, "perf/rollout_tokens_per_s",
                                                           "rollout/staleness")}
    acc = [v for r in rows for k, v in r.items() if k.startswith("eval/") and k.endswith("/accuracy")]
    out["accuracy"] = acc[-1] if acc else float("nan")
    return out


def spread(values: list[float]) -> str:
    return f"{mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (>= 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_pipeline")
    parser.add_argument("--server-cores", default="1", help="cores of the student server (taskset list)")
    parser.add_argument("--train-cores", default="0", help="cores of the trainer")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("overrides", nargs="*", help="more tip train overrides for both modes")
    args = parser.parse_args()
    from tip_cli.pairs import resolve_model
    from tip_cli.toy.build import pair_fingerprint

    student = resolve_model("toy://student")  # builds the embedded pair on first use
    print(f"embedded pair {Path(student).parent} (fingerprint {pair_fingerprint(Path(student).parent)}); {args.steps} steps per run, seeds "
          f"{args.seeds}; server on cores {args.server_cores}, trainer on cores {args.train_cores}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    url, log = f"http://127.0.0.1:{args.port}", args.out / "server.log"
    server = start_server(student, args.port, args.server_cores, log)
    try:
        try:
            print(f"student server up in {wait_serving(url, server, log, 600):.0f} s", flush=True)
        except RuntimeError as err:
            sys.exit(str(err))
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for seed in args.seeds:
            for mode, staleness in MODES.items():
                run_dir = args.out / f"{mode}_seed{seed}"
                wall = train(url, staleness, seed, args.steps, run_dir, args.train_cores, args.overrides)
                results[mode].append(summary(run_dir))
                print(f"  {mode} seed {seed}: {wall:.0f} s, {results[mode][-1]['time/step']:.3f} s/step, final "
                      f"accuracy {results[mode][-1]['accuracy']:.3f}", flush=True)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    print(f"\n| mode | s/step | {' | '.join(p.removeprefix('time/') for p in STEP_PHASES)} | gen tok/s | staleness "
          "| final accuracy |")
    print("|---" * (len(STEP_PHASES) + 6) + "|")
    for mode, runs in results.items():
        phases = " | ".join(f"{mean(r[p] for r in runs):.3f}" for p in STEP_PHASES)
        print(f"| {mode} | {mean(r['time/step'] for r in runs):.3f} | {phases} | "
              f"{mean(r['perf/rollout_tokens_per_s'] for r in runs):.0f} | "
              f"{mean(r['rollout/staleness'] for r in runs):.2f} | {spread([r['accuracy'] for r in runs])} |")
    ratio = mean(r["time/step"] for r in results["overlap"]) / mean(r["time/step"] for r in results["sync"])
    print(f"\nwall time per step, max_staleness=1 / max_staleness=0: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
