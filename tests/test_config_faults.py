"""Config faults through the real CLI (a subprocess, as a user runs it): a run dir whose config.yaml is missing or
damaged, non-finite or out-of-range numbers, non-finite weights and sampling distributions, unknown keys, and paths
with quotes, spaces or non-ASCII letters. Each ends in one line naming the path or key, and loses or mixes nothing."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tip_cli.cli import _quoted, compose_config, readable_overrides
from tip_cli.config.schema import ConfigError, TipConfig
from tip_cli.rollout.hf import NonFiniteGuard

FAST = ["train.eval_before=false", "train.eval_every=0", "train.token_sample_every=0"]


def tip(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tip_cli.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command (exit code 2), with no traceback anywhere."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair_overrides(micro) -> list[str]:
    return [f"pair.teacher={micro['teacher']}", f"pair.student={micro['student']}", f"data.path={micro['train']}",
            f"benchmark.path={micro['test']}", "train.prompts_per_step=4", "rollout.max_new_tokens=12",
            "benchmark.max_new_tokens=12", "eval.limit=4", "logger=none", "train.device=cpu", *FAST]


@pytest.fixture(scope="module")
def finished(pair_overrides, tmp_path_factory) -> Path:
    """A 2-step micro run made by `tip train`, a checkpoint per step; tests work on copies."""
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = tip("train", *pair_overrides, "train.steps=2", "train.save_every=1", f"out_dir={run}")
    assert proc.returncode == 0, proc.stderr
    return run


# ------------------------------------------------------------------------------------ the run dir's config


@pytest.mark.parametrize("resume", ["auto", "override"])
def test_run_dir_without_config_yaml_is_continued_under_no_config(finished, pair_overrides, tmp_path, resume):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "config.yaml").unlink()
    before = snapshot(run)
    proc = tip("train", *pair_overrides, "train.steps=4", "selector=all", "optim.lr=1e-2", f"train.resume={resume}",
               f"out_dir={run}")
    line = one_error_line(proc)
    assert str(run / "config.yaml") in line and "missing" in line and "out_dir" in line
    assert snapshot(run) == before  # no step 3, no config.yaml claiming the new values


DAMAGED = {"unparsable": "selector: [soft_or\nbudget: 0.5\n", "not_a_mapping": "- not\n- a mapping\n"}


def test_damaged_config_yaml_is_one_line_from_train_and_skipped_by_analyze(finished, pair_overrides, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(finished, tree / "good")
    for name, damage in DAMAGED.items():
        bad = Path(shutil.copytree(finished, tree / name))
        (bad / "config.yaml").write_text(damage)
        before = snapshot(bad)
        line = one_error_line(tip("train", *pair_overrides, "train.steps=2", f"out_dir={bad}"))
        assert str(bad / "config.yaml") in line
        assert snapshot(bad) == before

    proc = tip("analyze", tree, "--out", tmp_path / "analysis", "--no-wandb")
    assert proc.returncode == 0, proc.stderr
    skipped = sorted(line for line in proc.stderr.splitlines() if line.startswith("skipping"))
    assert len(skipped) == 2, proc.stderr
    for line, name in zip(skipped, sorted(DAMAGED), strict=True):
        assert str(tree / name / "config.yaml") in line
    summary = (tmp_path / "analysis" / "summary.md").read_text()
    assert "good" in summary and not any(name in summary for name in DAMAGED)


# ------------------------------------------------------------------------------------------------- numbers


def _float_keys(node=None, prefix: str = "") -> list[str]:
    """Dotted keys of every float field of the schema (float and float | None), read from the annotations."""
    node = TipConfig() if node is None else node
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += _float_keys(value, f"{prefix}{f.name}.")
        elif "float" in str(f.type):
            keys.append(prefix + f.name)
    return keys


def test_every_float_option_must_be_finite():
    keys = _float_keys()
    assert {"optim.lr", "budget", "rollout.top_p", "eval.temperature", "teacher.timeout_s"} <= set(keys)
    for key in keys:
        for value in ("nan", "inf"):
            with pytest.raises(ConfigError) as err:
                compose_config([f"{key}={value}"])
            message = str(err.value)
            assert key.rpartition(".")[2] in message and "\n" not in message, (key, value, message)


@pytest.mark.parametrize(("key", "bad", "good"), [
    ("optim.lr", "0", "1.0"), ("optim.lr", "1.5", "1e-6"), ("budget", "0", "1"), ("budget", "1.01", "0.01"),
    ("rollout.top_p", "0", "1"), ("eval.top_p", "1.5", "0.5"), ("benchmark.top_p", "0", "0.95"),
    ("eval.temperature", "-0.1", "0"), ("data.temperature", "-1", "0.6"), ("rollout.temperature", "-1", "0"),
    ("optim.weight_decay", "-0.01", "0"), ("optim.grad_clip", "-1", "0"),
])
def test_float_ranges_hold_at_their_edges(key, bad, good):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config([f"{key}={bad}"])
    cfg = compose_config([f"{key}={good}"])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == float(good)


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=inf", "budget=-inf", "rollout.top_p=1.5"])
def test_bad_number_fails_before_a_run_dir_exists(override, tmp_path):
    run = tmp_path / "run"
    line = one_error_line(tip("train", override, f"out_dir={run}", cwd=tmp_path))
    assert override.split("=")[0] in line
    assert list(tmp_path.iterdir()) == []  # nothing recorded that would block the fixed re-run


INJECT_INF = """
import sys, torch
real, calls = torch.optim.AdamW.step, []

def step(self, *args, **kwargs):  # the second update leaves an inf in the first weight
    out = real(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
    return out

torch.optim.AdamW.step = step
sys.argv = ["tip", "train", *{overrides!r}]
from tip_cli.cli import main
main()
"""


def test_non_finite_weights_after_an_update_stop_the_run_before_they_are_saved(pair_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = [*pair_overrides, "train.steps=3", "train.save_every=1", f"out_dir={run}"]
    proc = subprocess.run([sys.executable, "-c", INJECT_INF.format(overrides=overrides)], capture_output=True,
                          text=True, timeout=600)
    line = one_error_line(proc)
    assert "step 2" in line and "non-finite" in line and str(run / "checkpoints" / "step_1") in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]


@pytest.mark.parametrize(("row", "col", "value"), [(1, 3, math.nan), (2, None, -math.inf), (3, 0, math.inf)])
def test_guard_refuses_an_unsampleable_row_and_passes_the_rest(row, col, value):
    scores = torch.randn(4, 7)
    cut = scores.clone()
    cut[:, 1:] = -math.inf  # what top_p / top_k leave: still one finite logit a row
    guard, ids = NonFiniteGuard(), torch.zeros(4, 1, dtype=torch.long)
    assert guard(ids, scores) is scores and guard(ids, cut) is cut
    scores[row, slice(None) if col is None else col] = value
    with pytest.raises(ValueError, match="not finite"):
        guard(ids, scores)


def test_eval_of_nan_weights_at_an_odd_path_is_one_line(micro, pair_overrides, tmp_path):
    """A model whose logits are NaN: sampling it (temperature 1, torch.multinomial) ends in one line."""
    model = AutoModelForCausalLM.from_pretrained(micro["student"])
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(math.nan)
    where = Path(shutil.copytree(micro["student"], tmp_path / "it's a dir" / "ü nan"))
    model.save_pretrained(where)  # the student's tokenizer files stay beside the NaN weights
    line = one_error_line(tip("eval", where, *pair_overrides, "benchmark.temperature=1.0",
                              f"out_dir={tmp_path / 'out'}"))
    assert "not finite" in line


# ---------------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("override", ["+optim.lr_sched=cosine", "optim.lr_sched=cosine"])
def test_unknown_key_names_the_closest_valid_one(override):
    line = one_error_line(tip("config", override))
    assert "'optim.lr_sched'" in line and "did you mean 'optim.lr_schedule'" in line


def test_unknown_top_level_key_fails_before_a_run_dir_exists(tmp_path):
    line = one_error_line(tip("train", "+lerning_rate=0.1", f"out_dir={tmp_path / 'run'}", cwd=tmp_path))
    assert "'lerning_rate'" in line and "valid keys of the top level" in line and "train" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- paths

ODD = ["runs/it's/checkpoints/step_2", "my runs/ü é", "a\\b\\", "back\\'quote", 'double"quote', "x,y=z", "cost ${HOME}",
       "[not a list]", "a\\${b}"]


@pytest.mark.parametrize("path", ODD)
def test_quoted_values_arrive_unchanged(path):
    assert compose_config([f"checkpoint={_quoted(path)}"]).checkpoint == path


@pytest.mark.parametrize("path", ["my runs/ü é", "runs/it's", "a b\\c"])
def test_unquoted_plain_strings_are_read_as_given(path):
    assert compose_config(readable_overrides([f"out_dir={path}"])).out_dir == path


def test_eval_and_train_paths_with_quotes_spaces_and_non_ascii(micro, pair_overrides, tmp_path):
    model = Path(shutil.copytree(micro["student"], tmp_path / "it's a dir" / "ü student"))
    out = tmp_path / "eval's out"
    proc = tip("eval", model, *pair_overrides, f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (results,) = out.rglob("results.json")
    result = json.loads(results.read_text())
    assert result["model"] == str(model) and len(result["records"]) == 4

    run = tmp_path / "my runs" / "ü's run"
    proc = tip("train", *pair_overrides, "train.steps=1", f"out_dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["out_dir"] == str(run)
    assert (run / "checkpoints" / "step_1").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["it's a dir", "eval's out", "my runs"])


def test_malformed_override_is_one_line_with_a_hint():
    line = one_error_line(tip("config", "selector.quadrants=[Q3"))
    assert "selector.quadrants=[Q3" in line and "KEY=[A,B]" in line
