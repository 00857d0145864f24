"""Hydra and OmegaConf for the rest of tip: the schema's registration, validation of a composed config, the
groups' options, and the config as a plain dict or YAML (the only module besides the CLI that imports them)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tip_cli.config.schema import ConfigError, TipConfig

_PACKAGE = Path(__file__).resolve().parents[1]
# An installed wheel carries the groups inside the package (pyproject.toml maps conf/ to tip_cli.conf); a checkout,
# editable install included, has them at the top of the repository. A plain path, not Hydra's pkg://, so a checkout
# on PYTHONPATH works too.
CONF_DIR = next((d for d in (_PACKAGE / "conf", _PACKAGE.parent / "conf") if d.is_dir()), _PACKAGE.parent / "conf")
GROUPS = ("task", "pair", "selector", "importance", "loss", "teacher", "benchmark", "data", "rollout", "train", "optim",
          "parallel", "logger")
# Keys that moved to another group: a command-line override, a recorded run dir's config.yaml and its overrides.jsonl
# may still name the old key, and mean the new one.
MOVED = {
    "train.lr": "optim.lr",
    "train.lr_schedule": "optim.lr_schedule",
    "train.warmup_steps": "optim.warmup_steps",
    "train.weight_decay": "optim.weight_decay",
    "train.grad_clip": "optim.grad_clip",
    "train.selection_scope": "parallel.rank_scope",
    "train.cpu_offload": "parallel.cpu_offload",
    "train.shard_teacher": "parallel.shard_teacher",
}


def register() -> None:
    """Put the schema into Hydra's ConfigStore; conf/config.yaml lists it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tip_schema", node=TipConfig)


def schema_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: the fields of TipConfig and of its nested dataclasses (a dict field, such as
    benchmark.env_options, is one key whose own keys are free)."""
    node = TipConfig() if node is None else node
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        keys += schema_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


def moved_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides with every moved key (MOVED) under its new name, and one notice per renamed
    override: `train.lr is now optim.lr; using optim.lr=3e-4`."""
    out, notices = [], []
    for override in overrides:
        found = re.fullmatch(r"(~|\+{1,2})?([\w.]+)(.*)", override, flags=re.DOTALL)
        new = MOVED.get(found.group(2)) if found else None
        if new is None:
            out.append(override)
            continue
        renamed = f"{found.group(1) or ''}{new}{found.group(3)}"
        out.append(renamed)
        notices.append(f"{found.group(2)} is now {new}; using {renamed}")
    return out, notices


def moved_keys(node: DictConfig) -> DictConfig:
    """A recorded config (a run dir's config.yaml) with the keys it holds under an old name (MOVED) moved to their
    new place, so that it compares with, and reads like, a config composed today."""
    for old, new in MOVED.items():
        group, _, leaf = old.rpartition(".")
        parent = OmegaConf.select(node, group) if group else node
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        value = parent[leaf]
        del parent[leaf]
        if OmegaConf.select(node, new, default=None) is None:
            set_key(node, new, value)
    return node


def unknown_key_message(key: str) -> str:
    """One line for a key the schema lacks: its new name when it moved (MOVED), else the closest valid key (among
    its siblings when its parent is known), else the valid keys of its parent."""
    if key in MOVED:
        return f"unknown key '{key}': it is now '{MOVED[key]}'"
    known = schema_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k.removeprefix(parent + ".") for k in known if k.startswith(parent + ".")] if parent else \
        sorted({k.split(".")[0] for k in known})
    close = ([f"{parent}.{m}" if parent else m for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
             if siblings else difflib.get_close_matches(key, known, n=1, cutoff=0.6))
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'? (`tip config` prints every key)"
    if not siblings:
        return f"unknown key '{key}'; `tip config` prints every key"
    return f"unknown key '{key}'; valid keys of {parent or 'the top level'}: {', '.join(siblings)}"


def _unknown_keys(cfg: DictConfig, node: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that the schema lacks (added with `+`, which a structured config lets through)."""
    fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    found = []
    for key in cfg:
        if key not in fields:
            found.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(fields[key]) and isinstance(cfg[key], DictConfig):
            found += _unknown_keys(cfg[key], fields[key], f"{prefix}{key}.")
    return found


def validate(cfg: DictConfig) -> TipConfig:
    """Refuse keys the schema lacks, then instantiate the dataclasses (running every `__post_init__` check) and
    return the typed config."""
    node = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    unknown = _unknown_keys(node, TipConfig())
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0]))
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def group_options(group: str) -> list[str]:
    """The options of a config group, read from conf/<group>/*.yaml."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def to_container(cfg: TipConfig | DictConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (a typed config or a loaded YAML node)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node)  # type: ignore[return-value]


def to_yaml(cfg: TipConfig) -> str:
    """The typed config as YAML (a run dir's config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_yaml(path: Path) -> DictConfig:
    """A config.yaml as an attribute-access node, keys written under an old name moved to their new one
    (moved_keys); ConfigError (one line naming the file) when it is not one."""
    try:
        node = OmegaConf.load(path)
    except OSError:  # missing or unreadable: the caller's to report, as for any file
        raise
    except Exception as err:  # YAML syntax and OmegaConf errors alike: the file is damaged
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path} cannot be read as YAML ({detail})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} is not a config (a YAML mapping)")
    return moved_keys(node)


def set_key(cfg: DictConfig, key: str, value: Any) -> None:
    """Set a dotted key of a loaded config, adding it when absent."""
    OmegaConf.update(cfg, key, value, force_add=True)
