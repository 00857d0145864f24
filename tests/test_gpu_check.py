"""scripts/gpu_check.py (`make gpu-check`): its parts at the tiny shapes on CPU, and the GPU-only decisions (torchrun
ranks, rollout engine, offline wheel install, a part out of time) with the commands they would run."""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tip_cli.toy import qwen3_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check(load_script):
    return load_script("gpu_check")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_part_past_its_limit_is_stopped_with_its_subprocesses(gpu_check, tmp_path):
    """The part's whole process group goes: a bench's mode processes or torchrun's ranks must not keep the GPU."""
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
            "print(p.pid, flush=True); time.sleep(60)"
    t0 = time.perf_counter()
    part = gpu_check.run_command("bench", [sys.executable, "-c", child], 8, tmp_path / "bench.log")
    assert time.perf_counter() - t0 < 30
    assert part.status == "timed out" and part.limit_s == 8 and "stopped after 8 s" in part.detail
    grandchild = int((tmp_path / "bench.log").read_text().split()[0])
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    failed = gpu_check.run_command("x", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 30, tmp_path / "x")
    assert (failed.status, failed.detail) == ("failed", "exit 3: boom")


def test_missing_packages_one_line_each_and_the_offline_install(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "NEEDED", (("no-such-pkg-xyz", "no_such_pkg_xyz"), ("pytest==0.0.1", "pytest"),
                                              ("torch", "torch")))
    missing = gpu_check.missing_packages()
    assert list(missing.values()) == ["missing: no-such-pkg-xyz (import no_such_pkg_xyz)",
                                      f"wrong version: pytest {pytest.__version__}, needs 0.0.1"]
    seen = {}
    monkeypatch.setattr(gpu_check, "run_command", lambda name, argv, limit, log: seen.setdefault("argv", argv))
    gpu_check.install_wheels(tmp_path, list(missing), 60, tmp_path / "install.log")
    assert seen["argv"] == [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(tmp_path),
                            "no-such-pkg-xyz", "pytest==0.0.1"]


@pytest.mark.parametrize("gpus,vllm,tiny,engine,want", [
    (2, True, False, None, ("vllm", 2)), (1, True, False, None, ("vllm", 1)), (8, False, False, None, ("hf", 2)),
    (2, True, False, "hf", ("hf", 2)), (0, True, True, None, ("hf", 1)),
])
def test_the_train_part_runs_vllm_where_installed_and_two_ranks_on_two_gpus(gpu_check, gpus, vllm, tiny, engine, want,
                                                                            tmp_path):
    args = argparse.Namespace(engine=engine, tiny=tiny)
    assert gpu_check.rollout_plan(gpus, vllm, args) == want
    argv = gpu_check.train_argv(gpu_check.GPU, tmp_path, tmp_path / "run", *want)
    overrides = argv[argv.index("train") + 1:]
    assert (argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in argv) == (want[1] == 2)
    assert argv[argv.index("train") - 1] == "tip_cli.cli"
    for expected in ("pair=qwen3_shapes", f"rollout={want[0]}", "train.steps=3", f"data.path={tmp_path}/math500.jsonl",
                     f"benchmark.path={tmp_path}/math500.jsonl", f"out_dir={tmp_path / 'run'}"):
        assert expected in overrides


def test_gpu_profile_bench_covers_every_mode_backend_and_budget(gpu_check):
    """The real-shape bench: naive, TRL, Liger and tip (all modes by default), tip at 0.5 and 0.1, both backends;
    gpu-check adds the run with gradient checkpointing. The limits add up to 8 minutes at most."""
    bench = list(gpu_check.GPU.bench)
    opt = {k: bench[bench.index(k) + 1] for k in ("--shape", "--budgets", "--backends")}
    assert opt == {"--shape": "qwen3", "--budgets": "0.5,0.1", "--backends": "eager,compiled"}
    assert "--modes" not in bench and "--grad-checkpointing" not in bench
    assert sum(gpu_check.GPU.limits.values()) <= 8 * 60


@pytest.mark.slow
def test_tiny_gpu_check_writes_one_report_of_every_part(tmp_path, shared_data, request):
    """The whole script at the tiny shapes on CPU: every part ran; the 3 steps trained with soft_or's K = floor(N/2 +
    1/2) of N tokens; the bench's ratios are its own rows' quotients; the Markdown carries the tables."""
    if qwen3_tokenizer.available():  # the session's build of Qwen3's tokenizer, not a second one
        shutil.copytree(request.getfixturevalue("qwen3_cache")["root"] / qwen3_tokenizer.VERSION,
                        tmp_path / "cache" / qwen3_tokenizer.VERSION)
    env = {**os.environ, "TIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(SCRIPT.parents[1])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path / "out"), "--data",
                           str(shared_data)], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert [p["name"] for p in report["parts"]] == ["imports", "env", "gpu-tests", "train", "bench",
                                                   "bench-checkpointing"]
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["detail"] for n, p in parts.items()}
    assert parts["env"]["data"]["torch"] and parts["env"]["data"]["gpus"] == []  # no CUDA here
    assert parts["gpu-tests"]["data"].get("skipped", 0) > 0 and "failed" not in parts["gpu-tests"]["data"]
    steps = parts["train"]["data"]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3] and parts["train"]["data"]["engine"] == "hf"
    for s in steps:
        assert math.isfinite(s["loss"]) and s["loss"] > 0
        assert s["tokens/kept"] == max(1, math.floor(s["tokens/total"] / 2 + 0.5))  # soft_or at budget 0.5
    for name, checkpointing in (("bench", False), ("bench-checkpointing", True)):
        rows = {r["mode"].split(" [")[0]: r for r in parts[name]["data"]["rows"]}  # "tip all [eager]": its backend
        assert rows["trl"].get("skipped") or rows["trl"].get("peak_mb")
        naive, full = rows["naive"], rows["tip all"]
        for r in (full, rows["tip soft_or"]):
            assert r["peak_mb_x_naive"] == pytest.approx(r["peak_mb"] / naive["peak_mb"])
            assert r["step_s_x_tip_full"] == pytest.approx(r["step_s"] / full["step_s"])
        bench_json = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert bench_json["bench"]["grad_checkpointing"] is checkpointing
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    for heading in ("## Environment", "## Parts", "## train", "## bench", "## bench-checkpointing", "| mode | budget"):
        assert heading in md
