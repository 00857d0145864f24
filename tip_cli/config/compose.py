"""Hydra and OmegaConf for the rest of tip: the schema's registration, validation of a composed config, the
groups' options, and the config as a plain dict or YAML (the only module besides the CLI that imports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tip_cli.config.schema import TipConfig

_PACKAGE = Path(__file__).resolve().parents[1]
# An installed wheel carries the groups inside the package (pyproject.toml maps conf/ to tip_cli.conf); a checkout,
# editable install included, has them at the top of the repository. A plain path, not Hydra's pkg://, so a checkout
# on PYTHONPATH works too.
CONF_DIR = next((d for d in (_PACKAGE / "conf", _PACKAGE.parent / "conf") if d.is_dir()), _PACKAGE.parent / "conf")
GROUPS = ("task", "pair", "selector", "benchmark", "data", "rollout", "train", "logger")


def register() -> None:
    """Put the schema into Hydra's ConfigStore; conf/config.yaml lists it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tip_schema", node=TipConfig)


def validate(cfg: DictConfig) -> TipConfig:
    """Instantiate the dataclasses (running every `__post_init__` check) and return the typed config."""
    node = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
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
    """A config.yaml as an attribute-access node."""
    return OmegaConf.load(path)  # type: ignore[return-value]


def set_key(cfg: DictConfig, key: str, value: Any) -> None:
    """Set a dotted key of a loaded config, adding it when absent."""
    OmegaConf.update(cfg, key, value, force_add=True)
