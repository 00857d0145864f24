"""`make reproduce`: the paper's central comparison on the embedded pair, over seeds, then `tip analyze`.

    python scripts/reproduce.py                          # the grid below, seeds 0 1 2, two jobs at a time
    python scripts/reproduce.py --jobs 1 --seeds 0       # one seed, one job at a time
    python scripts/reproduce.py train.steps=20           # any `tip train` override applies to every job

The grid: full-token OPD (selector=all), soft_or / entropy / random at budgets 0.1 and 0.5, and Q3-only
(selector=quadrant, selector.quadrants=[Q3], uncapped), each a `tip train` process with one thread
(OMP_NUM_THREADS=1) with the gradient probe every 10 steps (train.grad_probe_every=10) in its own run dir, OUT/runs/<selector>_budget<b>_seed<s>. The run is resumable: a job
whose run dir already holds its final evaluation (a metrics.jsonl row at step train.steps with an accuracy) is
skipped, and an unfinished one resumes from its last checkpoint (the trainer does that). A run dir holding a
different config (other overrides) is an error rather than silently mixed.

Before the grid, `tip toy` builds or finds the embedded pair and prints its fingerprint, with a warning when it is
not the reference pair the README's tables were measured on (see tip_cli.toy.build.REFERENCE_FINGERPRINT).

Then `tip analyze` writes OUT/analysis/ (by_budget.md: selector, budget, kept-token share per quadrant, final
accuracy mean [min, max] over seeds; accuracy_vs_budget.png with min-max bars; per-run figures), and a compact
copy of the accuracy figure goes to --figure (docs/reproduce_accuracy.png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

# (name, overrides): the selectors of the comparison; ranking selectors run at each --budgets value
FULL = ("all", ["selector=all", "budget=1.0"])
Q3_ONLY = ("quadrant_Q3", ["selector=quadrant", "selector.quadrants=[Q3]", "budget=1.0"])
RANKERS = ("soft_or", "entropy", "random")
# every run measures the cosine between its budgeted and the full-token parameter gradient every 10 steps (SPEC 7a);
# the probe leaves the update unchanged
PROBE = ["train.grad_probe_every=10"]


def grid(budgets: list[float], seeds: list[int]) -> list[tuple[str, list[str]]]:
    """Every job as (run name, overrides), in the order they start: the slow full-token runs first."""
    points = [FULL] + [(f"{s}_budget{b:g}", [f"selector={s}", f"budget={b:g}"]) for b in budgets for s in RANKERS]
    points.append(Q3_ONLY)
    return [(f"{name}_seed{seed}", [*overrides, f"seed={seed}"]) for seed in seeds for name, overrides in points]


def final_accuracy(run_dir: Path, steps: int) -> float | None:
    """The accuracy logged at step `steps` (the final evaluation), or None when the run has not got there."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        row = json.loads(line) if line.strip() else {}
        if row.get("step") == steps:
            acc = [v for k, v in row.items() if k.startswith("eval/") and k.endswith("/accuracy")]
            if acc:
                return float(acc[0])
    return None


def run_job(overrides: list[str], run_dir: Path) -> tuple[int, float]:
    """One `tip train` process with one thread; its output goes to run_dir/train.log (appended on resume).
    Returns (exit code, seconds)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "tip_cli.cli", "train", *overrides, f"out_dir={run_dir}",
               f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir / "train.log").open("a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return code, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="tip train overrides applied to every job (train.steps=20)")
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"), help="run dirs and analysis go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time, one thread each")
    parser.add_argument("--figure", default="docs/reproduce_accuracy.png",
                        help="compact accuracy-vs-budget PNG (empty: none)")
    args = parser.parse_args()
    started = time.perf_counter()

    from tip_cli.cli import compose_config
    from tip_cli.config.compose import load_yaml, to_container
    from tip_cli.config.schema import ConfigError
    from tip_cli.train.rundir import config_changes

    jobs, todo = grid(args.budgets, args.seeds), []
    for name, overrides in jobs:
        run_dir = args.out / "runs" / name
        full = [*overrides, "logger=none", *PROBE, *args.overrides]
        try:
            cfg = compose_config([*full, f"out_dir={run_dir}"])
        except ConfigError as err:
            print(f"error: {name}: {err}", file=sys.stderr)
            return 2
        have = run_dir / "config.yaml"
        # the trainer's own test: keys a newer tip added count as their defaults, cadence and logging are harmless
        changes = config_changes(to_container(load_yaml(have)), cfg) if have.exists() else {}
        if changes:
            listed = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())
            print(f"error: {run_dir} holds a run with another config ({listed}); "
                  "delete it, or pass another --out", file=sys.stderr)
            return 2
        acc = final_accuracy(run_dir, cfg.train.steps)
        if acc is None:
            todo.append((name, full, run_dir, cfg.train.steps))
        else:
            print(f"skip {name}: finished (accuracy {acc:.3f})")
    print(f"{len(jobs)} jobs, {len(todo)} to run, {args.jobs} at a time, one thread each; logs: <run dir>/train.log",
          flush=True)

    if not any(o.startswith(("pair.", "pair=")) for o in args.overrides):
        # build (or find) the embedded pair once, before parallel jobs would each start building it; `tip toy` also
        # warns when it is not the pair the README's tables were measured on
        subprocess.run([sys.executable, "-m", "tip_cli.cli", "toy"], check=True)
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_job, full, run_dir): (name, run_dir, steps) for name, full, run_dir, steps in todo}
        for i, future in enumerate(as_completed(futures), 1):
            (code, seconds), (name, run_dir, steps) = future.result(), futures[future]
            acc = final_accuracy(run_dir, steps)
            if code or acc is None:
                failed.append(name)
                print(f"[{i}/{len(todo)}] FAILED {name} after {seconds:.0f} s: see {run_dir / 'train.log'}", flush=True)
            else:
                print(f"[{i}/{len(todo)}] {name}: accuracy {acc:.3f} ({seconds:.0f} s)", flush=True)
    if failed:
        print(f"error: {len(failed)} jobs failed ({', '.join(failed)}); fix and re-run: finished jobs are skipped",
              file=sys.stderr)
        return 1

    from tip_cli.analysis.report import analyze, save_compact_accuracy
    from tip_cli.analysis.runs import load_runs

    analysis = args.out / "analysis"
    run_dirs = [args.out / "runs" / name for name, _ in jobs]  # this grid's runs only, not others left in OUT/runs
    analyze(run_dirs, analysis, use_wandb=False)
    print((analysis / "by_budget.md").read_text())
    if args.figure:
        save_compact_accuracy(load_runs(run_dirs), Path(args.figure))
        print(f"figure: {args.figure}")
    print(f"analysis: {analysis}/ (summary.md, by_budget.md, accuracy_vs_budget.png, ...)")
    print(f"wall time: {time.perf_counter() - started:.0f} s ({len(todo)} jobs run, {len(jobs) - len(todo)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
