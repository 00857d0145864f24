"""scripts/import_cycles.py finds cycles that go through function-level imports, and names them."""

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_cycles.py"


def write_package(root: Path, modules: dict[str, str]) -> None:
    pkg = root / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, body in modules.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(body))


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "cyc"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root)})


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    write_package(tmp_path, {
        "a": "from cyc import b\n",
        "b": "import torch  # an outside package is not an edge\n\ndef late():\n    from cyc import c\n",
        "c": "def later():\n    import cyc.a\n",
        "d": "from cyc import a\n",  # imports into the cycle, is not on it
    })
    done = run(tmp_path)
    assert done.returncode == 1, done.stderr
    assert "cycle among 3 modules: cyc.a, cyc.b, cyc.c" in done.stdout
    assert "cyc.a -> cyc.b -> cyc.c -> cyc.a" in done.stdout
    assert "cyc.b:4  from cyc import c" in done.stdout  # the function-level import, with its line
    assert "cyc.d" not in done.stdout


def test_an_acyclic_package_passes(tmp_path):
    write_package(tmp_path, {"a": "from cyc import b\n", "b": "def f():\n    from cyc import c\n", "c": ""})
    done = run(tmp_path)
    assert done.returncode == 0 and "no import cycles in cyc" in done.stdout, done.stdout + done.stderr


def test_tip_cli_has_no_import_cycle():
    """tip_cli itself: no cycle among its modules, function-level imports and package __init__ included."""
    repo = SCRIPT.parents[1]
    out = subprocess.run([sys.executable, str(SCRIPT), "tip_cli"], cwd=repo, capture_output=True, text=True,
                         env={"PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stdout + out.stderr
