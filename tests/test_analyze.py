"""`tip analyze` on run dirs: the token samples a real training run (micro pair) wrote, and synthetic metrics.jsonl
files for the table rows, the files it writes, and the quadrant shares it prints."""

import json
import random
import shutil
import statistics

import numpy as np
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from tip_cli.analysis.plots import token_histogram
from tip_cli.analysis.report import (
    BUDGET_COLUMNS,
    COLUMNS,
    TIME_COLUMNS,
    analyze,
    budget_markdown,
    budget_rows,
)
from tip_cli.analysis.runs import load_runs, load_token_sample, quadrant_shares, samples_with
from tip_cli.cli import app, compose_config
from tip_cli.tracking import read_jsonl


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory):
    """A real 3-step run on the micro pair, saving token samples at steps 1 and 2. Off-median quadrant thresholds
    make the four quadrant shares differ, so a mix-up between quadrants shows."""
    from tip_cli.train.recipe import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_config([
        f"pair.teacher={micro['teacher']}", f"pair.student={micro['student']}", f"data.path={micro['train']}",
        f"benchmark.path={micro['test']}", "train.steps=3", "train.prompts_per_step=4", "rollout.max_new_tokens=12",
        "benchmark.max_new_tokens=12", "eval.limit=4", "logger=none", "train.eval_before=false",
        "train.token_sample_every=2", "selector=soft_or", "budget=0.5", "importance.threshold=quantile",
        "importance.h_threshold=0.3", "importance.d_threshold=0.6",
    ]), run)
    return run


def make_run(run_dir, overrides, samples=None, steps=4, accuracy=None, kept_frac=None, seed=0, extra=None):
    """A run dir as the trainer leaves it: config.yaml, metrics.jsonl (train steps, eval rows) and, from `samples`
    (a real run's token_samples/), its token samples.

    accuracy: {eval step: accuracy}, or None for a run that was never evaluated.
    extra: step -> more metrics of that step's row, replacing the defaults.
    """
    cfg = compose_config([*overrides, f"seed={seed}", "logger=none"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    kept = kept_frac if kept_frac is not None else (1.0 if cfg.selector.name == "all" else cfg.budget)
    rows = [{"step": s, "eval/toy/accuracy": acc, "eval/toy/num_problems": 50} for s, acc in (accuracy or {}).items()]
    for step in range(1, steps + 1):
        rows.append({
            "step": step, "loss": 1.0 / step, "tokens/kept_frac": kept,
            "tokens/q1_frac": 0.4, "tokens/q2_frac": 0.1, "tokens/q3_frac": 0.1, "tokens/q4_frac": 0.4,
            "tokens/kept_q1_frac": 0.7, "tokens/kept_q2_frac": 0.1, "tokens/kept_q3_frac": 0.2, "tokens/kept_q4_frac": 0.0,
            "div/mean": 0.5, "div/kept_mean": 0.8, "div/dropped_mean": 0.1, "rollout/accuracy": 0.25,
            "perf/peak_mem_gb": 1.0 + kept + step / 100, "time/step": 0.5 + kept, **(extra(step) if extra else {}),
        })
    rows.sort(key=lambda r: (r["step"], "loss" in r))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if samples is not None:
        shutil.copytree(samples, run_dir / "token_samples")
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, trained):
    """A budgets-style sweep: full-token, entropy and soft_or at two budgets, one entropy run never evaluated."""
    root = tmp_path_factory.mktemp("sweep") / "multirun" / "2026-01-01" / "00-00-00"
    samples = trained / "token_samples"
    make_run(root / "0_all", ["selector=all", "budget=1.0"], samples, accuracy={0: 0.2, 2: 0.5, 4: 0.4})
    make_run(root / "1_entropy_0.2", ["selector=entropy", "budget=0.2"], samples, accuracy={0: 0.2, 2: 0.3, 4: 0.36})
    make_run(root / "2_entropy_0.5", ["selector=entropy", "budget=0.5"], samples, accuracy=None)
    make_run(root / "3_soft_or_0.2", ["selector=soft_or", "budget=0.2"], samples, accuracy={0: 0.2, 2: 0.44, 4: 0.42})
    make_run(root / "4_soft_or_0.5", ["selector=soft_or", "budget=0.5"], samples, accuracy={0: 0.2, 4: 0.46})
    return root


@pytest.fixture(scope="module")
def analysis(sweep, tmp_path_factory):
    """`analyze` run once on the sweep (figures take a while): (out dir, printed table, files written)."""
    out = tmp_path_factory.mktemp("analysis")
    table, files = analyze([sweep], out, use_wandb=False)
    return out, table, files


def table_rows(summary_md: str) -> dict[str, dict[str, str]]:
    """The summary table of summary.md (its first table), by run name."""
    lines = summary_md[summary_md.index("| "):].split("\n\n")[0].splitlines()
    lines = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[1:]]
    return {row["run"]: row for row in rows}


def signal_figures(trained) -> set[str]:
    """The gradient-share figure, when the trainer's samples hold grad_norm (make_run logs no grad/* metric)."""
    return {"grad_share_vs_budget.png"} if samples_with(trained, "grad_norm") else set()


def test_analyze_writes_every_file(analysis, trained):
    out, _, files = analysis
    names = ["0_all", "1_entropy_0.2", "2_entropy_0.5", "3_soft_or_0.2", "4_soft_or_0.5"]
    expected = {"summary.md", "by_budget.md", "accuracy_vs_budget.png", "cost_vs_budget.png", "curves.png"}
    expected |= signal_figures(trained)
    expected |= {f"token_hist/{n}.png" for n in names} | {f"curves/{n}.png" for n in names}
    assert {str(f.relative_to(out)) for f in files} == expected
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected
    for png in out.rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png


def test_summary_has_one_right_row_per_run(analysis):
    out, table, _ = analysis
    rows = table_rows((out / "summary.md").read_text())
    assert table_rows(table) == rows
    assert list(rows) == ["0_all", "1_entropy_0.2", "2_entropy_0.5", "3_soft_or_0.2", "4_soft_or_0.5"]
    assert list(rows["0_all"]) == COLUMNS
    assert rows["0_all"] == {
        "run": "0_all", "selector": "all", "budget": "", "seed": "0", "steps": "4", "kept frac": "1.000",
        "Q3 share": "0.100", "Q3 share of kept": "0.200", "acc before": "0.200", "acc final": "0.400",
        "acc best": "0.500", "peak mem GB": "2.04", "s/step": "1.50", "time min": "0.1",
    }
    entropy = rows["1_entropy_0.2"]
    assert (entropy["selector"], entropy["budget"], entropy["kept frac"]) == ("entropy", "0.2", "0.200")
    assert (entropy["acc before"], entropy["acc final"], entropy["acc best"]) == ("0.200", "0.360", "0.360")
    assert rows["4_soft_or_0.5"]["acc final"] == "0.460" and rows["3_soft_or_0.2"]["acc best"] == "0.440"


def test_runs_missing_eval_results_have_blank_accuracy(analysis):
    rows = table_rows(analysis[1])
    never_evaluated = rows["2_entropy_0.5"]
    assert (never_evaluated["acc before"], never_evaluated["acc final"], never_evaluated["acc best"]) == ("", "", "")
    assert never_evaluated["kept frac"] == "0.500" and never_evaluated["steps"] == "4"


def test_a_run_with_nothing_but_a_config_and_no_samples_still_gets_a_row(tmp_path):
    run = tmp_path / "bare"
    make_run(run, ["selector=random", "budget=0.3"], steps=0, accuracy=None)
    table, files = analyze([run], tmp_path / "analysis", use_wandb=False)
    row = table_rows(table)["bare"]
    assert (row["selector"], row["steps"], row["kept frac"], row["acc final"], row["s/step"]) == ("random", "0", "", "", "")
    assert not any("token_hist" in str(f) for f in files)


def test_quadrant_shares_are_the_direct_counts():
    quadrant = np.array([1] * 7 + [2] * 3 + [3] * 5 + [4] * 10, dtype=np.int8)
    np.testing.assert_allclose(quadrant_shares(quadrant), [7 / 25, 3 / 25, 5 / 25, 10 / 25])
    np.testing.assert_allclose(quadrant_shares(np.array([3, 3], dtype=np.int8)), [0, 0, 1, 0])
    np.testing.assert_array_equal(quadrant_shares(np.array([], dtype=np.int8)), [0, 0, 0, 0])


def test_the_trainers_sample_holds_the_steps_tokens(trained):
    """The sample `tip analyze` reads is the whole rollout batch of its step: its counts and quadrant shares are
    the ones the trainer logged for that step."""
    step, sample = load_token_sample(trained, 1)
    logged = next(r for r in read_jsonl(trained / "metrics.jsonl") if r["step"] == step and "loss" in r)
    n = len(sample["quadrant"])
    assert n == int(sample["total_tokens"]) == logged["tokens/total"] and sample["kept"].sum() == logged["tokens/kept"]
    np.testing.assert_allclose(quadrant_shares(sample["quadrant"]), [logged[f"tokens/q{i}_frac"] for i in range(1, 5)])
    high_h, high_d = sample["entropy"] > sample["h_threshold"], sample["divergence"] > sample["d_threshold"]
    np.testing.assert_array_equal(sample["quadrant"], 1 + 2 * ~high_h + ~high_d)


def test_histogram_prints_the_shares_counted_from_the_sample(trained):
    _, sample = load_token_sample(trained)
    fig = token_histogram(sample, "title")
    q, kept = sample["quadrant"], sample["kept"]
    all_panel, kept_panel = ([t.get_text() for t in ax.texts] for ax in fig.axes[:2])
    for i in range(1, 5):
        share_all = np.sum(q == i) / len(q)
        share_kept = np.sum(q[kept] == i) / kept.sum()
        kept_of_q = np.sum(kept & (q == i)) / np.sum(q == i)
        assert sum(f"Q{i} (" in t and f"{share_all:.1%} of tokens" in t and f"{kept_of_q:.0%} of them kept" in t
                   for t in all_panel) == 1
        assert sum(f"Q{i} (" in t and f"{share_kept:.1%} of tokens" in t for t in kept_panel) == 1
    assert len({int(np.sum(q == i)) for i in range(1, 5)}) == 4  # distinct shares: swapped quadrants would fail


def test_token_sample_step_choice(trained, sweep):
    assert load_token_sample(trained)[0] == 2  # the last one by default (saved at steps 1 and 2 of 3)
    assert load_token_sample(trained, 1)[0] == 1
    assert load_token_sample(trained, 3)[0] == 2  # the nearest saved step
    assert load_token_sample(sweep.parent) is None


def test_labels_group_seeds_and_name_other_differences(tmp_path):
    root = tmp_path / "sweep"
    for seed in (0, 1):
        make_run(root / f"q3_s{seed}", ["selector=quadrant", "selector.quadrants=[Q1,Q3]", "budget=1.0"], seed=seed, accuracy={4: 0.1 + seed})
    make_run(root / "lr_a", ["selector=entropy", "optim.lr=0.001"], accuracy=None)
    make_run(root / "lr_b", ["selector=entropy", "optim.lr=0.0001"], accuracy=None)
    labels = {r.name: r.label for r in load_runs([root])}
    assert labels["q3_s0"] == labels["q3_s1"] == "quadrant [Q1,Q3]"
    assert labels["lr_a"] == "entropy (optim.lr=0.001)" and labels["lr_b"] == "entropy (optim.lr=0.0001)"


def test_tip_eval_curve_is_read_and_wins_over_in_training_evals(tmp_path):
    run = make_run(tmp_path / "run", ["selector=entropy"], accuracy={0: 0.9, 4: 0.3})
    curve = run / "eval" / "toy" / "curve.json"
    curve.parent.mkdir(parents=True)
    curve.write_text(json.dumps([{"step": 2, "accuracy": 0.6}, {"step": 4, "accuracy": 0.35}]))
    [loaded] = load_runs([run])
    assert loaded.accuracy == {0: 0.9, 2: 0.6, 4: 0.35}
    assert (loaded.acc_before, loaded.acc_final, loaded.acc_best) == (0.9, 0.35, 0.6)  # best is after step 0


def test_bad_paths_fail_with_a_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run dirs"):
        load_runs([tmp_path / "empty"])


def test_cli_prints_the_table_and_writes_into_out(tmp_path, monkeypatch):
    run = make_run(tmp_path / "runs" / "one", ["selector=entropy", "budget=0.2"], accuracy={0: 0.1, 4: 0.2})
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["analyze", str(run), "--no-wandb"])
    assert result.exit_code == 0, result.output
    assert "| one | entropy | 0.2 | 0 | 4 | 0.200 |" in result.output
    assert (tmp_path / "analysis" / "summary.md").exists()  # the default --out
    missing = CliRunner().invoke(app, ["analyze", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such directory" in " ".join(missing.output.split())


def test_wandb_gets_the_figures_and_table_offline(tmp_path, monkeypatch, trained):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "analysis"
    run = make_run(tmp_path / "run", ["selector=all"], trained / "token_samples", accuracy={4: 0.3})
    analyze([run], out, use_wandb=True)
    [run_dir] = (out / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    images = {str(p.relative_to(media / "images" / "analysis")).rsplit("_0_", 1)[0] for p in media.rglob("*.png")}
    expected = {"accuracy_vs_budget", "cost_vs_budget", "curves", "curves/run", "token_hist/run"}
    assert images == expected | {f.removesuffix(".png") for f in signal_figures(trained)}
    [table] = media.rglob("summary_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == COLUMNS and [row[0] for row in logged["data"]] == ["run"]


def test_by_budget_table_groups_seeds_with_mean_min_max(tmp_path):
    """by_budget.md: one row per (selector, budget) over seeds, full-token first, budgets high to low, uncapped
    quadrant last; final accuracy as mean [min, max] and the kept-token share per quadrant, against plain sums."""
    root = tmp_path / "runs"
    finals = {0: 0.5, 1: 0.7, 2: 0.6}
    for seed, acc in finals.items():
        make_run(root / f"all_{seed}", ["selector=all"], accuracy={0: 0.2, 4: acc + 0.1}, seed=seed)
        make_run(root / f"rand_{seed}", ["selector=random", "budget=0.1"], accuracy={0: 0.2, 4: acc - 0.3}, seed=seed)
        make_run(root / f"soft_{seed}", ["selector=soft_or", "budget=0.5"], accuracy={0: 0.2, 4: acc}, seed=seed)
    make_run(root / "q3", ["selector=quadrant", "budget=1.0"], accuracy={0: 0.2, 4: 0.4}, kept_frac=0.03)
    rows = [dict(zip(BUDGET_COLUMNS, r, strict=True)) for r in budget_rows(load_runs([root]))]
    assert [(r["selector"], r["budget"], r["seeds"]) for r in rows] == [
        ("all", "", "3"), ("soft_or", "0.5", "3"), ("random", "0.1", "3"), ("quadrant [Q3]", "1", "1")]
    mean = sum(finals.values()) / 3
    assert rows[1]["acc final: mean [min, max]"] == f"{mean:.3f} [0.500, 0.700]"
    assert rows[2]["acc final: mean [min, max]"] == f"{mean - 0.3:.3f} [0.200, 0.400]"
    assert rows[3]["acc final: mean [min, max]"] == "0.400"  # one seed: no range
    assert (rows[3]["kept frac"], rows[0]["acc before"]) == ("0.030", "0.200")
    # make_run logs kept shares 0.7, 0.1, 0.2, 0.0 for Q1..Q4 at every step
    assert [rows[1][f"Q{q} of kept"] for q in range(1, 5)] == ["0.700", "0.100", "0.200", "0.000"]
    text = budget_markdown(load_runs([root]))  # what analyze writes to by_budget.md (its figures take a while)
    assert "| soft_or | 0.5 | 3 |" in text and f"{mean:.3f} [0.500, 0.700]" in text


PHASE_KEYS = {"rollout": "time/rollout", "teacher": "time/teacher", "select": "time/select", "train": "time/train",
              "probe": "time/probe", "weight sync": "time/weight_sync", "wait": "time/wait"}


def timed_steps(seed, steps, names):
    """Random phase seconds per step (`names`: the phases logged; time/probe on even steps only) and a time/step a
    little above their sum."""
    rng = random.Random(seed)
    rows = {}
    for step in range(1, steps + 1):
        row = {n: rng.uniform(0.01, 2.0) for n in names if n != "time/probe" or step % 2 == 0}
        rows[step] = row | {"time/step": sum(row.values()) + rng.uniform(0.0, 0.1)}
    return rows


def time_table(text: str) -> dict[str, dict[str, str]]:
    """The "Where the time goes" table of summary.md (or of the printed output), by run name."""
    lines = text.split("Where the time goes")[-1].splitlines() if "Where the time goes" in text else text.splitlines()
    header = "| " + " | ".join(TIME_COLUMNS) + " |"
    start = lines.index(header)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(TIME_COLUMNS, cells, strict=True))
    return rows


def expected_cell(rows: dict[int, dict], key: str) -> str:
    """A phase's cell from plain statistics: the median seconds over the steps (0 where a step lacks a phase the run
    logged), and the summed seconds over the summed time/step."""
    if not any(key in r for r in rows.values()):
        return "—"
    seconds = [r.get(key, 0.0) for r in rows.values()]
    total = sum(r["time/step"] for r in rows.values())
    return f"{statistics.median(seconds):.3f} ({sum(seconds) / total:.1%})"


def test_where_the_time_goes_has_each_phases_median_and_share(tmp_path, monkeypatch):
    """summary.md and the printed output: per run the median seconds per step of each phase and its share of the
    step time, against statistics.median and plain sums; a run from an older trainer (time/sync, no time/wait) is
    read with its sync as weight sync."""
    root = tmp_path / "runs"
    new = timed_steps(1, 7, list(PHASE_KEYS.values()))
    old = timed_steps(2, 6, ["time/rollout", "time/teacher", "time/select", "time/train", "time/probe", "time/sync"])
    make_run(root / "new", ["selector=entropy", "budget=0.2"], steps=7, extra=new.get)
    make_run(root / "old", ["selector=all"], steps=6, extra=old.get)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["analyze", str(root), "--no-wandb"])
    assert result.exit_code == 0, result.output
    written = time_table((tmp_path / "analysis" / "summary.md").read_text())
    assert time_table(result.output) == written
    for name, rows, renamed in (("new", new, {}), ("old", old, {"time/weight_sync": "time/sync"})):
        row = written[name]
        assert row["s/step"] == f"{statistics.median(r['time/step'] for r in rows.values()):.3f}"
        for column, key in PHASE_KEYS.items():
            assert row[column] == expected_cell(rows, renamed.get(key, key)), (name, column)
        other = {s: {"other": r["time/step"] - sum(v for k, v in r.items() if k != "time/step"),
                     "time/step": r["time/step"]} for s, r in rows.items()}
        assert row["other"] == expected_cell(other, "other")
    assert written["old"]["wait"] == "—" and written["old"]["weight sync"] != "—"
    assert (tmp_path / "analysis" / "time_split.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rollouts_generated_in_the_background_lie_off_the_steps_path(tmp_path):
    """An overlapped run (rollout/staleness 1 from step 2 on): those steps' rollout seconds are shown but not taken
    out of other, which stays the step less the phases the trainer itself ran."""
    rng = random.Random(3)
    rows = {}
    for step in range(1, 6):
        row = {k: rng.uniform(0.05, 0.5) for k in PHASE_KEYS.values() if k != "time/probe"}
        ahead = step > 1
        path = sum(v for k, v in row.items() if not (ahead and k == "time/rollout"))
        rows[step] = row | {"time/step": path + 0.01 * step, "rollout/staleness": float(ahead)}
    make_run(tmp_path / "runs" / "overlap", ["selector=entropy"], steps=5, extra=rows.get)
    out = tmp_path / "analysis"
    analyze([tmp_path / "runs"], out, use_wandb=False)
    row = time_table((out / "summary.md").read_text())["overlap"]
    other = {s: {"other": 0.01 * s, "time/step": r["time/step"]} for s, r in rows.items()}
    assert row["other"] == expected_cell(other, "other")
    assert row["rollout"] == expected_cell(rows, "time/rollout")


def test_runs_without_phase_times_get_dashes_and_no_figure(tmp_path):
    """A run that logged only time/step (every phase —, other: all of the step) and one without a step (blank)."""
    bare = make_run(tmp_path / "runs" / "bare", ["selector=entropy"], steps=3)
    make_run(tmp_path / "runs" / "none", ["selector=random"], steps=0)
    out = tmp_path / "analysis"
    _, files = analyze([tmp_path / "runs"], out, use_wandb=False)
    rows = time_table((out / "summary.md").read_text())
    assert [rows["bare"][c] for c in PHASE_KEYS] == ["—"] * len(PHASE_KEYS)
    step = statistics.median(r["time/step"] for r in read_jsonl(bare / "metrics.jsonl"))
    assert (rows["bare"]["s/step"], rows["bare"]["other"]) == (f"{step:.3f}", f"{step:.3f} (100.0%)")
    assert set(rows["none"].values()) == {"none", ""}
    assert out / "time_split.png" not in files
