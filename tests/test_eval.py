"""`tip eval` end to end on the micro pair: the toy benchmark against a plain greedy decode, and a slice of MATH-500."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip_cli.grading import grade

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(micro, tmp_path) -> Path:
    """A private copy of the micro teacher (a few SFT steps: it writes the solution format)."""
    return Path(shutil.copytree(micro["teacher"], tmp_path / "model"))


def tip_eval(model_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`tip eval model_dir` with out_dir beside it; returns the process and the eval dir its results go to (never
    inside the model's own folder)."""
    out = model_dir.parent / "out"
    cmd = [sys.executable, "-m", "tip_cli.cli", "eval", str(model_dir), *args, "logger=none", "train.device=cpu",
           f"out_dir={out}"]
    done = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    assert not (model_dir / "eval").exists()
    return done, out / model_dir.name / "eval"


@torch.no_grad()
def greedy_one_by_one(path: Path, problems: list[str], max_new_tokens: int) -> list[str]:
    """The reference: each prompt alone (no padding), rendered by the chat template, HF greedy decoding."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    for problem in problems:
        text = tok.apply_chat_template([{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_toy_benchmark_matches_a_plain_greedy_decode(micro, model_dir):
    out, eval_dir = tip_eval(model_dir, "benchmark=toy", f"benchmark.path={micro['test']}", "eval.limit=8",
                             "eval.max_new_tokens=40")
    result = json.loads((eval_dir / "toy" / "results.json").read_text())
    rows = [json.loads(line) for line in micro["test"].read_text().splitlines()][:8]
    want = greedy_one_by_one(model_dir, [r["problem"] for r in rows], 40)
    assert [r["id"] for r in result["records"]] == [r["id"] for r in rows]
    assert [r["responses"][0] for r in result["records"]] == want
    assert len({len(r["problem"]) for r in rows}) > 1  # prompts of several lengths: the engine left-padded them
    correct = [grade(w, r["answer"]).correct for w, r in zip(want, rows, strict=True)]
    assert [r["correct"][0] for r in result["records"]] == correct
    assert result["metrics"]["avg@1"] == pytest.approx(sum(correct) / len(rows))
    assert "avg@1" in out.stdout


def test_math500_slice_runs_the_whole_pipeline(micro, model_dir, shared_data, tmp_path):
    # the micro model's context is 512 tokens of a toy tokenizer: the slice holds problems that fit it (a prompt that
    # does not fit is an error of its own)
    lines = (shared_data / "math500.jsonl").read_text().splitlines()
    short = [line for line in lines if len(json.loads(line)["problem"]) < 150][:20]
    math500 = tmp_path / "math500_short.jsonl"
    math500.write_text("\n".join(short) + "\n")
    _, eval_dir = tip_eval(model_dir, "benchmark=math500", f"benchmark.path={math500}", "eval.limit=20",
                           "eval.max_new_tokens=16")
    result = json.loads((eval_dir / "math500" / "results.json").read_text())
    assert result["settings"]["limit"] == 20 and len(result["records"]) == 20
    record = result["records"][0]
    assert {"id", "gold", "responses", "correct", "preds", "response_lens", "meta"} <= set(record)
    assert record["meta"]["subject"] and "Please reason step by step" in record["prompt"]
    metrics = result["metrics"]
    assert 0.0 <= metrics["avg@1"] <= 1.0 and 0.0 <= metrics["no_answer"] <= 1.0
    assert any(k.startswith("by_subject/") for k in metrics) and any(k.startswith("by_level/") for k in metrics)
