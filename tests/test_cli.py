"""Config composition and validation, and the CLI surface."""

import importlib.util
import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from tip_cli.cli import _job_overrides, app, compose_config
from tip_cli.config.compose import CONF_DIR, GROUPS, group_options
from tip_cli.config.schema import ConfigError

runner = CliRunner()


def test_defaults_are_soft_or_at_half_budget_on_the_toy_pair():
    cfg = compose_config([])
    assert (cfg.selector.name, cfg.budget, cfg.pair.name) == ("soft_or", 0.5, "toy")


def lookup(cfg, path: list[str]):
    """The composed value at a dotted path: dataclass fields, then dict keys (e.g. pair.chat_template_kwargs)."""
    for key in path:
        cfg = cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)
    return cfg


def yaml_leaves(node, path: list[str]):
    """(path, value) of every leaf below a YAML node (an empty mapping is a leaf value)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from yaml_leaves(value, [*path, key])
    else:
        yield path, node


NEEDS = {("rollout", "vllm_server"): ["rollout.url=http://127.0.0.1:8000"]}  # what an option cannot do without


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_to_its_yaml_values(group):
    """Each value in conf/<group>/<option>.yaml lands at its place in the composed config: under the group, or at
    the top level for `# @package _global_` files; an interpolation ${a.b} equals the composed value at a.b."""
    for option in group_options(group):
        text = (CONF_DIR / group / f"{option}.yaml").read_text()
        root = [] if "# @package _global_" in text else [group]
        if (group, option) == ("rollout", "vllm") and importlib.util.find_spec("vllm") is None:
            with pytest.raises(ConfigError, match="need vLLM, which is not installed"):  # fails early, with the fix
                compose_config([f"{group}={option}"])
            continue
        cfg = compose_config([f"{group}={option}", *NEEDS.get((group, option), [])])
        doc = yaml.safe_load(text) or {}
        # `defaults` is Hydra's list of other files to merge, not a value
        leaves = [leaf for key, node in doc.items() if key != "defaults" for leaf in yaml_leaves(node, [*root, key])]
        assert leaves or option == "none", f"{group}={option} sets nothing"
        for path, value in leaves:
            ref = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
            want = lookup(cfg, ref.group(1).split(".")) if ref else value
            assert lookup(cfg, path) == want, f"{group}={option}: {'.'.join(path)}"
        # the option name itself lands in the config: the file names itself (rollout: its engine)
        named = {"task": None, "train": None, "rollout": ["rollout", "engine"]}.get(group, [group, "name"])
        assert named is None or lookup(cfg, named) == option


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


def test_multirun_jobs_are_the_product_in_first_seen_key_order_a_later_key_replacing_an_earlier():
    jobs = _job_overrides(["budget=0.1,0.5", "seed=range(0,2)", "selector=entropy", "budget=0.2,0.3,0.4"], multirun=True)
    assert jobs == [[f"budget={b}", f"seed={s}", "selector=entropy"] for b in ("0.2", "0.3", "0.4") for s in (0, 1)]
    assert _job_overrides(["selector=choice(entropy,all)", "out_dir='a b,c'"], multirun=True) == [
        ["selector=entropy", "out_dir='a b,c'"], ["selector=all", "out_dir='a b,c'"]]
    with pytest.raises(ConfigError, match="not intervals"):
        _job_overrides(["budget=interval(0.1,0.5)"], multirun=True)


def test_help_lists_groups_and_options():
    for args in ([], ["train", "--help"], ["eval", "--help"], ["config", "--help"]):
        out = runner.invoke(app, args or ["--help"]).output
        assert "selector: all, and, divergence, entropy" in out and "pair: llama3, qwen2_5, qwen3, qwen3_shapes, qwen3_shapes_tiny, toy" in out


def test_config_command_prints_the_composed_config():
    out = runner.invoke(app, ["config", "selector=quadrant", "budget=0.25"])
    assert out.exit_code == 0
    assert "name: quadrant" in out.output and "budget: 0.25" in out.output


def test_train_typo_fails_fast_from_the_shell(tmp_path):
    """The typo is reported before torch is imported (no model, no engine) and before Hydra makes a run dir."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tip_cli.cli", "train", "selector=sof_or"],
                          capture_output=True, text=True, cwd=tmp_path)
    imported = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\| +(\S+)$", proc.stderr, re.M)}
    message = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    assert proc.returncode == 2
    assert "soft_or" in message and "Traceback" not in message
    assert {"tip_cli", "hydra"} <= imported and "torch" not in imported
    assert list(tmp_path.iterdir()) == []  # no outputs/ run dir
