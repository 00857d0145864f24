"""Faults met through the real CLI, as a user meets them (`python -m tip_cli.cli` in a subprocess): rows too long for
the models' context, storage that refuses the run dir, shortened or foreign runs, forged checkpoints, sweeps and
signals. Each ends in one line naming the path, key or row, and leaves nothing lost or mixed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_runs
import torch
from test_runs import FAST, Payload, run_copy

from tip_cli import checkpoint
from tip_cli.analysis.runs import load_runs
from tip_cli.cli import compose_config
from tip_cli.config.schema import PairConfig
from tip_cli.models import load_tokenizer, render_prompt
from tip_cli.train import signals

finished = test_runs.finished  # the finished 2-step micro run, a fixture tests here work on copies of

REPO = Path(__file__).resolve().parents[1]
# a sitecustomize that makes os.<funcs> fail with errno <ERR> on paths holding <WHERE> (TIP_FAULT=funcs:ERR:WHERE):
# a full disk, a read-only mount or a file without permission, as the kernel reports them, even to root
FAULTS = """
import errno, os

_FUNCS, _ERR, _WHERE = os.environ["TIP_FAULT"].split(":", 2)
_CODE = getattr(errno, _ERR)


def _fd_path(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _inject(name, path_of):
    real = getattr(os, name)

    def fake(*args, **kwargs):
        path = os.fsdecode(path_of(args))
        if _WHERE in path:
            raise OSError(_CODE, os.strerror(_CODE), path)
        return real(*args, **kwargs)

    setattr(os, name, fake)


for _name in _FUNCS.split(","):
    _inject(_name, {"mkdir": lambda a: a[0], "open": lambda a: a[0], "pwrite": lambda a: _fd_path(a[0])}[_name])
"""


def tip(args: list[str], cwd: Path, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`tip ARGS` in a fresh interpreter; `fault` (funcs:ERRNO:WHERE) injects a storage failure into it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if fault:
        hooks = cwd / "fault_hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "sitecustomize.py").write_text(FAULTS)
        env |= {"TIP_FAULT": fault, "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "tip_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (no traceback, no wrapped continuation)."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ data


@pytest.fixture
def long_row(micro, tmp_path) -> tuple[Path, int, int]:
    """The micro test set with its 3rd line's problem made longer than the models' context: (file, the prompt's
    token count, the context)."""
    rows = [json.loads(line) for line in micro["test"].read_text().splitlines()]
    rows[2]["problem"] += " 1 + 2" * 400
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    context = json.loads((micro["student"] / "config.json").read_text())["max_position_embeddings"]
    tok = load_tokenizer(str(micro["student"]), PairConfig())
    n = len(render_prompt(tok, compose_config([f"data.path={path}"]).data.prompt_template.format(problem=rows[2]["problem"]),
                          PairConfig()))
    assert n > context
    return path, n, context


def test_a_prompt_too_long_for_the_context_fails_train_in_a_line_or_is_skipped_and_counted(micro_overrides, long_row,
                                                                                          tmp_path):
    path, n, context = long_row
    args = ["train", *micro_overrides, *FAST, "train.steps=1", f"data.path={path}", "out_dir=run"]
    proc = tip(args, tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"{path} line 3: the prompt has {n} tokens" in line and f"context of {context}" in line
    assert "train.skip_bad_rows=true" in line
    assert not (tmp_path / "run").exists()  # failed before the run began: no empty run dir left behind
    proc = tip([*args, "train.skip_bad_rows=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped dataset 'toy': {path} line 3" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/skipped_too_long"] for r in rows if "data/skipped_too_long" in r] == [1]


def test_a_benchmark_prompt_too_long_fails_eval_before_the_model_loads_or_is_skipped_and_counted(micro, long_row,
                                                                                                tmp_path):
    path, n, context = long_row
    args = ["eval", str(micro["student"]), f"benchmark.path={path}", "benchmark.max_new_tokens=12", "eval.limit=4",
            "logger=none", "train.device=cpu", "out_dir=ev"]
    proc = tip(args, tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"{path} line 3: the prompt has {n} tokens" in line and "eval.skip_bad_rows=true" in line
    assert not (tmp_path / "ev").exists()
    proc = tip([*args, "eval.skip_bad_rows=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(next((tmp_path / "ev").rglob("results.json")).read_text())
    assert results["metrics"]["skipped_too_long"] == 1
    assert [r["id"] for r in results["records"]] == [json.loads(line)["id"] for i, line in
                                                     enumerate(path.read_text().splitlines()[:4]) if i != 2]


# ----------------------------------------------------------------------------------------------- storage


def test_storage_that_refuses_the_run_dir_fails_in_one_line_naming_the_path(micro_overrides, tmp_path):
    args = ["train", *micro_overrides, *FAST]
    # a disk already full: no room for a new run dir
    proc = tip([*args, f"out_dir={tmp_path / 'full' / 'run'}"], tmp_path, fault="mkdir:ENOSPC:full/run")
    assert proc.returncode == 2
    assert f"cannot write {tmp_path / 'full' / 'run'}: No space left on device" in error_line(proc)
    # ... nor for the lock of an existing one; no empty lock file stays behind
    (tmp_path / "empty").mkdir()
    proc = tip([*args, f"out_dir={tmp_path / 'empty'}"], tmp_path, fault="pwrite:ENOSPC:empty/tip.lock")
    assert proc.returncode == 2
    assert f"cannot write {tmp_path / 'empty' / 'tip.lock'}: No space left on device" in error_line(proc)
    assert list((tmp_path / "empty").iterdir()) == []
    # a read-only mount
    proc = tip([*args, f"out_dir={tmp_path / 'ro' / 'run'}"], tmp_path, fault="mkdir:EROFS:ro/run")
    assert proc.returncode == 2
    assert f"cannot write {tmp_path / 'ro' / 'run'}: Read-only file system" in error_line(proc)
    # a lock file that cannot be written
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "tip.lock").write_text("")
    proc = tip([*args, f"out_dir={tmp_path / 'locked'}"], tmp_path, fault="open:EACCES:locked/tip.lock")
    assert proc.returncode == 2
    assert f"cannot write {tmp_path / 'locked' / 'tip.lock'}: Permission denied" in error_line(proc)
    # an out_dir that is a file, or lies below one
    (tmp_path / "afile").write_text("mine")
    for out_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        proc = tip([*args, f"out_dir={out_dir}"], tmp_path)
        assert proc.returncode == 2
        assert f"{tmp_path / 'afile'} is a file, not a directory" in error_line(proc)
    assert (tmp_path / "afile").read_text() == "mine"
    assert not (tmp_path / "full").exists() and not (tmp_path / "ro").exists()


# ---------------------------------------------------------------------------------------------- run dirs


def test_shrinking_steps_below_the_last_checkpoint_is_refused_under_override(finished, tmp_path):
    run, overrides = run_copy(finished, tmp_path)
    before = snapshot(run)
    proc = tip(["train", *overrides, "train.steps=1", "train.resume=override", f"out_dir={run}"], tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"{run} has a checkpoint at step 2, past train.steps=1" in line
    assert snapshot(run) == before  # no overrides.jsonl, no rewritten config.yaml, no "step 1" eval


def test_a_foreign_pairs_checkpoint_is_blamed_on_that_checkpoint(finished, micro, tmp_path):
    run, overrides = run_copy(finished, tmp_path)
    ckpt = run / "checkpoints" / "step_2"
    tok = load_tokenizer(str(ckpt), PairConfig())
    tok.add_tokens(["<another-pairs-token>"])  # the vocabulary of some other pair
    tok.save_pretrained(ckpt)
    checkpoint.write_manifest(ckpt)
    proc = tip(["train", *overrides, "train.steps=3", f"out_dir={run}"], tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"student {ckpt} have different tokenizers" in line and f"teacher {micro['teacher']}" in line
    assert not (run / "checkpoints" / "step_3").exists()


def test_the_pickle_refusal_is_one_whole_line_without_allowlist_advice(finished, tmp_path):
    run, overrides = run_copy(finished, tmp_path)
    marker, ckpt = tmp_path / "executed", run / "checkpoints" / "step_2"
    state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, ckpt / checkpoint.STATE_FILE)
    checkpoint.write_manifest(ckpt)
    proc = tip(["train", *overrides, "train.steps=3", f"out_dir={run}"], tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"refusing to load {ckpt / checkpoint.STATE_FILE}" in line and "(the global getattr)" in line
    assert line.rstrip().endswith("(TIP_DEBUG=1 shows the traceback)")  # whole, not cut
    assert "allowlist" not in line and "safe_globals" not in line
    assert not marker.exists()


def test_analyze_groups_a_run_resumed_with_override_with_its_seed_siblings(finished, tmp_path):
    run, _ = finished
    for seed, resume in ((1, "auto"), (2, "override")):
        copy = Path(shutil.copytree(run, tmp_path / f"seed{seed}"))
        text = (copy / "config.yaml").read_text()
        (copy / "config.yaml").write_text(text.replace("\nseed: 0", f"\nseed: {seed}").replace("resume: auto", f"resume: {resume}"))
    runs = load_runs([tmp_path])
    assert sorted(r.seed for r in runs) == [1, 2] and {r.cfg.train.resume for r in runs} == {"auto", "override"}
    assert len({r.label for r in runs}) == 1


def test_each_job_of_a_sweep_names_its_run_dir_on_one_line(micro_overrides, tmp_path):
    proc = tip(["train", "-m", *micro_overrides, *FAST, "train.steps=1", "seed=1,2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    named = [line.removeprefix("run dir: ") for line in proc.stdout.splitlines() if line.startswith("run dir:")]
    assert len(named) == 2 and all((Path(p) / "checkpoints" / "step_1").is_dir() for p in named), proc.stdout


# ----------------------------------------------------------------------------------------------- signals


def interrupt(args: list[str], cwd: Path, run: Path, sig: signal.Signals, after_steps: int) -> tuple[int, str]:
    """Start `tip ARGS`, send `sig` once `after_steps` steps are logged in run/metrics.jsonl; (exit code, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tip_cli.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= after_steps:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_sigterm_saves_the_step_in_flight_and_sigint_names_the_last_checkpoint(micro_overrides, tmp_path):
    args = ["train", *micro_overrides, *FAST, "train.steps=500", "train.save_every=0"]
    run = tmp_path / "term"
    code, out = interrupt([*args, f"out_dir={run}"], tmp_path, run, signal.SIGTERM, after_steps=3)
    assert code == 128 + signal.SIGTERM, out
    logged = max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines())
    saved = checkpoint.list_checkpoints(run)
    assert [c.step for c in saved] == [logged] and checkpoint.verify(saved[0]) is None  # the step in flight, whole
    assert out.splitlines()[-1] == f"stopped by SIGTERM; last checkpoint: {saved[0].path} (the same command resumes from it)"
    run = tmp_path / "int"
    code, out = interrupt([*args, "train.save_every=2", f"out_dir={run}"], tmp_path, run, signal.SIGINT, after_steps=3)
    assert code == 128 + signal.SIGINT, out
    last = checkpoint.latest_checkpoint(run)
    assert last is not None and last.step % 2 == 0  # SIGINT stops at once: the last regular checkpoint
    assert out.splitlines()[-1] == f"stopped by SIGINT; last checkpoint: {last.path} (the same command resumes from it)"


def test_a_step_that_outlasts_the_sigterm_grace_is_cut_short():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    with signals.sigterm_grace(0.2) as stop, pytest.raises(signals.Interrupted, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # the step may go on ...
        time.sleep(5)  # ... but not past the grace period
    with signals.sigterm_grace(0) as stop, pytest.raises(signals.Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)  # no grace: at once
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)) == before
