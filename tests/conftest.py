"""Shared fixtures: a micro teacher-student pair (seconds to build) with small train/test prompt files."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data dir (benchmark copies, DeepPlanning's tool schemas): $TIP_SHARED_DATA, else ../shared/data
    beside the repo; the test is skipped, saying where it looked, when neither exists."""
    path = Path(os.environ.get("TIP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}: set TIP_SHARED_DATA to the dir holding math500.jsonl")
    return path


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> dict[str, Path]:
    from tip_cli.toy import build_micro_pair, generate_problems

    root = tmp_path_factory.mktemp("micro")
    teacher, student = build_micro_pair(root, seed=0)
    problems = generate_problems(60, seed=123)
    for split, rows in (("train", problems[:40]), ("test", problems[40:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "teacher": teacher, "student": student,
            "train": root / "train.jsonl", "test": root / "test.jsonl"}


@pytest.fixture
def micro_overrides(micro) -> list[str]:
    """Overrides that point a run at the micro pair with tiny budgets (a step takes well under a second)."""
    return [
        f"pair.teacher={micro['teacher']}", f"pair.student={micro['student']}",
        f"data.path={micro['train']}", f"benchmark.path={micro['test']}",
        "train.steps=2", "train.prompts_per_step=4", "rollout.max_new_tokens=12",
        "benchmark.max_new_tokens=12", "eval.limit=4", "logger=none",
    ]
