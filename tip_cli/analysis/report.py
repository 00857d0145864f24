"""`tip analyze`: turn finished runs (one run dir, or every run of a sweep) into the paper's comparisons.

Reads each run's `config.yaml`, `metrics.jsonl` (training steps, and the evaluations done during training),
`eval/<benchmark>/curve.json` (from `tip eval RUN_DIR`, when present) and `token_samples/step_*.npz`, and writes:

  token_hist/<run>.png     student entropy H vs teacher-student divergence D of the tokens of one rollout batch,
                           all tokens and the kept ones, with the quadrant thresholds and each quadrant's share
  accuracy_vs_budget.png   final and best accuracy against the kept fraction, one line per selector, with the
                           full-token (selector=all) and before-training levels; a third panel with the measured
                           gradient share (grad/kept_share) when the runs logged it
  grad_share_vs_budget.png the gradient share each selector would keep, replayed on the token samples of the
                           full-token runs (analysis.signal), beside the budgeted runs' measured grad/kept_share;
                           when a sample holds grad_norm or a run logged grad/kept_share
  grad_quadrant_share.png  each quadrant's share of the logit gradient over training (grad/q1_share ..), stacked, for
                           the full-token runs (every run that logged it when none did)
  cost_vs_budget.png       peak memory and seconds/step against the kept fraction
  curves/<run>.png         loss, kept fraction, accuracy, quadrant shares and divergence over training, per run
  curves.png               loss, kept fraction, Q3 share and accuracy of every run on one figure
  time_split.png           where the time of a step goes: each phase's mean seconds per step, stacked, per run
  summary.md               one row per run, and where the time goes (each phase's median seconds per step and
                           its share of the training time); the tables are also printed
  by_budget.md             one row per (selector, budget) over seeds: kept-token share per quadrant, gradient
                           share, parameter-gradient cosine and the final accuracy as mean [min, max]; and the
                           predicted gradient share per selector and budget beside the measured one; also printed

The x-axis "budget" of the comparison plots is the measured kept fraction, which equals the configured budget
for budget-driven selectors and is the region's share for mask selectors (quadrant, hard_or, and). Runs are read
by tip_cli.analysis.runs, the figures drawn by tip_cli.analysis.plots; this module writes the tables and the files.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from tip_cli.analysis.plots import (
    accuracy_vs_budget,
    cost_vs_budget,
    curves_overview,
    grad_quadrant_share,
    grad_share_vs_budget,
    time_split,
    token_histogram,
    training_curves,
)
from tip_cli.analysis.runs import (
    OTHER,
    Run,
    budget_groups,
    console,
    describe,
    load_runs,
    load_token_sample,
    phase_label,
)
from tip_cli.analysis.signal import (
    BUDGET_GRID,
    Counterfactual,
    counterfactual_label,
    measured_share,
    run_counterfactual,
    signal_source,
)
from tip_cli.tracking import STEP_PHASES, init_wandb

ABSENT = "—"  # a metric (a SPEC 7a research metric, a step phase) the runs did not log


def _fmt(value: float | None, digits: int) -> str:
    """A table cell: blank for a missing value."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


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
        f"{table}\n## Where the time goes\n\n{TIME_NOTE}\n\n{markdown_table(TIME_COLUMNS, time_rows(runs))}"
        "\n## Figures\n\n" + "".join(f"- `{f.relative_to(out)}`\n" for f in figures)
    )


# -------------------------------------------------------------------------------------- where the time goes

TIME_COLUMNS = ["run", "s/step", *(phase_label(p) for p in STEP_PHASES), OTHER]
TIME_NOTE = (
    "Each phase of a training step (time/rollout, time/teacher, time/select, time/train, time/probe, "
    "time/weight_sync, time/wait): its median seconds per step, and in brackets its share of the training time (its "
    "seconds summed over the steps / time/step summed), so the shares add up to 100% where the medians need not add "
    "up to s/step (the median time/step). other: time/step less the timed phases (packing the batch, merging and "
    "logging the metrics). A step that did not run a phase counts 0 (time/probe off the probe steps); — where a run "
    "did not log the phase. With rollout.max_staleness=1 a step's rollouts were generated in the background while "
    "the step before trained (rollout/staleness > 0): their seconds are shown but lie off the step's path, so other "
    "leaves them out and the shares add up to more than 100%; time/wait is what the trainer waited for them."
)


def time_rows(runs: list[Run]) -> list[list[str]]:
    """One row per run (TIME_COLUMNS): median seconds (share of the summed step time) per phase; blank without a
    timed step."""
    rows = []
    for run in runs:
        split = run.time_split()
        if split is None:
            rows.append([run.name] + [""] * (len(TIME_COLUMNS) - 1))
            continue
        cells = [ABSENT if split.median[p] is None else f"{split.median[p]:.3f} ({split.share[p]:.1%})"
                 for p in (*STEP_PHASES, OTHER)]
        rows.append([run.name, _fmt(split.step, 3), *cells])
    return rows


# ------------------------------------------------------------------------------- the table over seeds

BUDGET_COLUMNS = ["selector", "budget", "seeds", "kept frac", "Q1 of kept", "Q2 of kept", "Q3 of kept", "Q4 of kept",
                  "grad share", "param cosine", "acc before", "acc final: mean [min, max]"]


def _spread(values: list[float]) -> str:
    """mean [min, max] of a group's values; the mean alone for one value; blank for none."""
    if not values:
        return ""
    mean = f"{statistics.fmean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} [{min(values):.3f}, {max(values):.3f}]"


def _mean_of(runs: list[Run], key: str) -> float | None:
    values = [v for v in (r.mean(key) for r in runs) if v is not None]
    return statistics.fmean(values) if values else None


def _signal(runs: list[Run], key: str) -> str:
    """A research metric's mean over steps, then over runs; ABSENT when no run logged it."""
    value = _mean_of(runs, key)
    return ABSENT if value is None else f"{value:.3f}"


def budget_rows(runs: list[Run]) -> list[list[str]]:
    """One row per (label, budget), over its repeats (seeds): the kept fraction, each quadrant's share of the
    kept tokens, the gradient share kept and the parameter-gradient cosine of the probe steps (means over steps, then
    over seeds), and the final accuracy as mean [min, max] over seeds.
    Order: full-token first, then budgets from high to low, then uncapped mask selectors (budget 1.0)."""
    groups = [(label, budget, group) for label, by_budget in budget_groups(runs).items() for budget, group in by_budget.items()]

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
            _signal(group, "grad/kept_share"), _signal(group, "grad/param_cosine"),
            _fmt(statistics.fmean(befores) if befores else None, 3), _spread(finals),
        ])
    return rows


def counterfactual_columns(predicted: Counterfactual) -> list[str]:
    return ["selector", *(f"{b:g}" for b in predicted.budgets)]


def counterfactual_rows(predicted: Counterfactual, runs: list[Run]) -> list[list[str]]:
    """The predicted gradient share per selector at each budget, each followed by the measured grad/kept_share
    (mean over steps, then seeds) of the runs of that selector at the budgets they ran; ABSENT where none ran.
    Measured runs of a selector not replayed (hard_or, a quadrant set other than [Q3]) come last."""
    measured = measured_share(runs)
    replays = {label: counterfactual_label(next(iter(g.values()))[0]) for label, g in measured.items()}

    def measured_row(label: str) -> list[str]:
        by_budget = measured[label]
        return [f"{label} (measured)", *(_signal(by_budget[b], "grad/kept_share") if b in by_budget else ABSENT
                                         for b in predicted.budgets)]

    rows = []
    for label, share in predicted.share.items():
        rows.append([f"{label} (predicted)", *(_fmt(float(v), 3) or ABSENT for v in share)])
        rows += [measured_row(m) for m in measured if replays[m] == label]
    return rows + [measured_row(m) for m in measured if replays[m] not in predicted.share]


def predict(runs: list[Run]) -> Counterfactual | None:
    """The counterfactual of analysis.signal for these runs: replayed on signal_source's samples, at BUDGET_GRID and
    every budget a run of a replayed selector ran at (so that predicted and measured meet in one column)."""
    source = signal_source(runs)
    ran = {r.budget for r in runs if r.selector != "all" and counterfactual_label(r)}
    return run_counterfactual(source, tuple(sorted(set(BUDGET_GRID) | ran))) if source else None


def budget_markdown(runs: list[Run], predicted: Counterfactual | None = None) -> str:
    """by_budget.md: the table of budget_rows with what its columns mean; with `predicted`, the counterfactual
    gradient share beside the measured one."""
    benchmarks = ", ".join(sorted({r.benchmark for r in runs}))
    text = (
        f"# Final {benchmarks} accuracy by selector and budget, over seeds\n\n"
        "kept frac: the fraction of response tokens trained on; Qn of kept: each quadrant's share of the kept "
        "tokens (Q1 high entropy, high divergence; Q2 high H, low D; Q3 low H, high D: overconfident and wrong; "
        "Q4 low H, low D); grad share: the kept tokens' share of the full-token logit gradient, sum over kept "
        "||g_t||^2 / sum over all (its square root is the cosine between the budgeted and the full-token logit "
        "gradient); param cosine: the cosine between the budgeted and the full-token gradient over the student's "
        "parameters, on probe steps; means over steps and seeds, — where the runs did not log them. acc before: "
        "the student before training; acc final: at the last evaluation, mean [min, max] over the seeds. budget is "
        "blank for selector=all; for a mask selector (quadrant) 1 means uncapped.\n\n"
        + markdown_table(BUDGET_COLUMNS, budget_rows(runs))
    )
    if predicted is None:
        return text
    return text + (
        "\n## Counterfactual gradient share\n\n"
        f"predicted: the share of the logit gradient each selector would keep at each budget, replayed on the same "
        f"tokens ({predicted.samples} token samples of {', '.join(predicted.runs)}, mean over the samples; random "
        "and sampling selectors: mean over seeded draws); measured: grad/kept_share of the runs of that selector "
        "(mean over steps, then seeds).\n\n"
        + markdown_table(counterfactual_columns(predicted), counterfactual_rows(predicted, runs))
    )


# --------------------------------------------------------------------------------------------------- W&B


def log_to_wandb(runs: list[Run], figures: list[Path], rows: list[list[str]], out: Path,
                 predicted: Counterfactual | None = None) -> str:
    """Log the figures and the tables (summary, where the time goes, by budget, and the counterfactual gradient share
    when there is one) to a W&B run of job_type `analysis` (offline without credentials)."""
    import wandb

    logger = runs[0].cfg.logger
    run = init_wandb(logger, out, job_type="analysis", name=f"analysis of {len(runs)} runs",
                     config={"runs": [str(r.path) for r in runs]})
    images = {"analysis/" + str(f.relative_to(out).with_suffix("")): wandb.Image(str(f)) for f in figures}
    tables = {"analysis/summary": wandb.Table(columns=COLUMNS, data=rows),
              "analysis/by_budget": wandb.Table(columns=BUDGET_COLUMNS, data=budget_rows(runs)),
              "analysis/time": wandb.Table(columns=TIME_COLUMNS, data=time_rows(runs))}
    if predicted is not None:
        tables["analysis/grad_share_counterfactual"] = wandb.Table(columns=counterfactual_columns(predicted),
                                                                   data=counterfactual_rows(predicted, runs))
    run.log(images | tables)
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
            title = (f"Student entropy vs teacher-student divergence: {describe(run)}, step {sample_step} "
                     f"({len(data['entropy']):,} of the batch's {int(data['total_tokens']):,} tokens)\n{run.name}")
            save(token_histogram(data, title), f"token_hist/{_file_name(run.name)}.png")
        save(training_curves(run), f"curves/{_file_name(run.name)}.png")
    save(accuracy_vs_budget(runs), "accuracy_vs_budget.png")
    save(cost_vs_budget(runs), "cost_vs_budget.png")
    save(curves_overview(runs), "curves.png")
    predicted = predict(runs)
    if predicted is not None or measured_share(runs):
        save(grad_share_vs_budget(predicted, runs), "grad_share_vs_budget.png")
    with_quadrants = [r for r in runs if r.series("grad/q1_share")[0]]
    if with_quadrants:
        save(grad_quadrant_share([r for r in with_quadrants if r.selector == "all"] or with_quadrants),
             "grad_quadrant_share.png")
    timed = [r for r in runs if (split := r.time_split()) and any(split.median[p] is not None for p in STEP_PHASES)]
    if timed:
        save(time_split(timed), "time_split.png")
    rows = summary_rows(runs)
    table = markdown_table(COLUMNS, rows)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(runs, table, figures, out))
    by_budget = out / "by_budget.md"
    by_budget.write_text(budget_markdown(runs, predicted))
    if use_wandb is None:
        use_wandb = all(r.cfg.logger.name == "wandb" for r in runs)
    if use_wandb:
        console.print(f"W&B: {log_to_wandb(runs, figures, rows, out, predicted)}")
    return table, [*figures, summary, by_budget]


def save_compact_accuracy(runs: list[Run], path: Path) -> Path:
    """The final-accuracy panel alone, small enough to show in a README (about 600 x 370 pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    accuracy_vs_budget(runs, best=False).savefig(path, dpi=80)
    return path
