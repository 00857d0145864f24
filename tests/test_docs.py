"""The docs site: the configuration reference matches the schema and conf/, and mkdocs builds it with --strict."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tip_cli.config.compose import CONF_DIR
from tip_cli.config.schema import TipConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_the_generated_one(gen):
    assert PAGE.read_text() == gen.render(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


def _keys(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_reference_lists_every_key_and_every_group_option():
    text = PAGE.read_text()
    keys = list(_keys(TipConfig()))
    assert len(keys) > 100
    assert [k for k in keys if f"| `{k}` |" not in text] == []
    options = [p.relative_to(CONF_DIR) for p in CONF_DIR.glob("*/*.yaml")] + list(CONF_DIR.glob("hydra/launcher/*.yaml"))
    assert [p for p in options if f"| `{p.stem}` |" not in text] == []


def test_help_allowed_values_and_a_missing_comment(gen):
    source = '''
from dataclasses import dataclass
@dataclass
class Thing:
    # chosen by
    # the user
    kind: str = "a"  # the kind
    frac: float = 0.5
    quads: list = None  # which

    def __post_init__(self):
        _one_of("thing.kind", self.kind, ("a", "b"))
        _in_range("thing.frac", self.frac, 0.0, 1.0, lo_open=True)
        for q in self.quads:
            _one_of("thing.quads[]", q, QUADRANTS)
'''
    docs = gen.field_docs(source)["Thing"]
    assert docs["kind"].help == "chosen by the user; the kind" and docs["kind"].allowed == "`a`, `b`"
    assert docs["frac"].help == "" and docs["frac"].allowed == "(0.0, 1.0]"
    assert docs["quads"].allowed == "`Q1`, `Q2`, `Q3`, `Q4`"  # the loop variable counts as the field


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is in the dev extra")
def test_mkdocs_build_strict(tmp_path):
    # no --quiet: it hides the warnings --strict counts
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is in the dev extra")
def test_mkdocs_config_fails_on_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# tip\n\n[gone](missing.md)\n")
    config = (ROOT / "mkdocs.yml").read_text().split("\nnav:")[0]  # the same theme and validation, one page
    (tmp_path / "mkdocs.yml").write_text(config + "\n")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "missing.md" in done.stdout + done.stderr
