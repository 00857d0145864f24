"""User errors against bugs: a fault the user can fix (tip_cli.errors.UserError and its kin) is one line and exit 2;
any other exception raised inside a command keeps its traceback and exits 1, so a bug never reads as a bad input."""

import sys

import pytest
from typer.testing import CliRunner

from tip_cli import cli
from tip_cli.checkpoint import CheckpointError, StorageError
from tip_cli.config.schema import ConfigError
from tip_cli.envs.deepplanning.common import DatabaseMissing
from tip_cli.errors import DataError, ModelError, UserError
from tip_cli.teacher.server import TeacherServerError
from tip_cli.train.loop import NonFiniteStepsError
from tip_cli.train.rundir import RunDirError

# each user-fault type, and the builtin base that callers catching it before UserError existed rely on
USER_FAULTS = [(ConfigError, ValueError), (DataError, ValueError), (ModelError, ValueError), (RunDirError, ValueError),
               (CheckpointError, ValueError), (NonFiniteStepsError, ValueError), (StorageError, OSError),
               (TeacherServerError, ConnectionError), (DatabaseMissing, FileNotFoundError)]


@pytest.mark.parametrize(("kind", "base"), USER_FAULTS)
def test_every_user_fault_is_a_user_error_and_keeps_its_builtin_base(kind, base):
    assert issubclass(kind, UserError) and issubclass(kind, base)


def _run(command: str, target: str, error: Exception, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    """`tip COMMAND` in this process with `target` (module:function, what the job calls) raising `error`:
    (exit code, stderr)."""
    module, name = target.split(":")

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(f"{module}.{name}", broken)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # launch hands Hydra its overrides through sys.argv
    for var in ("HYDRA_FULL_ERROR", "TIP_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    overrides = ["logger=none", f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as exit_:
        if command == "train":
            cli.launch("train", overrides, multirun=False)
        else:
            cli.launch("eval", ["checkpoint=toy://student", *overrides], multirun=False)
    return exit_.value.code, capsys.readouterr().err


JOBS = [("train", "tip_cli.train.recipe:train"), ("eval", "tip_cli.eval.benchmark:run_eval_command")]
BUGS = [KeyError("probe/missing_metric"), ValueError("shapes [4, 7] and [4, 8] differ"), RuntimeError("boom"),
        AssertionError("invariant broken")]


@pytest.mark.parametrize(("command", "target"), JOBS)
@pytest.mark.parametrize("bug", BUGS, ids=lambda e: type(e).__name__)
def test_a_bug_inside_a_job_keeps_its_traceback_and_does_not_exit_2(command, target, bug, tmp_path, monkeypatch,
                                                                   capsys):
    code, err = _run(command, target, bug, tmp_path, monkeypatch, capsys)
    assert code == 1
    assert "Traceback" in err and f"{type(bug).__name__}: {bug}" in err, err
    assert "error:" not in err  # not dressed as a user error


@pytest.mark.parametrize(("command", "target"), JOBS)
@pytest.mark.parametrize("fault", [DataError("dataset 'toy': t.jsonl line 3: the prompt has 900 tokens"),
                                   ConfigError("teacher.url is not set"),
                                   StorageError(28, "cannot write /x: No space left on device"),
                                   FileNotFoundError("no file at /nowhere.jsonl")], ids=lambda e: type(e).__name__)
def test_a_user_fault_inside_a_job_is_one_line_and_exit_2(command, target, fault, tmp_path, monkeypatch, capsys):
    code, err = _run(command, target, fault, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(fault) in lines[0], err


def test_analyze_tells_a_bug_from_a_missing_run(tmp_path, monkeypatch):
    runner = CliRunner()
    missing = runner.invoke(cli.app, ["analyze", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")])
    assert missing.exit_code == 2 and "no such directory" in " ".join(missing.output.split())

    def broken(*args, **kwargs):
        raise ValueError("a bug in the report")

    monkeypatch.setattr("tip_cli.analysis.report.analyze", broken)
    result = runner.invoke(cli.app, ["analyze", str(tmp_path), "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
