"""Finished runs, read: run dirs found below the given paths, each dir's `config.yaml`, `metrics.jsonl` (training
steps, and the evaluations done during training; an older trainer's time/sync is read as time/weight_sync),
`eval/<benchmark>/curve.json` (from `tip eval RUN_DIR`, when present), its `overrides.jsonl` (one Run per config it
ran under), labels and colors per variant, where each run's step time went, and the token samples
(`token_samples/step_*.npz`) the trainer saved.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from rich.console import Console

from tip_cli.config.compose import MOVED, load_yaml, set_key, to_container
from tip_cli.config.schema import ConfigError
from tip_cli.tracking import STEP_PHASES, read_jsonl

console = Console(stderr=True)

# config keys that never make a run a different variant: a seed is a repeat, the budget is the x-axis, and how a run
# was resumed or stops on SIGTERM changes nothing it computes
NOT_A_VARIANT = {"budget", "seed", "out_dir", "checkpoint", "train.resume", "train.sigterm_grace_s"}
# metric names an older trainer logged, read under today's name
RENAMED = {"time/sync": "time/weight_sync"}
OTHER = "other"  # time/step less the timed phases: packing the batch, merging and logging the metrics


def phase_label(key: str) -> str:
    """A phase in tables and legends: `time/weight_sync` -> `weight sync`."""
    return key.removeprefix("time/").replace("_", " ")


@dataclass
class TimeSplit:
    """Where a run's step time went, per phase (tracking.STEP_PHASES, then OTHER); None for a phase it never
    logged."""

    step: float  # median time/step, seconds
    mean_step: float
    median: dict[str, float | None]  # median seconds per step
    share: dict[str, float | None]  # the phase's summed seconds / the summed time/step
    # the share of rollout seconds spent in the background, while the step before trained (rollout/staleness > 0)
    ahead_share: float = 0.0


@dataclass
class Run:
    """One run dir, read: its config, training-step rows, and accuracy on one benchmark by eval step."""

    path: Path
    name: str  # the path relative to the analysed dirs, shown in tables and titles
    cfg: Any  # the run's config.yaml, attribute access (tip_cli.config.compose.load_yaml)
    steps: list[dict[str, Any]]  # rows of metrics.jsonl with a `loss`, in step order
    accuracy: dict[int, float]  # eval step -> accuracy; step 0 = before training
    benchmark: str
    num_problems: int | None = None
    label: str = ""  # the selector, plus the config values telling it apart from same-selector runs
    color: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def selector(self) -> str:
        return str(self.cfg.selector.name)

    @property
    def budget(self) -> float:
        return float(self.cfg.budget)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one training metric, skipping steps that lack it."""
        pairs = [(r["step"], r[key]) for r in self.steps if key in r]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def mean(self, key: str) -> float | None:
        values = self.series(key)[1]
        return statistics.fmean(values) if values else None

    @property
    def kept_frac(self) -> float:
        """Mean kept fraction over training; the configured budget when no step was logged."""
        kept = self.mean("tokens/kept_frac")
        return kept if kept is not None else (1.0 if self.selector == "all" else self.budget)

    @property
    def peak_mem_gb(self) -> float | None:
        values = self.series("perf/peak_mem_gb")[1]
        return max(values) if values else None

    @property
    def sec_per_step(self) -> float | None:
        values = self.series("time/step")[1]
        return statistics.median(values) if values else None

    def time_split(self) -> TimeSplit | None:
        """Where the time of the steps that logged time/step went; None without such a step."""
        timed = [r for r in self.steps if "time/step" in r]
        if not timed:
            return None
        logged = [p for p in STEP_PHASES if any(p in r for r in timed)]
        # a step without a phase the run logged elsewhere spent no time in it (time/probe off the probe steps)
        seconds = {p: [r.get(p, 0.0) for r in timed] for p in logged}
        step = [r["time/step"] for r in timed]
        # rollouts generated while the step before trained (rollout/staleness > 0) lie off this step's path
        ahead = [r.get("rollout/staleness", 0.0) > 0 for r in timed]
        seconds[OTHER] = [s - sum(seconds[p][i] for p in logged if not (p == "time/rollout" and ahead[i]))
                          for i, s in enumerate(step)]
        total = sum(step)
        ahead_s = sum(x for x, a in zip(seconds.get("time/rollout", []), ahead, strict=False) if a)
        return TimeSplit(
            statistics.median(step), statistics.fmean(step),
            {p: statistics.median(seconds[p]) if p in seconds else None for p in (*STEP_PHASES, OTHER)},
            {p: sum(seconds[p]) / total if p in seconds and total > 0 else None for p in (*STEP_PHASES, OTHER)},
            ahead_s / total if total > 0 else 0.0,
        )

    @property
    def train_minutes(self) -> float | None:
        values = self.series("time/step")[1]
        return sum(values) / 60 if values else None

    @property
    def acc_before(self) -> float | None:
        return self.accuracy.get(0)

    @property
    def acc_final(self) -> float | None:
        """Accuracy at the last evaluation after training began (None before any)."""
        after = [s for s in self.accuracy if s > 0]
        return self.accuracy[max(after)] if after else None

    @property
    def acc_best(self) -> float | None:
        after = [acc for s, acc in self.accuracy.items() if s > 0]
        return max(after) if after else None


# ---------------------------------------------------------------------------------------------- reading runs


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Every run dir (one holding metrics.jsonl) at or below each path; a path with none is an error."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory; give run dirs or sweep dirs (multirun/DATE/TIME)")
        runs = {p.parent.resolve() for p in path.rglob("metrics.jsonl")}
        if not runs:
            raise FileNotFoundError(f"{path}: no run dirs below it (a run dir holds metrics.jsonl; has training started?)")
        found |= runs
    return sorted(found)


def _accuracy_by_step(path: Path, rows: list[dict[str, Any]], benchmark: str) -> tuple[dict[int, float], int | None]:
    """Accuracy by step from the in-training evals, then from `tip eval RUN_DIR`'s curve.json (which wins)."""
    key = f"eval/{benchmark}/accuracy"
    accuracy = {int(r["step"]): float(r[key]) for r in rows if key in r}
    sizes = [r[f"eval/{benchmark}/num_problems"] for r in rows if f"eval/{benchmark}/num_problems" in r]
    curve = path / "eval" / benchmark / "curve.json"
    if curve.exists():
        points = json.loads(curve.read_text())
        accuracy |= {int(p["step"]): float(p["accuracy"]) for p in points if "accuracy" in p}
        sizes += [p["num_problems"] for p in points if "num_problems" in p]
    return accuracy, (int(sizes[-1]) if sizes else None)


def load_run(path: Path, name: str, benchmark: str | None = None) -> Run:
    cfg = load_yaml(path / "config.yaml")
    rows = [{RENAMED.get(k, k): v for k, v in r.items()} for r in read_jsonl(path / "metrics.jsonl")]
    bench = benchmark or str(cfg.benchmark.name)
    accuracy, num_problems = _accuracy_by_step(path, rows, bench)
    steps = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    return Run(path, name, cfg, steps, accuracy, bench, num_problems)


def split_at_overrides(run: Run) -> list[Run]:
    """A run continued with `train.resume=override` (its overrides.jsonl, tip_cli.train.rundir) as one Run per config it
    ran under: the steps after an override's step belong to its new values, those up to it to the old ones."""
    changes = read_jsonl(run.path / "overrides.jsonl")
    if not changes:
        return [run]
    cfgs = [run.cfg]  # config.yaml holds the newest values; walk back through the changes for the older ones
    for change in reversed(changes):
        cfg = copy.deepcopy(cfgs[0])
        for key, (old, _new) in change["changed"].items():
            set_key(cfg, MOVED.get(key, key), old)  # a key recorded under its old name: its new place
        cfgs.insert(0, cfg)
    edges = [0, *(int(c["step"]) for c in changes), math.inf]
    parts = []
    for cfg, lo, hi in zip(cfgs, edges, edges[1:], strict=False):
        steps = [r for r in run.steps if lo < r["step"] <= hi]
        accuracy = {s: a for s, a in run.accuracy.items() if lo < s <= hi or (s == 0 and lo == 0)}
        last = hi if hi != math.inf else max((r["step"] for r in steps), default=lo)
        parts.append(dataclasses.replace(run, name=f"{run.name} [steps {lo + 1}-{last}]", cfg=cfg, steps=steps,
                                         accuracy=accuracy))
    return parts


def selector_name(cfg: Any) -> str:
    """`entropy`, `soft_or`, ...; a quadrant selector with its quadrants: `quadrant [Q1,Q3]`."""
    name = str(cfg.selector.name)
    return f"{name} [{','.join(cfg.selector.quadrants)}]" if name == "quadrant" else name


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: str(node)}


def label_runs(runs: list[Run]) -> None:
    """Label each run by its selector and, where runs of one selector differ in other config values (say
    optim.lr), by those values too, so that each plotted line is one variant; give each label a color."""
    by_selector: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_selector[selector_name(run.cfg)].append(run)
    for name, group in by_selector.items():
        flat = [_flatten(to_container(r.cfg)) for r in group]
        keys = sorted({k for f in flat for k in f})
        varying = [k for k in keys if k not in NOT_A_VARIANT and not k.startswith("logger.") and len({f.get(k) for f in flat}) > 1]
        for run, f in zip(group, flat, strict=True):
            run.label = name + (" (" + ", ".join(f"{k}={f.get(k)}" for k in varying) + ")" if varying else "")
    palette = colormaps["tab10"].colors
    labels = sorted({(r.selector != "all", r.label) for r in runs})  # the full-token reference first
    labels = [label for _, label in labels]
    for run in runs:
        run.color = tuple(palette[labels.index(run.label) % len(palette)])


def load_runs(paths: Iterable[Path], benchmark: str | None = None) -> list[Run]:
    """Every run below `paths`, labelled and sorted by (label, budget, seed); runs without a readable config.yaml are
    skipped, each with a line."""
    paths = list(paths)
    dirs = find_run_dirs(paths)
    common = Path(os.path.commonpath([d.parent for d in dirs]))
    runs = []
    for d in dirs:
        if not (d / "config.yaml").exists():
            console.print(f"[yellow]skipping {d}: no config.yaml[/]", soft_wrap=True)
            continue
        try:
            run = load_run(d, str(d.relative_to(common)), benchmark)
        except ConfigError as err:  # a damaged config.yaml
            console.print(f"skipping {d}: {err}", style="yellow", soft_wrap=True, markup=False)
            continue
        runs += split_at_overrides(run)
    if not runs:
        raise FileNotFoundError(f"no run dir with a config.yaml below {', '.join(map(str, paths))}")
    label_runs(runs)
    runs.sort(key=lambda r: (r.selector != "all", r.label, r.budget, r.seed, r.name))
    return runs


def budget_groups(runs: list[Run]) -> dict[str, dict[float, list[Run]]]:
    """Runs by label, then by configured budget (repeats, such as seeds, share a group)."""
    groups: dict[str, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.label][run.budget].append(run)
    return groups


def describe(run: Run) -> str:
    """A run in figure titles and legends: its label, budget (unless selector=all) and seed."""
    return f"{run.label}" + ("" if run.selector == "all" else f", budget {run.budget:g}") + f", seed {run.seed}"


# ------------------------------------------------------------------------------------------- token samples


def token_sample_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "token_samples").glob("step_*.npz"))


def samples_with(run_dir: Path, key: str) -> list[int]:
    """The steps whose token sample holds the array `key` (an older trainer's samples lack the newer arrays)."""
    steps = []
    for step in token_sample_steps(run_dir):
        with np.load(run_dir / "token_samples" / f"step_{step:06d}.npz") as data:
            steps += [step] if key in data.files else []
    return steps


def load_token_sample(run_dir: Path, step: int | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
    """The token sample at `step` (the nearest saved one; the last when None), or None if the run saved none."""
    steps = token_sample_steps(run_dir)
    if not steps:
        return None
    chosen = steps[-1] if step is None else min(steps, key=lambda s: (abs(s - step), s))
    with np.load(run_dir / "token_samples" / f"step_{chosen:06d}.npz") as data:
        return chosen, {k: data[k] for k in data.files}


def quadrant_shares(quadrant: np.ndarray) -> np.ndarray:
    """Share of the tokens in Q1..Q4 ([4], summing to 1; all 0 for no tokens). quadrant: [N] ints in 1..4."""
    counts = np.bincount(np.asarray(quadrant, dtype=np.int64), minlength=5)[1:5]
    return counts / max(len(quadrant), 1)
