"""`tip eval` end to end on the embedded toy pair: the toy benchmark and a slice of MATH-500."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tip_cli.toy import build_toy

REPO = Path(__file__).resolve().parents[1]
MATH500 = REPO.parent / "shared" / "data" / "math500.jsonl"


@pytest.fixture(scope="module")
def toy_dir() -> Path:
    return build_toy()  # cached after the first build (a few minutes on 2 cores)


def tip_eval(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tip_cli.cli", "eval", *args, "logger=none", "train.device=cpu", f"out_dir={cwd}"]
    return subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)


def test_toy_benchmark_reproduces_the_accuracy_measured_at_build(tmp_path, toy_dir):
    built = json.loads((toy_dir / "build.json").read_text())["student"]["test_accuracy"]
    out = tip_eval(tmp_path, "toy://student", "benchmark=toy")
    result = json.loads((tmp_path / "toy_student" / "eval" / "toy" / "results.json").read_text())
    # greedy decoding of the same model: only batch padding differs from the build's own evaluation
    assert result["metrics"]["avg@1"] == pytest.approx(built, abs=0.015)
    assert len(result["records"]) == 200 and "avg@1" in out.stdout


@pytest.mark.skipif(not MATH500.is_file(), reason=f"{MATH500} not present")
def test_math500_slice_runs_the_whole_pipeline(tmp_path, toy_dir):
    tip_eval(tmp_path, "toy://student", "benchmark=math500", f"benchmark.path={MATH500}", "eval.limit=20",
             "eval.max_new_tokens=48")
    result = json.loads((tmp_path / "toy_student" / "eval" / "math500" / "results.json").read_text())
    assert result["settings"]["limit"] == 20 and len(result["records"]) == 20
    record = result["records"][0]
    assert {"id", "gold", "responses", "correct", "preds", "response_lens", "meta"} <= set(record)
    assert record["meta"]["subject"] and "Please reason step by step" in record["prompt"]
    metrics = result["metrics"]
    assert 0.0 <= metrics["avg@1"] <= 1.0 and 0.0 <= metrics["no_answer"] <= 1.0
    assert any(k.startswith("by_subject/") for k in metrics) and any(k.startswith("by_level/") for k in metrics)
