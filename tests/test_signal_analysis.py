"""`tip analyze` on the learning-signal metrics (SPEC 7a): the counterfactual gradient share against plain sorts in
float64, and run dirs written here with and without the new fields (metrics.jsonl rows, token samples holding
grad_norm): which figures, columns and sections appear."""

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from tip_cli.analysis.plots import accuracy_vs_budget
from tip_cli.analysis.report import BUDGET_COLUMNS, analyze, budget_rows
from tip_cli.analysis.runs import load_runs, samples_with
from tip_cli.analysis.signal import COUNTERFACTUAL, counterfactual_share
from tip_cli.cli import compose_config
from tip_cli.selection.quadrants import AxisSpec
from tip_cli.selection.selectors import SelectorSpec

BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
TOPK = {
    "entropy": SelectorSpec("entropy", mode="topk"),
    "divergence": SelectorSpec("divergence", mode="topk"),
    "soft_or": SelectorSpec("soft_or", mode="topk"),
    "quadrant [Q3]": SelectorSpec("quadrant", quadrants=("Q3",), cap_by="divergence"),
}


def token_sample(n: int, seed: int, grad: bool = True) -> dict[str, np.ndarray]:
    """A token sample in the trainer's format (tip_cli.tracking.save_token_sample): distinct H, D (so that sorts have
    no ties) and, with grad, a grad_norm that is not a function of either."""
    rng = np.random.default_rng(seed)
    h = rng.permutation(np.arange(1, n + 1)).astype(np.float32) * np.float32(0.05)
    d = rng.permutation(np.arange(1, n + 1)).astype(np.float32) * np.float32(0.03)
    h_thr, d_thr = np.median(h.astype(np.float64)), np.median(d.astype(np.float64))
    sample = {
        "entropy": h, "divergence": d, "quadrant": (1 + 2 * (h <= h_thr) + (d <= d_thr)).astype(np.int8),
        "kept": np.ones(n, dtype=bool), "h_threshold": np.float32(h_thr), "d_threshold": np.float32(d_thr),
        "total_tokens": np.int64(n),
    }
    if grad:
        sample["grad_norm"] = rng.uniform(0.01, 2.0, n).astype(np.float32)
    return sample


def count(n: int, budget: float) -> int:
    return max(1, math.floor(budget * n + 0.5))


def share_of(sample, idx) -> float:
    g2 = sample["grad_norm"].astype(np.float64) ** 2
    return g2[idx].sum() / g2.sum()


def reference(sample, budget: float, h_hat, d_hat, h_q: float = 0.5, d_q: float = 0.5) -> dict[str, np.ndarray]:
    """The kept indices of each TOPK selector by plain sorts in float64; h_hat, d_hat: the normalised axes."""
    h, d = (sample[k].astype(np.float64) for k in ("entropy", "divergence"))
    k = count(len(h), budget)
    q3 = np.flatnonzero((h <= np.quantile(h, h_q)) & (d > np.quantile(d, d_q)))
    return {
        "entropy": np.argsort(-h)[:k],
        "divergence": np.argsort(-d)[:k],
        "soft_or": np.argsort(-(h_hat + d_hat - h_hat * d_hat))[:k],
        "quadrant [Q3]": q3[np.argsort(-d[q3])][:k],
    }


def minmax(x):
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


def rank(x):
    return np.argsort(np.argsort(x)) / (len(x) - 1)


@pytest.mark.parametrize("norm", ["minmax", "rank"])
def test_counterfactual_share_is_the_top_k_share_by_a_plain_sort(norm):
    n = 40
    sample = token_sample(n, seed=1)
    axis = AxisSpec(norm=norm, h_threshold=0.3, d_threshold=0.6)
    result = counterfactual_share(sample, BUDGETS, axis, TOPK)
    to_hat = minmax if norm == "minmax" else rank
    for j, budget in enumerate(BUDGETS):
        ref = reference(sample, budget, to_hat(sample["entropy"]), to_hat(sample["divergence"]), 0.3, 0.6)
        for label, idx in ref.items():
            share, kept = result[label]
            assert share[j] == pytest.approx(share_of(sample, idx), rel=1e-12), (label, budget)
            assert kept[j] == pytest.approx(len(idx) / n), (label, budget)
    q3 = reference(sample, 1.0, 0, 0, 0.3, 0.6)["quadrant [Q3]"]
    assert 0 < len(q3) < n * 0.5 and result["quadrant [Q3]"][0][-1] == pytest.approx(share_of(sample, q3))
    # the shares differ between selectors, so a selector swapped for another would show
    assert len({round(result[label][0][2], 9) for label in TOPK}) == len(TOPK)


def test_sampling_selectors_keep_no_zero_weight_token_and_random_keeps_its_expected_share():
    """Weight H^alpha: with K = the number of tokens of positive H, every draw keeps exactly those. Random: the
    expected share of a uniform K-subset is K / N, whatever the gradients."""
    n, n_pos = 50, 15
    sample = token_sample(n, seed=2)
    zero = np.random.default_rng(0).choice(n, n - n_pos, replace=False)
    sample["entropy"][zero] = 0.0
    budget = n_pos / n
    result = counterfactual_share(sample, (budget, 1.0), specs=COUNTERFACTUAL, draws=5)
    positive = np.flatnonzero(sample["entropy"] > 0)
    assert result["entropy"][0][0] == pytest.approx(share_of(sample, positive), rel=1e-12)
    assert result["entropy"][0][1] == pytest.approx(1.0)
    many = counterfactual_share(sample, (0.2,), specs={"random": COUNTERFACTUAL["random"]}, draws=400)
    assert many["random"][0][0] == pytest.approx(count(n, 0.2) / n, abs=0.02)
    assert many["random"][1][0] == pytest.approx(count(n, 0.2) / n)
    one = counterfactual_share(sample, (0.2,), specs={"random": COUNTERFACTUAL["random"]}, draws=1)
    assert one["random"][0][0] != pytest.approx(count(n, 0.2) / n, abs=1e-6)  # one draw is not the expectation


def test_no_gradient_gives_nan_not_a_share():
    sample = token_sample(10, seed=3)
    sample["grad_norm"][:] = 0.0
    share, kept = counterfactual_share(sample, (0.5,), specs=TOPK)["soft_or"]
    assert np.isnan(share).all() and np.isnan(kept).all()


@pytest.mark.parametrize("label", list(COUNTERFACTUAL))
def test_the_replayed_selectors_are_the_config_groups_defaults(label):
    name, *quadrants = label.replace("[", "").replace("]", "").split()
    overrides = [f"selector={name}"] + ([f"selector.quadrants=[{quadrants[0]}]"] if quadrants else [])
    assert compose_config(overrides).selector.spec() == COUNTERFACTUAL[label]


# ------------------------------------------------------------------------------------------- run dirs


def signal_rows(step: int, kept_share: float, probe: bool) -> dict[str, float]:
    """The SPEC 7a fields of one metrics.jsonl row."""
    row = {"grad/kept_share": kept_share, **{f"grad/q{q}_share": s for q, s in zip(range(1, 5), (0.5, 0.1, 0.3, 0.1), strict=True)},
           **{f"grad/kept_q{q}_share": 0.25 for q in range(1, 5)}, **{f"loss/q{q}_share": 0.25 for q in range(1, 5)},
           "select/overlap_entropy": 0.4, "select/overlap_divergence": 0.6, "teacher/topk_mass": 0.99,
           "teacher/topk_mass_p10": 0.95}
    if probe:
        row |= {"grad/param_cosine": 0.5 + step / 10, "grad/param_norm_ratio": 0.9}
    return row


def make_run(run_dir, overrides, signal: bool, seed=0, steps=4, share=lambda step: 0.5, samples=(2, 4)):
    """A run dir as the trainer leaves it; with signal, its rows hold the SPEC 7a fields (param cosine on even steps)
    and its token samples hold grad_norm."""
    cfg = compose_config([*overrides, f"seed={seed}", "logger=none"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    kept = 1.0 if cfg.selector.name == "all" else cfg.budget
    rows = [{"step": 0, "eval/toy/accuracy": 0.2}, {"step": steps, "eval/toy/accuracy": 0.3 + seed / 10}]
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 1.0 / step, "tokens/kept_frac": kept, "tokens/kept_q3_frac": 0.2}
        rows.append(row | (signal_rows(step, share(step), step % 2 == 0) if signal else {}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "token_samples").mkdir()
    for step in samples:
        np.savez_compressed(run_dir / "token_samples" / f"step_{step:06d}.npz", **token_sample(60, step, grad=signal))
    return run_dir


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal") / "sweep"
    make_run(root / "all", ["selector=all"], signal=True)
    for seed in (0, 1):
        make_run(root / f"soft_0.2_s{seed}", ["selector=soft_or", "budget=0.2"], signal=True, seed=seed,
                 share=lambda step, seed=seed: 0.3 + 0.1 * seed + step / 100)
    make_run(root / "soft_0.5", ["selector=soft_or", "budget=0.5"], signal=True, share=lambda step: 0.8)
    make_run(root / "hard_or", ["selector=hard_or", "budget=0.5"], signal=True, share=lambda step: 0.7)
    return root


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("old") / "sweep"
    make_run(root / "all", ["selector=all"], signal=False)
    make_run(root / "soft_0.2", ["selector=soft_or", "budget=0.2"], signal=False)
    return root


def section(text: str, title: str) -> list[dict[str, str]]:
    """The rows of the first table after `title` in a Markdown text."""
    lines = [line for line in text.split(title, 1)[1].split("\n\n## ")[0].splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[1:]]


def test_analyze_writes_the_signal_figures_columns_and_counterfactual_table(signal_runs, tmp_path):
    out = tmp_path / "analysis"
    _, files = analyze([signal_runs], out, use_wandb=False)
    names = {str(f.relative_to(out)) for f in files}
    assert {"grad_share_vs_budget.png", "grad_quadrant_share.png"} <= names
    for name in ("grad_share_vs_budget.png", "grad_quadrant_share.png", "accuracy_vs_budget.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000

    text = (out / "by_budget.md").read_text()
    rows = {(r["selector"], r["budget"]): r for r in section(text, "over seeds")}
    assert list(next(iter(rows.values()))) == BUDGET_COLUMNS
    # grad share: mean over steps of 0.3 + 0.1 * seed + step / 100, then over the two seeds
    per_seed = [np.mean([0.3 + 0.1 * seed + s / 100 for s in range(1, 5)]) for seed in (0, 1)]
    assert rows[("soft_or", "0.2")]["grad share"] == f"{np.mean(per_seed):.3f}"
    # param cosine: probe steps 2 and 4 only
    assert rows[("soft_or", "0.2")]["param cosine"] == f"{np.mean([0.7, 0.9]):.3f}"
    assert rows[("hard_or", "0.5")]["grad share"] == "0.700"

    predicted = {r["selector"]: r for r in section(text, "## Counterfactual gradient share")}
    assert list(predicted) == ["entropy (predicted)", "divergence (predicted)", "soft_or (predicted)",
                               "soft_or (measured)", "random (predicted)", "quadrant [Q3] (predicted)",
                               "hard_or (measured)"]
    # the full-token run's two samples replayed: soft_or keeps the top K by the min-max soft-OR score
    expected = []
    for step in (2, 4):
        sample = token_sample(60, step)
        idx = reference(sample, 0.2, minmax(sample["entropy"]), minmax(sample["divergence"]))["soft_or"]
        expected.append(share_of(sample, idx))
    assert predicted["soft_or (predicted)"]["0.2"] == f"{np.mean(expected):.3f}"
    assert predicted["soft_or (predicted)"]["1"] == "1.000"
    assert predicted["soft_or (measured)"]["0.2"] == f"{np.mean(per_seed):.3f}"
    assert predicted["soft_or (measured)"]["0.5"] == "0.800" and predicted["soft_or (measured)"]["0.1"] == "—"
    assert predicted["hard_or (measured)"]["0.5"] == "0.700"


def test_the_accuracy_figure_gains_a_gradient_share_panel_only_when_logged(signal_runs, old_runs):
    visible = lambda fig: [ax for ax in fig.axes if ax.get_visible()]  # noqa: E731
    with_grad = visible(accuracy_vs_budget(load_runs([signal_runs])))
    assert len(with_grad) == 3 and "gradient share" in with_grad[2].get_title()
    assert len(visible(accuracy_vs_budget(load_runs([old_runs])))) == 2
    assert len(visible(accuracy_vs_budget(load_runs([signal_runs]), best=False))) == 1  # the compact README panel


def test_old_run_dirs_get_no_signal_figures_and_dashes(old_runs, tmp_path):
    out = tmp_path / "analysis"
    _, files = analyze([old_runs], out, use_wandb=False)
    names = {str(f.relative_to(out)) for f in files}
    assert not {"grad_share_vs_budget.png", "grad_quadrant_share.png"} & names
    assert samples_with(old_runs / "all", "grad_norm") == [] and samples_with(old_runs / "all", "entropy") == [2, 4]
    text = (out / "by_budget.md").read_text()
    assert "Counterfactual" not in text
    rows = [dict(zip(BUDGET_COLUMNS, r, strict=True)) for r in budget_rows(load_runs([old_runs]))]
    assert {(r["grad share"], r["param cosine"]) for r in rows} == {("—", "—")}


def test_wandb_gets_the_signal_tables_and_figures_offline(signal_runs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "analysis"
    analyze([signal_runs / "all", signal_runs / "soft_0.5"], out, use_wandb=True)
    [run_dir] = (out / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    images = {str(p.relative_to(media / "images" / "analysis")).rsplit("_0_", 1)[0] for p in media.rglob("*.png")}
    assert {"grad_share_vs_budget", "grad_quadrant_share"} <= images
    [table] = media.rglob("grad_share_counterfactual_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][0] == "selector" and "0.5" in logged["columns"]
    assert [row[0] for row in logged["data"]][2:4] == ["soft_or (predicted)", "soft_or (measured)"]
    [by_budget] = media.rglob("by_budget_*.table.json")
    assert json.loads(by_budget.read_text())["columns"] == BUDGET_COLUMNS
