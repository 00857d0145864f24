"""`tip analyze`: turn finished runs (one run dir, or every run of a sweep) into the paper's comparisons.

Reads each run's `config.yaml`, `metrics.jsonl` (training steps, and the evaluations done during training),
`eval/<benchmark>/curve.json` (from `tip eval RUN_DIR`, when present) and `token_samples/step_*.npz`, and writes:

  token_hist/<run>.png     student entropy H vs teacher-student divergence D of the tokens of one rollout batch,
                           all tokens and the kept ones, with the quadrant thresholds and each quadrant's share
  accuracy_vs_budget.png   final and best accuracy against the kept fraction, one line per selector, with the
                           full-token (selector=all) and before-training levels
  cost_vs_budget.png       peak memory and seconds/step against the kept fraction
  curves/<run>.png         loss, kept fraction, accuracy, quadrant shares and divergence over training, per run
  curves.png               loss, kept fraction, Q3 share and accuracy of every run on one figure
  summary.md               one row per run; the table is also printed
  by_budget.md             one row per (selector, budget) over seeds: kept-token share per quadrant and the
                           final accuracy as mean [min, max]; also printed

The x-axis "budget" of the comparison plots is the measured kept fraction, which equals the configured budget
for budget-driven selectors and is the region's share for mask selectors (quadrant, hard_or, and).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, to_rgb
from matplotlib.figure import Figure
from rich.console import Console

from tip_cli.config.compose import load_yaml, set_key, to_container
from tip_cli.tracking import init_wandb, read_jsonl

console = Console(stderr=True)

QUADRANT_NAMES = {1: "high H, high D", 2: "high H, low D", 3: "low H, high D", 4: "low H, low D"}
QUADRANT_COLORS = {1: "tab:red", 2: "tab:orange", 3: "tab:purple", 4: "tab:green"}
# config keys that never make a run a different variant: a seed is a repeat, the budget is the x-axis
NOT_A_VARIANT = {"budget", "seed", "out_dir", "checkpoint"}


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
    rows = read_jsonl(path / "metrics.jsonl")
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
            set_key(cfg, key, old)
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
    train.lr), by those values too, so that each plotted line is one variant; give each label a color."""
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
    """Every run below `paths`, labelled and sorted by (label, budget, seed); runs without config.yaml are skipped."""
    paths = list(paths)
    dirs = find_run_dirs(paths)
    common = Path(os.path.commonpath([d.parent for d in dirs]))
    runs = []
    for d in dirs:
        if not (d / "config.yaml").exists():
            console.print(f"[yellow]skipping {d}: no config.yaml[/]")
            continue
        runs += split_at_overrides(load_run(d, str(d.relative_to(common)), benchmark))
    if not runs:
        raise FileNotFoundError(f"no run dir with a config.yaml below {', '.join(map(str, paths))}")
    label_runs(runs)
    runs.sort(key=lambda r: (r.selector != "all", r.label, r.budget, r.seed, r.name))
    return runs


# ------------------------------------------------------------------------------------------- token samples


def token_sample_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "token_samples").glob("step_*.npz"))


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


def _log_floor(x: np.ndarray) -> float:
    """A positive lower edge for a log axis: half the smallest positive value (KL can round to 0 or below)."""
    positive = x[x > 0]
    return float(positive.min()) / 2 if positive.size else 1e-8


def _inside(c: float, lo: float, hi: float, half: float) -> float:
    return min(max(c, lo + half), hi - half) if hi - lo >= 2 * half else (lo + hi) / 2


def _label_spots(h: np.ndarray, d: np.ndarray, h_edges: np.ndarray, d_edges: np.ndarray, h_thr: float,
                 d_thr: float) -> dict[int, tuple[float, float]]:
    """Where to print each quadrant's label: of a few spots inside its region (log axes), the one whose
    label-sized neighbourhood covers the fewest tokens, so that labels hide as little of the histogram as may be."""
    lx, ly = np.log10(h), np.log10(d)
    x_lo, x_mid, x_hi = np.log10([h_edges[0], h_thr, h_edges[-1]])
    y_lo, y_mid, y_hi = np.log10([d_edges[0], d_thr, d_edges[-1]])
    half_w, half_h = 0.13 * (x_hi - x_lo), 0.08 * (y_hi - y_lo)  # a 3-line, 9-point label on these axes, padded
    spots = {}
    for q in range(1, 5):
        (x0, x1), (y0, y1) = ((x_mid, x_hi) if q in (1, 2) else (x_lo, x_mid)), ((y_mid, y_hi) if q in (1, 3) else (y_lo, y_mid))
        # spots keep the whole label inside the region when it is big enough, else sit at its centre;
        # of equally empty spots, the first (most central) wins
        fractions = (0.5, 0.35, 0.65, 0.2, 0.8)
        candidates = [(_inside(x0 + fx * (x1 - x0), x0, x1, half_w), _inside(y0 + fy * (y1 - y0), y0, y1, half_h))
                      for fx in fractions for fy in fractions]
        cx, cy = min(candidates, key=lambda c: int(((abs(lx - c[0]) < half_w) & (abs(ly - c[1]) < half_h)).sum()))
        spots[q] = (10**cx, 10**cy)
    return spots


def token_histogram(sample: dict[str, np.ndarray], title: str) -> Figure:
    """Two 2-D histograms of (H, D) on log axes, all sampled tokens and the kept ones, with the quadrant
    thresholds; each quadrant region is labelled with its share of the panel's tokens (and, on the left, the
    fraction of that quadrant the selector kept)."""
    h, d, quadrant, kept = sample["entropy"], sample["divergence"], sample["quadrant"], sample["kept"].astype(bool)
    h_floor, d_floor = _log_floor(h), _log_floor(d)
    h_plot, d_plot = np.maximum(h, h_floor), np.maximum(d, d_floor)
    h_thr, d_thr = max(float(sample["h_threshold"]), h_floor), max(float(sample["d_threshold"]), d_floor)
    h_edges = np.geomspace(h_floor, max(h_plot.max(), h_floor * 10) * 1.01, 41)
    d_edges = np.geomspace(d_floor, max(d_plot.max(), d_floor * 10) * 1.01, 41)
    counts_all = np.histogram2d(h_plot, d_plot, [h_edges, d_edges])[0]
    norm = LogNorm(vmin=1, vmax=max(counts_all.max(), 2))
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    spots = _label_spots(h_plot, d_plot, h_edges, d_edges, h_thr, d_thr)
    kept_of_quadrant = [kept[quadrant == q].mean() if (quadrant == q).any() else 0.0 for q in range(1, 5)]
    panels = (
        (axes[0], np.ones_like(kept), f"all {len(h):,} sampled tokens", True),
        (axes[1], kept, f"the {int(kept.sum()):,} kept tokens ({kept.mean():.0%})", False),
    )
    for ax, mask, panel_title, show_kept in panels:
        counts = np.histogram2d(h_plot[mask], d_plot[mask], [h_edges, d_edges])[0]
        image = ax.pcolormesh(h_edges, d_edges, np.ma.masked_equal(counts.T, 0), norm=norm, cmap="viridis")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(h_thr, color="crimson", linestyle="--", linewidth=1.5)
        ax.axhline(d_thr, color="crimson", linestyle="--", linewidth=1.5)
        shares = quadrant_shares(quadrant[mask])
        for q in range(1, 5):
            text = f"Q{q} ({QUADRANT_NAMES[q]})\n{shares[q - 1]:.1%} of tokens"
            if show_kept:
                text += f"\n{kept_of_quadrant[q - 1]:.0%} of them kept"
            ax.text(*spots[q], text, ha="center", va="center", fontsize=9,
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.75, "edgecolor": QUADRANT_COLORS[q]})
        ax.set_title(panel_title)
        ax.set_xlabel("student entropy H (nats, log scale)")
    axes[0].set_ylabel("teacher-student divergence D (nats, log scale)")
    fig.colorbar(image, ax=axes, label="tokens per bin (log scale)", shrink=0.9)
    fig.suptitle(f"{title}\nred dashed lines: the quadrant thresholds H = {h_thr:.3g} nats, D = {d_thr:.3g} nats")
    return fig


# ------------------------------------------------------------------------------------------------- figures


def _fmt(value: float | None, digits: int) -> str:
    """A table cell: blank for a missing value."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _budget_groups(runs: list[Run]) -> dict[str, dict[float, list[Run]]]:
    """Runs by label, then by configured budget (repeats, such as seeds, share a group)."""
    groups: dict[str, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.label][run.budget].append(run)
    return groups


def _plot_vs_budget(ax, runs: list[Run], metric, ylabel: str) -> bool:
    """One line per label of metric(run) against the kept fraction (mean over repeats; bars: min to max);
    selector=all as a horizontal line. Returns whether anything was drawn."""
    drawn = False
    for label, by_budget in _budget_groups(runs).items():
        points = []
        for group in by_budget.values():
            values = [v for v in map(metric, group) if v is not None]
            if values:
                points.append((statistics.fmean(r.kept_frac for r in group), statistics.fmean(values), min(values), max(values)))
        if not points:
            continue
        drawn = True
        first = next(iter(by_budget.values()))[0]
        full_token = first.selector == "all"
        x, y, lo, hi = map(np.array, zip(*sorted(points), strict=True))
        if full_token:
            ax.axhline(y.mean(), color=first.color, linestyle="--", linewidth=2, label=f"{label} (full-token OPD)")
        has_spread = bool((hi > lo).any())
        ax.errorbar(x, y, yerr=[y - lo, hi - y] if has_spread else None, color=first.color, marker="o", capsize=3,
                    linestyle="-" if len(x) > 1 else "none", label=None if full_token else label)
    ax.set_xlabel("token budget: fraction of response tokens trained on")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data in these runs", transform=ax.transAxes, ha="center", va="center", color="gray")
    return drawn


def _repeats_note(runs: list[Run]) -> str:
    repeated = any(len(g) > 1 for by_budget in _budget_groups(runs).values() for g in by_budget.values())
    return "; points: mean over repeats (seeds), bars: min to max" if repeated else ""


def accuracy_vs_budget(runs: list[Run], best: bool = True) -> Figure:
    """Final (and with best=True, best) accuracy against the kept fraction; best=False gives one compact panel."""
    fig = Figure(figsize=(13, 5.2) if best else (7.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True) if best else [fig.subplots()]
    benchmarks = sorted({r.benchmark for r in runs})
    sizes = sorted({r.num_problems for r in runs if r.num_problems})
    unit = f"{', '.join(benchmarks)} accuracy (fraction correct" + (f", {'/'.join(map(str, sizes))} problems)" if sizes else ")")
    panels = [(axes[0], lambda r: r.acc_final, "final: at the last evaluation")]
    if best:
        panels.append((axes[1], lambda r: r.acc_best, "best: highest evaluation after step 0"))
    for ax, metric, title in panels:
        if _plot_vs_budget(ax, runs, metric, unit):
            before = [r.acc_before for r in runs if r.acc_before is not None]
            if before:
                ax.axhline(statistics.fmean(before), color="gray", linestyle=":", linewidth=2, label="student before training")
            ax.legend(fontsize=8, loc="best")
        ax.set_title(title)
    if best:
        axes[1].yaxis.set_tick_params(labelleft=True)
        fig.suptitle("Accuracy vs token budget, per selector" + _repeats_note(runs))
    else:
        fig.suptitle("Final accuracy vs token budget" + _repeats_note(runs), fontsize=10)
    return fig


def save_compact_accuracy(runs: list[Run], path: Path) -> Path:
    """The final-accuracy panel alone, small enough to show in a README (about 600 x 370 pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    accuracy_vs_budget(runs, best=False).savefig(path, dpi=80)
    return path


def cost_vs_budget(runs: list[Run]) -> Figure:
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, ylabel, title in (
        (axes[0], lambda r: r.peak_mem_gb, "peak memory (GB)", "peak memory: CUDA max allocated, or CPU peak RSS"),
        (axes[1], lambda r: r.sec_per_step, "seconds per step (median over steps)", "time per training step"),
    ):
        if _plot_vs_budget(ax, runs, metric, ylabel):
            ax.legend(fontsize=8, loc="best")
        ax.set_title(title)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    fig.suptitle("Cost vs token budget, per selector" + _repeats_note(runs))
    return fig


def _describe(run: Run) -> str:
    return f"{run.label}" + ("" if run.selector == "all" else f", budget {run.budget:g}") + f", seed {run.seed}"


def _accuracy_panel(ax, run: Run, color, label: str | None = None) -> bool:
    if not run.accuracy:
        return False
    steps = sorted(run.accuracy)
    ax.plot(steps, [run.accuracy[s] for s in steps], marker="o", color=color, label=label)
    return True


def _quadrant_stack(ax, run: Run, prefix: str, title: str) -> None:
    steps = run.series(f"{prefix}q1_frac")[0]
    shares = [run.series(f"{prefix}q{q}_frac")[1] for q in range(1, 5)]
    if steps:
        ax.stackplot(steps, shares, colors=[QUADRANT_COLORS[q] for q in range(1, 5)], alpha=0.8,
                     labels=[f"Q{q} ({QUADRANT_NAMES[q]})" for q in range(1, 5)])
    ax.set(title=title, ylabel="share of tokens (stacked)", ylim=(0, 1), xlabel="training step")


def training_curves(run: Run) -> Figure:
    """Loss, kept fraction, accuracy, quadrant shares of all and of kept tokens, and divergence over steps."""
    fig = Figure(figsize=(16, 8.5), layout="constrained")
    (ax_loss, ax_kept, ax_acc), (ax_all, ax_sel, ax_div) = fig.subplots(2, 3, sharex=True)
    ax_loss.plot(*run.series("loss"), color="tab:blue")
    per = "kept token" if run.cfg.loss.norm == "selected" else "response token"
    ax_loss.set(title="distillation loss", ylabel=f"{run.cfg.loss.kind} loss (nats per {per})")
    ax_kept.plot(*run.series("tokens/kept_frac"), color="tab:blue", label="kept")
    if run.selector != "all":
        ax_kept.axhline(run.budget, color="gray", linestyle=":", label=f"budget {run.budget:g}")
    ax_kept.set(title="kept tokens", ylabel="fraction of response tokens", ylim=(0, 1.05))
    ax_kept.legend(fontsize=8)
    ax_acc.plot(*run.series("rollout/accuracy"), color="tab:gray", alpha=0.5, label="training rollouts")
    if _accuracy_panel(ax_acc, run, "tab:blue", f"{run.benchmark} evaluation"):
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, f"no {run.benchmark} evaluation results", transform=ax_acc.transAxes, ha="center", color="gray")
    ax_acc.set(title="accuracy", ylabel="fraction correct", ylim=(-0.02, 1.02))
    _quadrant_stack(ax_all, run, "tokens/", "quadrants of all response tokens")
    _quadrant_stack(ax_sel, run, "tokens/kept_", "quadrants of the kept tokens")
    if ax_all.get_legend_handles_labels()[0]:  # one legend for both stacks, below them: a legend inside would hide a band
        fig.legend(*ax_all.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=9)
    ax_div.plot(*run.series("div/mean"), color="tab:purple", label="all tokens")
    if run.selector != "all":  # nothing is dropped under selector=all
        ax_div.plot(*run.series("div/kept_mean"), color="tab:purple", linestyle="--", label="kept")
        ax_div.plot(*run.series("div/dropped_mean"), color="tab:purple", linestyle=":", label="dropped")
    ax_div.set(title="mean divergence D", ylabel="D (nats)", xlabel="training step")
    ax_div.legend(fontsize=8)
    for ax in (ax_loss, ax_kept, ax_acc, ax_all, ax_sel, ax_div):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training curves: {_describe(run)}\n{run.name}", fontsize=11)
    return fig


def curves_overview(runs: list[Run]) -> Figure:
    """Loss, kept fraction, Q3 share and eval accuracy of every run; a label's runs shade lighter with budget."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for run in runs:
        budgets = sorted({r.budget for r in runs if r.label == run.label})
        lighten = 0.6 * (len(budgets) - 1 - budgets.index(run.budget)) / max(len(budgets) - 1, 1)
        color = tuple(c + (1 - c) * lighten for c in to_rgb(run.color))
        label = _describe(run)
        axes[0, 0].plot(*run.series("loss"), color=color, label=label)
        axes[0, 1].plot(*run.series("tokens/kept_frac"), color=color)
        axes[1, 0].plot(*run.series("tokens/q3_frac"), color=color)
        _accuracy_panel(axes[1, 1], run, color)
    axes[0, 0].set(title="distillation loss", ylabel="loss (nats per token)")
    axes[0, 1].set(title="kept tokens", ylabel="fraction of response tokens", ylim=(0, 1.05))
    axes[1, 0].set(title=f"Q3 share ({QUADRANT_NAMES[3]})", ylabel="fraction of all tokens", xlabel="training step")
    benchmarks = ", ".join(sorted({r.benchmark for r in runs}))
    axes[1, 1].set(title=f"{benchmarks} evaluation accuracy", ylabel="fraction correct", xlabel="training step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right center", fontsize=8, title="run",
               ncol=1 if len(runs) <= 24 else 2)
    fig.suptitle(f"Training curves of {len(runs)} runs (lighter = smaller budget)")
    return fig


# ------------------------------------------------------------------------------------------------- the table

COLUMNS = ["run", "selector", "budget", "seed", "steps", "kept frac", "Q3 share", "Q3 share of kept",
           "acc before", "acc final", "acc best", "peak mem GB", "s/step", "time min"]


def summary_rows(runs: list[Run]) -> list[list[str]]:
    """One row per run (COLUMNS); missing values, such as the accuracy of a run never evaluated, are blank."""
    return [
        [
            run.name, run.label, "" if run.selector == "all" else f"{run.budget:g}", str(run.seed), str(len(run.steps)),
            _fmt(run.mean("tokens/kept_frac"), 3), _fmt(run.mean("tokens/q3_frac"), 3),
            _fmt(run.mean("tokens/kept_q3_frac"), 3), _fmt(run.acc_before, 3), _fmt(run.acc_final, 3),
            _fmt(run.acc_best, 3), _fmt(run.peak_mem_gb, 2), _fmt(run.sec_per_step, 2), _fmt(run.train_minutes, 1),
        ]
        for run in runs
    ]


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]) + "\n"


def summary_markdown(runs: list[Run], table: str, figures: list[Path], out: Path) -> str:
    benchmarks = ", ".join(sorted({r.benchmark for r in runs}))
    return (
        f"# tip analyze: {len(runs)} runs\n\n"
        f"Accuracy on {benchmarks}: before training (step 0), at the last evaluation (final), and the best after "
        "step 0; blank where a run has no evaluation. kept frac, Q3 share (low entropy, high divergence) and its "
        "share of the kept tokens: means over training steps. peak mem: the highest over steps (CUDA max "
        "allocated, or the process's peak RSS on CPU). s/step: median; time: the sum of the steps, in minutes. "
        "budget is blank for selector=all, which ignores it.\n\n"
        f"{table}\n## Figures\n\n" + "".join(f"- `{f.relative_to(out)}`\n" for f in figures)
    )


# ------------------------------------------------------------------------------- the table over seeds

BUDGET_COLUMNS = ["selector", "budget", "seeds", "kept frac", "Q1 of kept", "Q2 of kept", "Q3 of kept", "Q4 of kept",
                  "acc before", "acc final: mean [min, max]"]


def _spread(values: list[float]) -> str:
    """mean [min, max] of a group's values; the mean alone for one value; blank for none."""
    if not values:
        return ""
    mean = f"{statistics.fmean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} [{min(values):.3f}, {max(values):.3f}]"


def _mean_of(runs: list[Run], key: str) -> float | None:
    values = [v for v in (r.mean(key) for r in runs) if v is not None]
    return statistics.fmean(values) if values else None


def budget_rows(runs: list[Run]) -> list[list[str]]:
    """One row per (label, budget), over its repeats (seeds): the kept fraction and each quadrant's share of the
    kept tokens (means over steps, then over seeds), and the final accuracy as mean [min, max] over seeds.
    Order: full-token first, then budgets from high to low, then uncapped mask selectors (budget 1.0)."""
    groups = [(label, budget, group) for label, by_budget in _budget_groups(runs).items() for budget, group in by_budget.items()]

    def order(item):
        label, budget, group = item
        full, uncapped = group[0].selector == "all", budget >= 1.0 and group[0].selector != "all"
        return (not full, uncapped, -budget, label)

    rows = []
    for label, budget, group in sorted(groups, key=order):
        finals = [r.acc_final for r in group if r.acc_final is not None]
        befores = [r.acc_before for r in group if r.acc_before is not None]
        rows.append([
            label, "" if group[0].selector == "all" else f"{budget:g}", str(len(group)),
            _fmt(_mean_of(group, "tokens/kept_frac"), 3),
            *(_fmt(_mean_of(group, f"tokens/kept_q{q}_frac"), 3) for q in range(1, 5)),
            _fmt(statistics.fmean(befores) if befores else None, 3), _spread(finals),
        ])
    return rows


def budget_markdown(runs: list[Run]) -> str:
    """by_budget.md: the table of budget_rows with what its columns mean."""
    benchmarks = ", ".join(sorted({r.benchmark for r in runs}))
    return (
        f"# Final {benchmarks} accuracy by selector and budget, over seeds\n\n"
        "kept frac: the fraction of response tokens trained on; Qn of kept: each quadrant's share of the kept "
        "tokens (Q1 high entropy, high divergence; Q2 high H, low D; Q3 low H, high D: overconfident and wrong; "
        "Q4 low H, low D), means over steps and seeds; acc before: the student before training; acc final: "
        "at the last evaluation, mean [min, max] over the seeds. budget is blank for selector=all; for a mask "
        "selector (quadrant) 1 means uncapped.\n\n" + markdown_table(BUDGET_COLUMNS, budget_rows(runs))
    )


# --------------------------------------------------------------------------------------------------- W&B


def log_to_wandb(runs: list[Run], figures: list[Path], rows: list[list[str]], out: Path) -> str:
    """Log the figures and the table to a W&B run of job_type `analysis` (offline without credentials)."""
    import wandb

    logger = runs[0].cfg.logger
    run = init_wandb(logger, out, job_type="analysis", name=f"analysis of {len(runs)} runs",
                     config={"runs": [str(r.path) for r in runs]})
    images = {"analysis/" + str(f.relative_to(out).with_suffix("")): wandb.Image(str(f)) for f in figures}
    run.log(images | {"analysis/summary": wandb.Table(columns=COLUMNS, data=rows)})
    where = run.dir
    run.finish()
    return where


# ----------------------------------------------------------------------------------------------- the command


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.=+,-]+", "_", name).strip("_") or "run"


def analyze(paths: list[Path], out: Path, step: int | None = None, benchmark: str | None = None,
            use_wandb: bool | None = None) -> tuple[str, list[Path]]:
    """Write the figures and summary.md for the runs below `paths` into `out`; returns the Markdown table and
    the files written. use_wandb=None logs to W&B when every run did (logger=wandb)."""
    runs = load_runs(paths, benchmark)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        figures.append(path)

    for run in runs:
        sample = load_token_sample(run.path, step)
        if sample is None:
            console.print(f"[yellow]{run.name}: no token samples (train.token_sample_every=0?); no histogram[/]")
        else:
            sample_step, data = sample
            title = (f"Student entropy vs teacher-student divergence: {_describe(run)}, step {sample_step} "
                     f"({len(data['entropy']):,} of the batch's {int(data['total_tokens']):,} tokens)\n{run.name}")
            save(token_histogram(data, title), f"token_hist/{_file_name(run.name)}.png")
        save(training_curves(run), f"curves/{_file_name(run.name)}.png")
    save(accuracy_vs_budget(runs), "accuracy_vs_budget.png")
    save(cost_vs_budget(runs), "cost_vs_budget.png")
    save(curves_overview(runs), "curves.png")
    rows = summary_rows(runs)
    table = markdown_table(COLUMNS, rows)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(runs, table, figures, out))
    by_budget = out / "by_budget.md"
    by_budget.write_text(budget_markdown(runs))
    if use_wandb is None:
        use_wandb = all(r.cfg.logger.name == "wandb" for r in runs)
    if use_wandb:
        console.print(f"W&B: {log_to_wandb(runs, figures, rows, out)}")
    return table, [*figures, summary, by_budget]
