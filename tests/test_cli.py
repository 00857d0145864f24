"""Config composition and validation, and the CLI surface."""

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from tip_cli.cli import _job_overrides, app, compose_config
from tip_cli.config import ConfigError, group_options

runner = CliRunner()


def test_defaults_are_soft_or_at_half_budget_on_the_toy_pair():
    cfg = compose_config([])
    assert (cfg.selector.name, cfg.budget, cfg.pair.name) == ("soft_or", 0.5, "toy")


@pytest.mark.parametrize("group", ["pair", "selector", "benchmark", "data", "rollout", "train", "logger"])
def test_every_option_of_every_group_composes(group):
    import importlib.util

    for option in group_options(group):
        if (group, option) == ("rollout", "vllm") and importlib.util.find_spec("vllm") is None:
            with pytest.raises(ConfigError, match="need vLLM, which is not installed"):  # fails early, with the fix
                compose_config([f"{group}={option}"])
            continue
        cfg = compose_config([f"{group}={option}"])
        assert getattr(cfg, group) is not None


def test_selector_yaml_names_match_their_files():
    for option in group_options("selector"):
        assert compose_config([f"selector={option}"]).selector.name == option


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["selector=sof_or"], "soft_or"),  # the valid options are listed
        (["budget=1.5"], "(0.0, 1.0]"),
        (["budget=0"], "(0.0, 1.0]"),
        (["budget=abc"], "budget"),
        (["train.stepz=3"], "steps"),  # the valid keys are listed
        (["selector.quadrants=[Q5]"], "Q1, Q2, Q3, Q4"),
        (["importance.norm=zscore"], "minmax, rank, quantile_clip"),
        (["rollout.engine=sglang"], "hf, vllm"),
    ],
)
def test_typos_fail_with_the_valid_options(overrides, needle):
    with pytest.raises(ConfigError, match=None) as info:
        compose_config(overrides)
    assert needle in str(info.value)


def test_multirun_expands_every_job():
    jobs = _job_overrides(["selector=entropy", "budget=0.1,0.5"], multirun=True)
    assert sorted(jobs) == [["selector=entropy", "budget=0.1"], ["selector=entropy", "budget=0.5"]]


def test_help_lists_groups_and_options():
    for args in ([], ["train", "--help"], ["eval", "--help"], ["config", "--help"]):
        out = runner.invoke(app, args or ["--help"]).output
        assert "selector: all, and, divergence, entropy" in out and "pair: llama3, qwen2_5, qwen3, qwen3_shapes, qwen3_shapes_tiny, toy" in out


def test_config_command_prints_the_composed_config():
    out = runner.invoke(app, ["config", "selector=quadrant", "budget=0.25"])
    assert out.exit_code == 0
    assert "name: quadrant" in out.output and "budget: 0.25" in out.output


def test_train_typo_fails_fast_from_the_shell():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tip_cli.cli", "train", "selector=sof_or"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    assert "soft_or" in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 10  # composition itself takes well under 2 s; the margin is interpreter start-up
