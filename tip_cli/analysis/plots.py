"""The figures of `tip analyze` (matplotlib, no display needed):

  token_histogram      student entropy H vs teacher-student divergence D of the tokens of one rollout batch, all
                       tokens and the kept ones, with the quadrant thresholds and each quadrant's share
  accuracy_vs_budget   final and best accuracy against the kept fraction, one line per selector, with the
                       full-token (selector=all) and before-training levels; and, when runs logged it, the
                       measured gradient share grad/kept_share
  grad_share_vs_budget the gradient share each selector would keep (replayed on saved tokens, analysis.signal)
                       beside the share the budgeted runs measured
  grad_quadrant_share  each quadrant's share of the full-token logit gradient over training, stacked
  cost_vs_budget       peak memory and seconds/step against the kept fraction
  time_split           where the time of a step goes: each phase's seconds per step, stacked, one bar per run
  training_curves      loss, kept fraction, accuracy, quadrant shares and divergence over training, one run
  curves_overview      loss, kept fraction, Q3 share and accuracy of every run on one figure

The x-axis "budget" of the comparison plots is the measured kept fraction, which equals the configured budget
for budget-driven selectors and is the region's share for mask selectors (quadrant, hard_or, and).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, to_rgb
from matplotlib.figure import Figure

from tip_cli.analysis.runs import OTHER, Run, budget_groups, describe, phase_label, quadrant_shares
from tip_cli.analysis.signal import Counterfactual, counterfactual_label
from tip_cli.tracking import STEP_PHASES

QUADRANT_NAMES = {1: "high H, high D", 2: "high H, low D", 3: "low H, high D", 4: "low H, low D"}
QUADRANT_COLORS = {1: "tab:red", 2: "tab:orange", 3: "tab:purple", 4: "tab:green"}


# ---------------------------------------------------------------------------------------- the token histogram


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


# --------------------------------------------------------------------------- budget comparisons, curves


def _plot_vs_budget(ax, runs: list[Run], metric, ylabel: str) -> bool:
    """One line per label of metric(run) against the kept fraction (mean over repeats; bars: min to max);
    selector=all as a horizontal line. Returns whether anything was drawn."""
    drawn = False
    for label, by_budget in budget_groups(runs).items():
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
    repeated = any(len(g) > 1 for by_budget in budget_groups(runs).values() for g in by_budget.values())
    return "; points: mean over repeats (seeds), bars: min to max" if repeated else ""


def _grad_share(run: Run) -> float | None:
    return run.mean("grad/kept_share")


def _grad_share_axes(ax) -> None:
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("gradient share kept: sum over kept of ||g_t||^2 / sum over all")


def accuracy_vs_budget(runs: list[Run], best: bool = True) -> Figure:
    """Final (and with best=True, best) accuracy against the kept fraction; best=False gives one compact panel.
    With best=True and runs that logged grad/kept_share, a third panel shows it (mean over steps)."""
    with_grad = best and any(_grad_share(r) is not None for r in runs)
    fig = Figure(figsize=(19, 5.2) if with_grad else (13, 5.2) if best else (7.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 3 if with_grad else 2) if best else [fig.subplots()]
    if best:
        axes[1].sharey(axes[0])
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
    if with_grad:
        if _plot_vs_budget(axes[2], runs, _grad_share, ""):
            axes[2].legend(fontsize=8, loc="best")
        _grad_share_axes(axes[2])
        axes[2].set_title("gradient share kept (grad/kept_share, mean over steps)")
    if best:
        axes[1].yaxis.set_tick_params(labelleft=True)
        fig.suptitle("Accuracy vs token budget, per selector" + _repeats_note(runs))
    else:
        fig.suptitle("Final accuracy vs token budget" + _repeats_note(runs), fontsize=10)
    return fig


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


def time_split(runs: list[Run]) -> Figure:
    """Where the time of a step goes: per run (runs with a timed step), each phase's mean seconds per step (its share
    of the summed step time times the mean step), stacked into one bar as long as the mean step; rollouts generated
    in the background (rollout.max_staleness=1) are left out of the bar, being off the step's path."""
    timed = [(r, split) for r in runs if (split := r.time_split()) is not None]
    runs, splits = [r for r, _ in timed], [s for _, s in timed]
    fig = Figure(figsize=(11, 1.6 + 0.45 * len(runs)), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(runs))
    colors = iter(colormaps["tab10"].colors)
    for phase in (*STEP_PHASES, OTHER):
        off_path = [s.ahead_share if phase == "time/rollout" else 0.0 for s in splits]
        seconds = np.array([max((s.share[phase] or 0.0) - a, 0.0) * s.mean_step for s, a in zip(splits, off_path,
                                                                                                strict=True)])
        color = "lightgray" if phase == OTHER else next(colors)
        if seconds.any():
            ax.barh(range(len(runs)), seconds, left=left, color=color, label=phase_label(phase))
        left += seconds
    ax.set_yticks(range(len(runs)), [r.name for r in runs], fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set(xlabel="seconds per training step (mean over steps)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="phase")
    fig.suptitle("Where the time goes: each phase's seconds per step")
    return fig


def _accuracy_panel(ax, run: Run, color, label: str | None = None) -> bool:
    if not run.accuracy:
        return False
    steps = sorted(run.accuracy)
    ax.plot(steps, [run.accuracy[s] for s in steps], marker="o", color=color, label=label)
    return True


def _quadrant_stack(ax, run: Run, key: str, title: str, ylabel: str = "share of tokens (stacked)") -> None:
    """Q1..Q4 of the metric `key` (with {q} for the quadrant's number) stacked over the steps that logged them."""
    steps = run.series(key.format(q=1))[0]
    shares = [run.series(key.format(q=q))[1] for q in range(1, 5)]
    if steps:
        ax.stackplot(steps, shares, colors=[QUADRANT_COLORS[q] for q in range(1, 5)], alpha=0.8,
                     labels=[f"Q{q} ({QUADRANT_NAMES[q]})" for q in range(1, 5)])
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1), xlabel="training step")


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
    _quadrant_stack(ax_all, run, "tokens/q{q}_frac", "quadrants of all response tokens")
    _quadrant_stack(ax_sel, run, "tokens/kept_q{q}_frac", "quadrants of the kept tokens")
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
    fig.suptitle(f"Training curves: {describe(run)}\n{run.name}", fontsize=11)
    return fig


def curves_overview(runs: list[Run]) -> Figure:
    """Loss, kept fraction, Q3 share and eval accuracy of every run; a label's runs shade lighter with budget."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for run in runs:
        budgets = sorted({r.budget for r in runs if r.label == run.label})
        lighten = 0.6 * (len(budgets) - 1 - budgets.index(run.budget)) / max(len(budgets) - 1, 1)
        color = tuple(c + (1 - c) * lighten for c in to_rgb(run.color))
        label = describe(run)
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



# ---------------------------------------------------------------------------- where the gradient comes from


def grad_share_vs_budget(predicted: Counterfactual | None, runs: list[Run]) -> Figure:
    """The gradient share each selector would keep against its kept fraction, replayed on saved tokens (dashed),
    beside the grad/kept_share the budgeted runs measured (points: mean over steps, then repeats)."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    colors = {counterfactual_label(r): r.color for r in runs if counterfactual_label(r)}
    spare = iter(colormaps["Dark2"].colors)
    if predicted is not None:
        for label, share in predicted.share.items():
            color = colors.get(label) or next(spare)
            ax.plot(predicted.kept[label], share, color=color, linestyle="--", marker=".", label=f"{label} (predicted)")
    _plot_vs_budget(ax, [r for r in runs if r.selector != "all"], _grad_share, "")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="share = kept fraction")
    _grad_share_axes(ax)
    ax.legend(fontsize=8, loc="lower right")
    source = (f"predicted: the selectors replayed on {predicted.samples} token samples of "
              f"{', '.join(predicted.runs)}" if predicted is not None else "no token samples with grad_norm")
    fig.suptitle(f"Gradient share kept vs token budget\n{source}; points: measured grad/kept_share of the budgeted runs",
                 fontsize=10)
    return fig


def grad_quadrant_share(runs: list[Run], limit: int = 12) -> Figure:
    """Each quadrant's share of the full-token logit gradient (grad/q1_share .. grad/q4_share) over training, one
    panel per run (at most `limit`)."""
    shown = runs[:limit]
    cols = min(3, len(shown))
    fig = Figure(figsize=(max(5.5 * cols, 11), 3.6 * math.ceil(len(shown) / cols) + 1.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(shown) / cols), cols, squeeze=False)).ravel()
    for ax, run in zip(axes, shown, strict=False):
        _quadrant_stack(ax, run, "grad/q{q}_share", f"{describe(run)}\n{run.name}", "share of sum ||g_t||^2 (stacked)")
        ax.title.set_fontsize(9)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=9)
    more = f" (the first {limit} of {len(runs)} runs)" if len(runs) > limit else ""
    fig.suptitle("Where the gradient comes from:\neach quadrant's share of the full-token logit gradient" + more)
    return fig
