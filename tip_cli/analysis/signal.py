"""Where the learning signal comes from (SPEC 7a): the share of a step's full-token logit gradient that a selector
keeps, replayed on saved tokens.

A token sample that holds `grad_norm` (each sampled token's ||g_t||, tip_cli.tracking.save_token_sample) is enough
to ask any selector what it would have kept of the same tokens: its gradient share sum_{t in S} ||g_t||^2 /
sum_t ||g_t||^2 is the squared cosine between its budgeted logit gradient and the full-token one (the loss's
normaliser cancels). The selectors are the package's own (tip_cli.selection), on the run's importance settings. The
sample's tokens stand in for the rollout batch: H and D are normalised and split over them and K is counted over them
(scope batch; a sample has no sequence ids), which is the batch itself unless train.token_sample_size cut it.
Teachability needs each token's support mass C, which only a teachability run saves (`support_mass`): it is
replayed when every sample replayed holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tip_cli.analysis.runs import Run, load_token_sample, samples_with, selector_name
from tip_cli.selection.quadrants import AxisSpec, compute_stats
from tip_cli.selection.selectors import RANKING, SelectorSpec, needs_support, select

BUDGET_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# the selectors replayed, set as conf/selector/<name>.yaml sets them, by the label runs.selector_name gives their runs
COUNTERFACTUAL = {
    "entropy": SelectorSpec("entropy", mode="sample"),
    "divergence": SelectorSpec("divergence", mode="sample"),
    "soft_or": SelectorSpec("soft_or", mode="topk"),
    "random": SelectorSpec("random", mode="sample"),
    "quadrant [Q3]": SelectorSpec("quadrant", quadrants=("Q3",), cap_by="divergence"),
    "teachability": SelectorSpec("teachability", mode="topk"),  # where the sample holds support_mass
}


def _draws_noise(spec: SelectorSpec) -> bool:
    return spec.name == "random" or (spec.name in RANKING and spec.mode == "sample")


def counterfactual_share(
    sample: dict[str, np.ndarray],
    budgets: tuple[float, ...] = BUDGET_GRID,
    axis: AxisSpec = AxisSpec(),
    specs: dict[str, SelectorSpec] = COUNTERFACTUAL,
    draws: int = 4,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each selector of `specs`, at each budget, the gradient share sum_{t in S} g_t^2 / sum_t g_t^2 it keeps of
    the sample's tokens and its kept fraction |S| / N: label -> (share, kept), both [len(budgets)] float64 (NaN for no
    tokens or no gradient). Selectors that draw (random, mode sample) average `draws` seeded draws; one draw's noise is
    the same at every budget, so its kept sets nest. A selector that needs C is left out when the sample lacks it."""
    h = torch.from_numpy(np.asarray(sample["entropy"]))  # [N]
    d = torch.from_numpy(np.asarray(sample["divergence"]))  # [N]
    g2 = torch.from_numpy(np.asarray(sample["grad_norm"], dtype=np.float64)) ** 2  # [N]
    c = torch.from_numpy(np.asarray(sample["support_mass"])) if "support_mass" in sample else None  # [N]
    n, total = len(g2), float(g2.sum())
    stats = compute_stats(h, d, torch.zeros(n, dtype=torch.long), axis, c)
    out = {}
    for label, spec in specs.items():
        if needs_support(spec) and c is None:
            continue
        spec = dataclasses.replace(spec, scope="batch")
        share, kept = np.full((2, len(budgets)), np.nan)
        if n and total > 0:
            repeats = draws if _draws_noise(spec) else 1
            share[:], kept[:] = 0.0, 0.0
            for i in range(repeats):
                for j, budget in enumerate(budgets):
                    idx = select(stats, spec, budget, torch.Generator().manual_seed(seed + i))
                    share[j] += float(g2[idx].sum()) / total / repeats
                    kept[j] += idx.numel() / n / repeats
        out[label] = (share, kept)
    return out


@dataclass
class Counterfactual:
    """The predicted gradient share and kept fraction per selector (label -> [len(budgets)]), averaged over the
    token samples of `runs`."""

    budgets: tuple[float, ...]
    share: dict[str, np.ndarray]
    kept: dict[str, np.ndarray]
    runs: list[str]  # the runs whose samples were replayed
    samples: int


def axis_spec(cfg: Any) -> AxisSpec:
    """A run's importance settings (config.yaml) as the selection's AxisSpec."""
    imp = cfg.importance
    return AxisSpec(str(imp.norm), float(imp.clip_lo), float(imp.clip_hi), str(imp.threshold), float(imp.h_threshold),
                    float(imp.d_threshold))


def run_specs(cfg: Any) -> dict[str, SelectorSpec]:
    """COUNTERFACTUAL, with the mode and alpha the run trained with for its own (ranking) selector."""
    sel = cfg.selector
    return {label: dataclasses.replace(spec, mode=str(sel.mode), alpha=float(sel.alpha))
            if spec.name == sel.name and spec.name in RANKING else spec for label, spec in COUNTERFACTUAL.items()}


def signal_source(runs: list[Run]) -> list[Run]:
    """The runs whose samples are replayed: the full-token runs (selector all: their tokens are what every selector
    would have seen) that saved grad_norm, else the first run that did; none when no sample holds it."""
    with_grad = [r for r in runs if samples_with(r.path, "grad_norm")]
    full = [r for r in with_grad if r.selector == "all"]
    return full or with_grad[:1]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one intra-op thread: sorts of a few thousand tokens gain nothing from more, and on a busy CPU the
    hand-offs between threads cost far more than the work (a 20k-token sample: 2 s on one thread, 38 s on two loaded
    cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_counterfactual(runs: list[Run], budgets: tuple[float, ...] = BUDGET_GRID, max_samples: int = 4,
                       draws: int = 4) -> Counterfactual | None:
    """counterfactual_share over the samples holding grad_norm of each of `runs` (at most max_samples per run, evenly
    spaced over training), averaged over the samples, for the selectors replayed on all of them; None when there are
    none."""
    shares, kepts, names = [], [], []
    for run in runs:
        logged = {r["step"] for r in run.steps}  # a run split at its overrides replays each part's own samples
        steps = [s for s in samples_with(run.path, "grad_norm") if not logged or s in logged]
        if len(steps) > max_samples:
            steps = [steps[round(i)] for i in np.linspace(0, len(steps) - 1, max_samples)]
        for step in steps:
            _, sample = load_token_sample(run.path, step)
            with _one_thread():
                result = counterfactual_share(sample, budgets, axis_spec(run.cfg), run_specs(run.cfg), draws, seed=step)
            shares.append({k: s for k, (s, _) in result.items()})
            kepts.append({k: kept for k, (_, kept) in result.items()})
        names += [run.name] if steps else []
    if not shares:
        return None
    mean = lambda rows: {k: np.mean([r[k] for r in rows], axis=0) for k in rows[0] if all(k in r for r in rows)}  # noqa: E731
    return Counterfactual(tuple(budgets), mean(shares), mean(kepts), names, len(shares))


def measured_share(runs: list[Run]) -> dict[str, dict[float, list[Run]]]:
    """The budgeted runs that logged grad/kept_share, by label, then by configured budget."""
    out: dict[str, dict[float, list[Run]]] = {}
    for run in runs:
        if run.selector != "all" and run.mean("grad/kept_share") is not None:
            out.setdefault(run.label, {}).setdefault(run.budget, []).append(run)
    return out


def counterfactual_label(run: Run) -> str | None:
    """The COUNTERFACTUAL entry a run's selector replays, if any."""
    name = selector_name(run.cfg)
    return name if name in COUNTERFACTUAL else None
