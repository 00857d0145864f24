"""Runs, resume and failures on the micro pair: the resume contract, one writer per run dir, damaged checkpoints and
metrics, full and read-only disks, safe loading, failing fast, and kill -9 at random points (fault injection)."""

import errno
import io
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tip_cli import checkpoint
from tip_cli.analysis.runs import load_runs
from tip_cli.cli import app, compose_config, eval_job
from tip_cli.config.schema import ConfigError
from tip_cli.eval.benchmark import run_eval_command
from tip_cli.rollout.batch import Sampling
from tip_cli.rollout.hf import HFEngine
from tip_cli.tracking import MetricsLogger, read_jsonl
from tip_cli.train import recipe, rundir

FAST = ["train.eval_before=false", "train.eval_every=0", "train.token_sample_every=0"]
FIRST_WRITER = """
import os, pathlib, time
from tip_cli.cli import compose_config
from tip_cli.rollout import sources
from tip_cli.train import recipe

def stuck(*args, **kwargs):
    os.write({fd}, b"x")
    time.sleep(120)

sources.pack = stuck
recipe.train(compose_config({overrides!r}), pathlib.Path({run_dir!r}))
"""


@pytest.fixture(scope="module")
def finished(micro, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 2-step micro run with a checkpoint per step, and its overrides; tests work on copies (`run_copy`)."""
    overrides = [
        f"pair.teacher={micro['teacher']}", f"pair.student={micro['student']}", f"data.path={micro['train']}",
        f"benchmark.path={micro['test']}", "train.steps=2", "train.prompts_per_step=4", "rollout.max_new_tokens=12",
        "benchmark.max_new_tokens=12", "eval.limit=4", "logger=none", *FAST, "train.save_every=1",
    ]
    run = tmp_path_factory.mktemp("finished") / "run"
    recipe.train(compose_config(overrides), run)
    return run, overrides


def run_copy(finished, tmp_path: Path) -> tuple[Path, list[str]]:
    run, overrides = finished
    return Path(shutil.copytree(run, tmp_path / "run")), overrides


def refuse_models(monkeypatch) -> None:
    """From here on, loading a model fails the test: for what must fail (or finish) before any model loads."""
    monkeypatch.setattr(recipe, "load_pair", lambda *a, **k: pytest.fail("a model was loaded"))


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    # copies: the file may be mapped, and a test overwrites it in place
    return {k: v.clone() for k, v in load_file(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors").items()}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def in_child(body) -> int:
    """Run body() in a forked child (models and imports already in memory: no interpreter start-up); returns the
    child's wait status."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a forked child must not enter the parent's intra-op thread pool (it would crash)
    pid = os.fork()
    if pid:
        torch.set_num_threads(threads)
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# ------------------------------------------------------------------------------------------ resume contract


def test_changed_config_rerun_stops_before_loading_models_listing_each_change(finished, tmp_path, monkeypatch):
    run, overrides = run_copy(finished, tmp_path)
    recorded = (run / "config.yaml").read_text()
    refuse_models(monkeypatch)
    changed = compose_config([*overrides, "train.steps=4", "selector=all", "optim.lr=1e-3"])
    with pytest.raises(rundir.RunDirError) as err:
        recipe.train(changed, run)
    message = str(err.value)
    assert "selector.name: 'soft_or' -> 'all'" in message and "optim.lr: 0.0001 -> 0.001" in message
    assert "train.steps" not in message  # growing steps under a constant schedule is a continuation
    assert "out_dir" in message and "train.resume=override" in message
    assert (run / "config.yaml").read_text() == recorded


def test_override_takes_effect_is_recorded_and_analyze_splits_the_run(finished, tmp_path):
    run, overrides = run_copy(finished, tmp_path)
    recipe.train(compose_config([*overrides, "train.steps=4", "selector=all", "optim.lr=1e-3",
                                  "train.resume=override"]), run)
    rows = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert [rows[s]["optim/lr"] for s in (1, 2, 3, 4)] == [1e-4, 1e-4, 1e-3, 1e-3]
    assert [rows[s]["tokens/kept_frac"] == 1.0 for s in (1, 2, 3, 4)] == [False, False, True, True]
    (record,) = read_jsonl(run / "overrides.jsonl")
    assert record["step"] == 2 and record["changed"]["selector.name"] == ["soft_or", "all"]
    first, second = sorted(load_runs([run]), key=lambda r: r.name)
    assert (first.selector, [r["step"] for r in first.steps]) == ("soft_or", [1, 2])
    assert (second.selector, [r["step"] for r in second.steps]) == ("all", [3, 4])


def test_finished_run_rerun_unchanged_writes_nothing(finished, tmp_path, monkeypatch, capsys):
    run, overrides = run_copy(finished, tmp_path)
    final = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/toy/accuracy" in r][-1]
    before = snapshot(run)
    refuse_models(monkeypatch)
    again = recipe.train(compose_config([*overrides, "train.save_every=7"]), run)  # cadence is harmless
    assert snapshot(run) == before
    assert again["accuracy"] == final["eval/toy/accuracy"]
    assert "is complete" in " ".join(capsys.readouterr().out.split())  # the console wraps long paths


def as_written_before_the_move(run: Path) -> None:
    """Rewrite a run dir's config.yaml and overrides.jsonl as tip wrote them before the optimizer and the multi-GPU
    settings had groups of their own: those keys under train, by their old names."""
    doc = yaml.safe_load((run / "config.yaml").read_text())
    optim, par = doc.pop("optim"), doc.pop("parallel")
    doc["train"] |= {**optim, "selection_scope": par["rank_scope"], "cpu_offload": par["cpu_offload"],
                     "shard_teacher": par["shard_teacher"]}
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    if (run / "overrides.jsonl").exists():
        rows = [{**r, "changed": {k.replace("optim.", "train."): v for k, v in r["changed"].items()}}
                for r in read_jsonl(run / "overrides.jsonl")]
        (run / "overrides.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_dir_written_before_the_move_reruns_unchanged_and_stops_on_a_change(finished, tmp_path, monkeypatch,
                                                                                  capsys):
    """The same command line (an old key in it too) finds the old run complete and writes nothing; a changed value
    under the old key is a change of the new one."""
    run, overrides = run_copy(finished, tmp_path)
    as_written_before_the_move(run)
    assert "lr:" in (run / "config.yaml").read_text() and "optim" not in (run / "config.yaml").read_text()
    before = snapshot(run)
    refuse_models(monkeypatch)
    for same in ([], ["train.lr=1e-4", "train.selection_scope=global"]):
        recipe.train(compose_config([*overrides, *same]), run)
        assert snapshot(run) == before
        assert "is complete" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(rundir.RunDirError) as err:
        recipe.train(compose_config([*overrides, "train.lr=1e-3"]), run)
    assert "optim.lr: 0.0001 -> 0.001" in str(err.value) and "train.lr" not in str(err.value)
    (read,) = load_runs([run])
    assert read.cfg.optim.lr == 1e-4 and "lr" not in read.cfg.train and read.cfg.parallel.rank_scope == "global"


def test_an_override_recorded_under_an_old_key_splits_the_run_at_its_new_place(finished, tmp_path):
    run, overrides = run_copy(finished, tmp_path)
    recipe.train(compose_config([*overrides, "train.steps=3", "optim.lr=1e-3", "train.resume=override"]), run)
    as_written_before_the_move(run)
    assert "train.lr" in (run / "overrides.jsonl").read_text()
    first, second = sorted(load_runs([run]), key=lambda r: r.name)
    assert ([r["step"] for r in first.steps], first.cfg.optim.lr) == ([1, 2], 1e-4)
    assert ([r["step"] for r in second.steps], second.cfg.optim.lr) == ([3], 1e-3)
    assert "lr" not in first.cfg.train and "lr" not in second.cfg.train


# ------------------------------------------------------------------------------------------- one writer


def test_second_writer_is_refused_naming_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, micro_overrides,
                                                                                      capsys):
    """Two runs into one run dir: the second is refused while the first trains; once the first is killed (kill -9
    leaves its lock file behind), a new run takes the lock over and resumes."""
    overrides = [*micro_overrides, *FAST, "train.steps=1"]
    cfg = compose_config(overrides)
    ready_r, ready_w = os.pipe()
    # the first run is its own process (a fork of this one could deadlock in torch's thread pool), stuck in step 1
    first = subprocess.Popen([sys.executable, "-c", FIRST_WRITER.format(fd=ready_w, overrides=overrides,
                                                                        run_dir=str(tmp_path))],
                             pass_fds=(ready_w,), stderr=subprocess.PIPE, text=True)
    pid = first.pid
    os.close(ready_w)  # the child's end only: if it dies before step 1, read() sees EOF instead of waiting forever
    try:
        if os.read(ready_r, 1) != b"x":
            raise AssertionError(f"the first run ended before its first step: {first.communicate()[1][-3000:]}")
        with pytest.raises(rundir.RunDirError) as err:
            recipe.train(cfg, tmp_path)
        assert f"host {socket.gethostname()}, PID {pid}" in str(err.value)
    finally:
        first.kill()
        first.wait()
    assert str(pid) in (tmp_path / rundir.LOCK_FILE).read_text()
    capsys.readouterr()
    recipe.train(cfg, tmp_path)
    assert f"PID {pid}" in capsys.readouterr().out  # the stale lock was taken over, and said so
    assert [s for s, _ in losses(tmp_path)] == [1]


# ------------------------------------------------------------------------------------------ damaged state


def test_truncated_latest_checkpoint_falls_back_in_resume_and_eval(finished, tmp_path, capsys):
    run, overrides = run_copy(finished, tmp_path)
    good = weights(run, 2)
    damaged = run / "checkpoints" / "step_2" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    capsys.readouterr()

    result = run_eval_command(eval_job(compose_config([*overrides, f"checkpoint={run}"])))
    assert [p["step"] for p in result["curve"]] == [1]
    out = capsys.readouterr().out.replace("\n", " ")
    assert "skipping checkpoint" in out and "step_2" in out and "truncated" in out

    recipe.train(compose_config(overrides), run)  # resumes from step 1 and redoes step 2
    out = capsys.readouterr().out.replace("\n", " ")
    assert "skipping checkpoint" in out and "(step 1)" in out
    redone = weights(run, 2)
    assert all(torch.equal(redone[k], good[k]) for k in good)
    for step in (1, 2):  # with no good checkpoint left, starting over would overwrite them: refused
        (run / "checkpoints" / f"step_{step}" / checkpoint.MANIFEST).unlink()
    with pytest.raises(rundir.RunDirError, match="none of its 2 checkpoint"):
        recipe.train(compose_config([*overrides, "train.steps=3"]), run)


def test_torn_metrics_line_is_dropped_on_resume_and_analyze_names_the_file(finished, tmp_path, capsys):
    run, overrides = run_copy(finished, tmp_path)
    metrics = run / "metrics.jsonl"
    intact = metrics.read_text()
    lines = intact.count("\n")
    metrics.write_text(intact + '{"step": 3, "loss": 0.12')  # a write cut short by a crash
    runs = load_runs([run])  # analyze reads it: the torn line is dropped, with the file and line named
    assert [r["step"] for r in runs[0].steps] == [1, 2]
    assert f"{metrics} line {lines + 1}" in capsys.readouterr().err
    MetricsLogger(run, compose_config(overrides).logger, {}, resume_step=2)  # what resume does
    assert metrics.read_text() == intact
    metrics.write_text('{"step": 1, "lo\n' + intact)
    with pytest.raises(ValueError, match=f"{metrics} line 1"):  # inside the file it is damage, not a torn tail
        read_jsonl(metrics)


# -------------------------------------------------------------------------------------- disk and permissions


def test_full_disk_during_a_checkpoint_is_one_line_and_cleans_up(tmp_path, micro_overrides, monkeypatch):
    overrides = [*micro_overrides, *FAST, "train.save_every=1"]
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step_2" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)  # what checkpoint.write_checkpoint calls
    with pytest.raises(checkpoint.StorageError) as err:
        recipe.train(compose_config(overrides), tmp_path)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and "GiB free" in message
    assert str(tmp_path / "checkpoints" / ".step_2.tmp" / "trainer_state.pt") in message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_1'}" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]


def test_read_only_metrics_and_torch_short_writes_are_one_line(tmp_path, micro_overrides):
    logger = MetricsLogger(tmp_path, compose_config(micro_overrides).logger, {})
    real_open = pathlib.Path.open

    def read_only(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_open(self, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pathlib.Path, "open", read_only)
        with pytest.raises(checkpoint.StorageError, match="Read-only file system") as err:
            logger.log({"loss": 1.0}, 1)
    assert str(tmp_path / "metrics.jsonl") in str(err.value) and "last good checkpoint: none" in str(err.value)
    staging = tmp_path / "checkpoints" / ".step_3.tmp"
    staging.mkdir(parents=True)
    with pytest.raises(checkpoint.StorageError, match="disk full") as err:  # torch's writer says it its own way
        with checkpoint.storage_errors(tmp_path, staging, cleanup=staging):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert "\n" not in str(err.value) and not staging.exists()


# ------------------------------------------------------------------------------------------- safe loading


class Payload:
    """Unpickling this runs code: it touches a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_payload_in_a_checkpoint_is_refused(finished, tmp_path, monkeypatch):
    run, overrides = run_copy(finished, tmp_path)
    marker = tmp_path / "executed"
    ckpt = run / "checkpoints" / "step_2"
    state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, ckpt / checkpoint.STATE_FILE)
    checkpoint.write_manifest(ckpt)  # a forged run dir verifies: the loader itself must refuse
    refuse_models(monkeypatch)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        recipe.train(compose_config([*overrides, "train.steps=3"]), run)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- fail fast, no litter


def test_bad_data_and_sampling_fail_before_any_model_loads(tmp_path, micro_overrides, monkeypatch):
    refuse_models(monkeypatch)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        recipe.train(compose_config([*micro_overrides, f"data.path={tmp_path / 'nowhere.jsonl'}"]), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        recipe.train(compose_config([*micro_overrides, f"benchmark.path={tmp_path / 'missing.jsonl'}"]), tmp_path / "b")
    with pytest.raises(ConfigError, match="eval.temperature > 0"):
        compose_config([*micro_overrides, "eval.n=2"])
    with pytest.raises(ConfigError, match="rollout.temperature > 0"):
        compose_config([*micro_overrides, "rollout.samples_per_prompt=2", "rollout.temperature=0"])
    compose_config([*micro_overrides, "eval.n=2", "eval.temperature=0.6"])  # sampling several is fine
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # and no run dir was left behind


def test_generation_is_capped_at_the_models_context(micro, capsys):
    from tip_cli.config.schema import PairConfig
    from tip_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(micro["student"]), PairConfig())
    model = load_model(str(micro["student"]), PairConfig(), torch.device("cpu"), trainable=False)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    model.config.max_position_embeddings = 10  # 4 tokens of room after the longest prompt
    gen = HFEngine(model, tok).generate(prompts, Sampling(n=2, temperature=1.0, max_new_tokens=10_000))
    assert max(map(len, gen.tokens)) <= 4
    err = capsys.readouterr().err
    assert err.count("capped at 4") == 1 and "context is 10 tokens" in err


def test_eval_writes_under_out_dir_or_cwd_never_into_the_model(tmp_path, micro, micro_overrides, monkeypatch):
    model = tmp_path / "model"
    model.symlink_to(micro["student"], target_is_directory=True)
    inside = snapshot(micro["student"])
    run_eval_command(eval_job(compose_config([*micro_overrides, f"checkpoint={model}", f"out_dir={tmp_path / 'x'}"])))
    assert (tmp_path / "x" / "model" / "eval" / "toy" / "results.json").is_file()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_eval_command(eval_job(compose_config([*micro_overrides, f"checkpoint={model}"])))
    assert (cwd / "eval" / "model" / "eval" / "toy" / "results.json").is_file()
    assert snapshot(micro["student"]) == inside


def test_train_with_out_dir_writes_nothing_outside_it(tmp_path, micro_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["train", *micro_overrides, *FAST, "train.steps=1", "out_dir=run"])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (tmp_path / "run" / ".hydra").exists() and (tmp_path / "run" / "config.yaml").is_file()


# ----------------------------------------------------------------------------------------- fault injection


def test_kill_9_at_random_points_then_identical_final_weights(tmp_path, micro_overrides):
    """Three SIGKILLs: inside a checkpoint write (the trainer state half on disk), in the middle of a metrics line,
    and at a random moment; each time the run is resumed. The final weights and every step's loss equal those of
    an uninterrupted run."""
    overrides = [*micro_overrides, *FAST, "train.steps=4", "train.save_every=1"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    started = time.perf_counter()
    recipe.train(compose_config(overrides), reference)
    run_seconds = time.perf_counter() - started
    rng = random.Random(18)

    def torn_checkpoint(at_call: int):
        calls = {"n": 0}
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at_call:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *args, **kwargs)

        torch.save = save

    def torn_metrics_line(at_call: int):
        calls = {"n": 0}
        real_log = MetricsLogger.log

        def log(self, metrics, step):
            calls["n"] += 1
            if calls["n"] == at_call:
                with self.path.open("a") as f:
                    f.write(json.dumps({"step": step, **metrics})[:40])
                os.kill(os.getpid(), signal.SIGKILL)
            return real_log(self, metrics, step)

        MetricsLogger.log = log

    def at_random_time(delay: float):
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()

    kills = [(torn_checkpoint, rng.randint(1, 2)), (torn_metrics_line, rng.randint(1, 2)),
             (at_random_time, rng.uniform(0.2, 0.8) * run_seconds)]
    for i, (arm, where) in enumerate(kills):
        status = in_child(lambda arm=arm, where=where: (arm(where), recipe.train(compose_config(overrides), crashed)))
        # the random moment may come after the run has finished; the injected faults always strike
        assert killed(status) or (i == 2 and status == 0), f"{arm.__name__}({where}): wait status {status}"
    recipe.train(compose_config(overrides), crashed)
    assert losses(crashed) == losses(reference)
    want, got = weights(reference, 4), weights(crashed, 4)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------------- disk use and resume reads


def test_default_keeps_two_checkpoints_and_a_resume_reads_the_state_once(tmp_path, micro_overrides, monkeypatch):
    """By default the newest two checkpoints stay; resuming maps the trainer state for the safety check and reads
    it once, to restore it."""
    overrides = [*micro_overrides, *FAST, "train.save_every=1"]
    recipe.train(compose_config([*overrides, "train.steps=3"]), tmp_path)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [2, 3]

    loads = []
    real_load = torch.load

    def spy(path, *args, **kwargs):
        loads.append((Path(path).name, kwargs.get("mmap", False)))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)  # what checkpoint.load_trainer_state calls
    recipe.train(compose_config([*overrides, "train.steps=4"]), tmp_path)
    states = [mmap for name, mmap in loads if name == checkpoint.STATE_FILE]
    assert states == [True, False]  # the check maps it, the resume reads it
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [3, 4]
