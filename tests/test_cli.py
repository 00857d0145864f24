"""Config composition and validation, and the CLI surface."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tip_cli.cli import _job_overrides, app, compose_config
from tip_cli.config.compose import CONF_DIR, GROUPS, MOVED, group_options, load_yaml, to_container
from tip_cli.config.schema import ConfigError, TipConfig

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


# what an option cannot do without
NEEDS = {("rollout", "vllm_server"): ["rollout.url=http://127.0.0.1:8000"],
         ("teacher", "vllm_server"): ["teacher.url=http://127.0.0.1:8000"]}
NEEDS_VLLM = {("rollout", "vllm"), ("teacher", "vllm_topk")}  # refused at composition when vLLM is not installed
# the key that names the option (the file names itself); None: a group whose options are not one key's values
NAMED = {"task": None, "train": None, "parallel": None, "rollout": ["rollout", "engine"], "teacher": ["teacher", "backend"],
         "loss": ["loss", "kind"], "importance": ["importance", "norm"], "optim": ["optim", "lr_schedule"]}


def default_options() -> dict[str, str]:
    """group -> the option conf/config.yaml's defaults list picks."""
    picks = [d for d in yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"] if isinstance(d, dict)]
    return {k: v for d in picks for k, v in d.items() if k in GROUPS}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_to_its_yaml_values(group):
    """Each value in conf/<group>/<option>.yaml lands at its place in the composed config: under the group, or at
    the top level for `# @package _global_` files; an interpolation ${a.b} equals the composed value at a.b."""
    for option in group_options(group):
        text = (CONF_DIR / group / f"{option}.yaml").read_text()
        root = [] if "# @package _global_" in text else [group]
        if (group, option) in NEEDS_VLLM and importlib.util.find_spec("vllm") is None:
            with pytest.raises(ConfigError, match="need vLLM, which is not installed"):  # fails early, with the fix
                compose_config([f"{group}={option}"])
            continue
        cfg = compose_config([f"{group}={option}", *NEEDS.get((group, option), [])])
        doc = yaml.safe_load(text) or {}
        # `defaults` is Hydra's list of other files to merge, not a value
        leaves = [leaf for key, node in doc.items() if key != "defaults" for leaf in yaml_leaves(node, [*root, key])]
        # only the default option may set nothing: it is the schema's defaults
        assert leaves or option in ("none", default_options()[group]), f"{group}={option} sets nothing"
        for path, value in leaves:
            ref = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
            want = lookup(cfg, ref.group(1).split(".")) if ref else value
            assert lookup(cfg, path) == want, f"{group}={option}: {'.'.join(path)}"
        # the option name itself lands in the config: the file names itself (rollout: its engine)
        named = NAMED.get(group, [group, "name"])
        assert named is None or lookup(cfg, named) == option


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_a_default_option_restates_no_schema_default(group):
    """The defaults live in the dataclasses alone: a group's default option holds no value of its own group equal to
    the schema's default at its place (one place to change a default). A `_global_` option's settings of another
    group (the toy pair's thresholds in nats) are that option's choice, kept when a default changes."""
    option = default_options()[group]
    text = (CONF_DIR / group / f"{option}.yaml").read_text()
    root = [] if "# @package _global_" in text else [group]
    doc = yaml.safe_load(text) or {}
    schema = to_container(TipConfig())
    for path, value in (leaf for key, node in doc.items() if key != "defaults" for leaf in yaml_leaves(node, [*root, key])):
        assert path[0] != group or lookup(schema, path) != value, f"{group}={option} restates {'.'.join(path)}={value!r}"


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


# --------------------------------------------------------------------------------------------------- moved keys

# the keys as tip named them before the optimizer and the multi-GPU settings had groups of their own
OLD_KEYS = {"train.lr": ("optim.lr", "3e-4", 3e-4), "train.lr_schedule": ("optim.lr_schedule", "cosine", "cosine"),
            "train.warmup_steps": ("optim.warmup_steps", "5", 5), "train.weight_decay": ("optim.weight_decay", "0.1", 0.1),
            "train.grad_clip": ("optim.grad_clip", "0", 0.0), "train.selection_scope": ("parallel.rank_scope", "local", "local"),
            "train.cpu_offload": ("parallel.cpu_offload", "true", True),
            "train.shard_teacher": ("parallel.shard_teacher", "true", True)}


def test_the_moved_keys_are_the_ones_tip_used_to_have():
    assert {old: new for old, (new, _, _) in OLD_KEYS.items()} == MOVED


@pytest.mark.parametrize("old", OLD_KEYS)
def test_an_old_key_on_the_command_line_composes_to_its_new_place_with_one_notice(old):
    new, text, value = OLD_KEYS[old]
    cfg = compose_config([f"{old}={text}"])
    assert lookup(cfg, new.split(".")) == value and not hasattr(cfg.train, old.split(".")[1])
    assert cfg == compose_config([f"{new}={text}"])
    out = runner.invoke(app, ["config", f"{old}={text}"])
    assert out.exit_code == 0
    notices = [line for line in out.output.splitlines() if " is now " in line]
    assert notices == [f"{old} is now {new}; using {new}={text}"]


def test_an_old_key_in_a_sweep_is_renamed_once_before_any_job_is_composed(tmp_path):
    """`tip train -m train.lr=A,B` prints one line for the key, not one a job; a typo elsewhere then fails as usual."""
    proc = subprocess.run([sys.executable, "-m", "tip_cli.cli", "train", "-m", "train.lr=1e-4,3e-4", "selector=sof_or"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "soft_or" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if " is now " in line] == [
        "train.lr is now optim.lr; using optim.lr=1e-4,3e-4"]


def test_an_old_key_in_a_config_file_names_its_new_place(tmp_path, monkeypatch):
    """An old key the command line cannot rename (one in a YAML of the user's) fails in a line naming its new key."""
    import shutil

    from tip_cli import cli

    conf = Path(shutil.copytree(CONF_DIR, tmp_path / "conf"))
    for old, (new, text, _) in OLD_KEYS.items():
        group, leaf = old.split(".")
        (conf / "experiment" / "mine.yaml").write_text(f"# @package _global_\n{group}:\n  {leaf}: {text}\n")
        monkeypatch.setattr(cli, "CONF_DIR", conf)
        with pytest.raises(ConfigError) as err:
            compose_config(["+experiment=mine"])
        assert str(err.value) == f"conf/experiment/mine.yaml: unknown key '{old}': it is now '{new}'"


def test_an_old_config_yaml_loads_with_its_keys_in_their_new_place(tmp_path):
    """A config.yaml written before the move (the moved keys under train) reads as today's default config."""
    doc = to_container(TipConfig())
    optim, par = doc.pop("optim"), doc.pop("parallel")
    doc["train"] |= {"lr": optim["lr"], "lr_schedule": optim["lr_schedule"], "warmup_steps": optim["warmup_steps"],
                     "weight_decay": optim["weight_decay"], "grad_clip": optim["grad_clip"],
                     "selection_scope": par["rank_scope"], "cpu_offload": par["cpu_offload"],
                     "shard_teacher": par["shard_teacher"]}
    doc["train"]["lr"] = 3e-4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    loaded = to_container(load_yaml(tmp_path / "config.yaml"))
    want = to_container(TipConfig())
    want["optim"]["lr"] = 3e-4
    assert loaded == want
