"""The memory benchmark's harness (scripts/bench_memory.py) on a tiny config: report schema, ratios, budget order.

The numbers themselves live in the benchmark (README, Performance); nothing here asserts on time.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
ROW_KEYS = {"mode", "selector", "budget", "chunk", "n_tokens", "kept", "loss_chunk", "first_loss", "baseline_mb",
            "peak_mb", "loss_peak_mb", "step_s", "select_share", "steps"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    """naive, tip full-token and tip soft_or 0.1 with the loss chunk >= N, each in its own process (one thread:
    the machine may be shared, and two contended threads make small ops many times slower)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    bench.main(["--vocab", "32768", "--seq", "256", "--prompt", "8", "--warmup", "1", "--steps", "1", "--threads", "1",
                "--modes", "naive,tip", "--chunks", "full", "--budgets", "0.1", "--selectors", "soft_or",
                "--out", str(out)])
    return json.loads(out.read_text())


def test_report_has_one_measured_row_per_mode(report):
    assert [(r["mode"], r["budget"]) for r in report["rows"]] == [
("naive", 1.0), ("tip all", 1.0), ("tip soft_or", 0.1)]
    for row in report["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["n_tokens"] == 256 and len(row["steps"]) == 1
        assert row["peak_mb"] > 0 and row["loss_peak_mb"] > 0 and row["step_s"] > 0
    assert [r["kept"] for r in report["rows"]] == [256, 256, 26]
    assert all(r["loss_chunk"] == 256 for r in report["rows"][1:])
    assert {"target", "value", "limit", "met"} <= set(report["targets"][0])
    naive, full = report["rows"][0], report["rows"][1]
    assert full["first_loss"] == pytest.approx(naive["first_loss"], rel=1e-4)  # same models, tokens and loss


def test_ratios_are_computed_from_the_measured_numbers(report):
    naive, full = report["rows"][0], report["rows"][1]
    for row in report["rows"]:
        for key in ("peak_mb", "loss_peak_mb", "step_s"):
            assert row[f"{key}_x_naive"] == pytest.approx(row[key] / naive[key])
            assert row[f"{key}_x_tip_full"] == pytest.approx(row[key] / full[key])


def test_lower_budget_never_uses_more_loss_memory(report):
    full, low = report["rows"][1], report["rows"][2]  # budgets 1.0 and 0.1
    assert low["loss_peak_mb"] <= full["loss_peak_mb"] and low["peak_mb"] <= full["peak_mb"]


def test_targets_and_table_read_the_rows(bench):
    rows = [
        {"mode": "naive", "selector": "all", "budget": 1.0, "chunk": None, "kept": 8, "loss_chunk": None,
         "peak_mb": 100.0, "loss_peak_mb": 80.0, "step_s": 2.0, "select_share": None},
        {"mode": "tip all", "selector": "all", "budget": 1.0, "chunk": None, "kept": 8, "loss_chunk": 4,
         "peak_mb": 50.0, "loss_peak_mb": 40.0, "step_s": 4.0, "select_share": 0.2},
        {"mode": "tip soft_or", "selector": "soft_or", "budget": 0.5, "chunk": None, "kept": 4, "loss_chunk": 4,
         "peak_mb": 30.0, "loss_peak_mb": 16.0, "step_s": 3.0, "select_share": 0.25},
        {"mode": "trl", "selector": "all", "budget": 1.0, "chunk": None, "error": "exit -9 (killed: out of memory?)"},
    ]
    bench.add_ratios(rows)
    assert rows[2]["loss_peak_mb_x_tip_full"] == pytest.approx(0.4)
    assert rows[1]["peak_mb_x_naive"] == pytest.approx(0.5)
    got = {t["target"]: t for t in bench.targets(rows)}
    assert got["loss+bwd peak, soft_or 0.5 / tip full (default chunk)"]["met"] is True
    assert got["step peak, tip full / naive"]["met"] is True
    assert got["scoring+selection share of the tip full-token step"]["met"] is False
    assert got["step peak, tip full / trl"]["met"] is None  # trl failed: no verdict
    table = bench.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "out of memory" in table


def test_naive_tip_and_trl_steps_compute_the_same_reverse_kl(bench):
    pytest.importorskip("trl")
    tiny = bench.Bench(vocab=2048, seq=24, prompt=6, batch=2)
    pair = bench.build_pair(tiny)
    batch = bench.make_batch(tiny, pair.vocab, pair.device)
    meter = bench.Meter(pair.device)
    cfg = bench.compose_config(bench.Mode("tip").overrides(tiny))
    naive = bench.naive_loss(pair, batch, meter, {})
    tip = bench.tip_runner(cfg)(pair, batch, meter, {})
    trl = bench.trl_runner(pair)(pair, batch, meter, {})
    assert naive > 0 and tip == pytest.approx(naive, rel=1e-5) and trl == pytest.approx(naive, rel=1e-4)


def test_liger_is_skipped_without_a_gpu(bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "GPU" in bench.measure(bench.Mode("liger"), bench.Bench())["skipped"]
