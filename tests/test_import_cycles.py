"""The package's structure: scripts/import_cycles.py finds cycles through function-level imports and names them; the
whole config (TipConfig) reaches only the top of the package."""

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


def config_holders(root: Path) -> dict[str, list[str]]:
    """module -> the functions and fields of tip_cli annotated with the whole config (TipConfig), read from the AST."""
    import ast

    found: dict[str, list[str]] = {}
    for path in sorted((root / "tip_cli").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                named = [a.arg for a in args if a.annotation is not None and "TipConfig" in ast.unparse(a.annotation)]
                found.setdefault(module, []).extend(f"{node.name}({a})" for a in named)
            elif isinstance(node, ast.AnnAssign) and "TipConfig" in ast.unparse(node.annotation):
                found.setdefault(module, []).append(ast.unparse(node.target))
    return {m: names for m, names in found.items() if names}


def test_only_the_cli_composition_run_dir_and_recipe_take_the_whole_config():
    """Components get their own specs: the whole config reaches the CLI, its composition, the run dir's contract
    (which records and compares it) and at most three functions of the recipe entry, and nothing else."""
    holders = config_holders(Path(__file__).resolve().parents[1])
    allowed = {"tip_cli.cli", "tip_cli.config.compose", "tip_cli.train.rundir", "tip_cli.train.recipe"}
    assert set(holders) <= allowed, {m: n for m, n in holders.items() if m not in allowed}
    assert len(holders.get("tip_cli.train.recipe", [])) <= 3, holders["tip_cli.train.recipe"]
    assert "tip_cli.train.loop" not in holders


def test_the_config_holders_scan_sees_an_annotated_parameter(tmp_path):
    (tmp_path / "tip_cli").mkdir()
    (tmp_path / "tip_cli" / "a.py").write_text("def f(x, cfg: 'TipConfig | None'):\n    pass\n\n"
                                               "class R:\n    cfg: TipConfig\n")
    assert config_holders(tmp_path) == {"tip_cli.a": ["f(cfg)", "cfg"]}
