"""The wheel: every module and every config group ships, and the installed `tip` works outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy of the sources, so the checkout gets no build/ or egg-info."""
    pytest.importorskip("setuptools", reason="pip wheel --no-build-isolation builds with the installed setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "tip_cli", src / "tip_cli", ignore=ignore)
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)]
    subprocess.run(cmd, check=True, cwd=tmp, capture_output=True, text=True)
    (built,) = (tmp / "dist").glob("tip_cli-*.whl")
    return built


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tip_cli").rglob("*.py")}
    configs = {"tip_cli/conf/" + p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert len(modules) > 50 and len(configs) > 50  # the globs found the trees
    assert modules - names == set()
    assert configs - names == set()


def test_wheel_metadata_version_and_extras(wheel):
    import tip_cli

    archive = zipfile.ZipFile(wheel)
    (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    lines = archive.read(meta).decode().splitlines()
    assert f"Version: {tip_cli.__version__}" in lines
    extras = {line.split(": ", 1)[1] for line in lines if line.startswith("Provides-Extra: ")}
    assert {"dev", "vllm", "bench"} <= extras
    requires = [line for line in lines if line.startswith("Requires-Dist: ")]
    assert any(r.startswith("Requires-Dist: vllm") and 'extra == "vllm"' in r for r in requires)
    assert any(r.startswith("Requires-Dist: mkdocs") and 'extra == "dev"' in r for r in requires)
    entry_points = archive.read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "tip = tip_cli.cli:main" in entry_points
    assert "[vllm.general_plugins]\ntip_weights = tip_cli.rollout.vllm_plugin:register" in entry_points


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "x"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"  # no conf/ here or above: the configs must come from the package
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = run("-c", "import tip_cli.config.compose as c; print(c.__file__); print(c.CONF_DIR)").split()
    assert Path(where[0]).is_relative_to(target) and Path(where[1]) == target / "tip_cli" / "conf"

    import tip_cli

    assert run("-m", "tip_cli", "--version").strip() == f"tip {tip_cli.__version__}"
    composed = run("-m", "tip_cli", "config", "selector=hard_or", "budget=0.3", "+experiment=qwen3_math500")
    assert "name: hard_or" in composed and "budget: 0.3" in composed
    assert "teacher: Qwen/Qwen3-8B" in composed  # from conf/experiment -> conf/pair, both inside the wheel
    assert not (work / "outputs").exists()
