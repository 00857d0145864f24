"""The sweep presets of conf/sweep/ (`tip train -m +sweep=PRESET`): the jobs they expand to, and their validation."""

import importlib.util

import pytest
from typer.testing import CliRunner

from tip_cli.cli import _job_overrides, app, compose_config
from tip_cli.config.compose import group_options

runner = CliRunner()


def jobs(*overrides: str) -> list[tuple]:
    """(selector, quadrants, budget, seed) of every job of a -m run, from the composed, validated configs."""
    out = []
    for job in _job_overrides(list(overrides), multirun=True):
        cfg = compose_config(job)
        out.append((cfg.selector.name, tuple(cfg.selector.quadrants) if cfg.selector.name == "quadrant" else (), cfg.budget, cfg.seed))
    return out


BUDGETS = (0.1, 0.2, 0.3, 0.5, 0.8)


def test_budgets_is_entropy_and_soft_or_at_five_budgets_plus_full_token():
    expected = [(s, (), b, 0) for s in ("entropy", "soft_or") for b in BUDGETS] + [("all", (), 1.0, 0)]
    assert sorted(jobs("+sweep=budgets")) == sorted(expected)


def test_quadrants_is_each_quadrant_and_q1_plus_q3_without_a_cap():
    expected = [("quadrant", q, 1.0, 0) for q in (("Q1",), ("Q2",), ("Q3",), ("Q4",), ("Q1", "Q3"))]
    assert jobs("+sweep=quadrants") == expected


def test_selectors_is_every_selector_at_half_budget():
    assert sorted(jobs("+sweep=selectors")) == sorted(
        (s, ("Q3",) if s == "quadrant" else (), 0.5, 0) for s in group_options("selector")
    )


def test_seeds_and_presets_combine_with_command_line_overrides():
    assert [j[3] for j in jobs("+sweep=seeds")] == [0, 1, 2]
    both = jobs("+sweep=[budgets,seeds]")
    assert len(both) == 33 and {j[3] for j in both} == {0, 1, 2}
    assert len(jobs("+sweep=budgets", "seed=3,4")) == 22
    # a command-line key replaces the preset's sweep of it
    assert {j[2] for j in jobs("+sweep=selectors", "budget=0.2,0.3")} == {0.2, 0.3}
    assert [j[1] for j in jobs("+sweep=quadrants", "selector.quadrants=[Q2]")] == [("Q2",)]


def test_a_bad_value_in_any_job_of_a_preset_fails_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # only the quadrant job of the selectors sweep rejects an empty quadrant list
    result = runner.invoke(app, ["train", "-m", "+sweep=selectors", "selector.quadrants=[]"])
    assert result.exit_code == 2 and "needs at least one quadrant" in result.output
    result = runner.invoke(app, ["train", "-m", "+sweep=budgts"])
    assert result.exit_code == 2 and "budgets" in result.output
    assert not (tmp_path / "multirun").exists()


def test_a_preset_without_multirun_says_to_add_it():
    result = runner.invoke(app, ["train", "+sweep=budgets"])
    assert result.exit_code == 2 and "-m" in result.output


def has_submitit_plugin() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins package at all
        return False


@pytest.mark.skipif(has_submitit_plugin(), reason="hydra-submitit-launcher is installed")
def test_slurm_launcher_without_its_plugin_says_what_to_install():
    result = runner.invoke(app, ["train", "-m", "hydra/launcher=slurm", "selector=all"])
    assert result.exit_code == 2 and "pip install hydra-submitit-launcher" in " ".join(result.output.split())
