"""The `tip` command line: Typer commands whose arguments are Hydra overrides (`tip train selector=soft_or budget=0.5`).

Every command first composes and validates the config for each job it would run (each point of a `-m` sweep
too, including those of a `+sweep=PRESET` from conf/sweep/), so a typo fails in about a second with the valid
options listed; then Hydra runs the job(s), giving each its own output dir (`outputs/...`, or
`multirun/.../N_overrides` for sweeps). `tip analyze` turns finished runs into plots and a table.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from tip_cli import __version__
from tip_cli.config.compose import (
    CONF_DIR,
    GROUPS,
    group_options,
    moved_overrides,
    register,
    unknown_key_message,
    validate,
)
from tip_cli.config.schema import ConfigError, TipConfig
from tip_cli.errors import UserError

if TYPE_CHECKING:  # the eval stack loads transformers: imported when `tip eval` runs, not for every command
    from tip_cli.eval.benchmark import EvalJob

console = Console(stderr=True)
# What the user can fix, printed in one line with exit 2: tip's own UserErrors (a config value, a data row, a run dir,
# a checkpoint, a full disk, a teacher server gone), and a missing file or a lost connection met outside tip's code.
# Anything else is a bug: its traceback is kept and the exit code is 1.
USER_FAULTS = (UserError, FileNotFoundError, ConnectionError)


def groups_help() -> str:
    lines = ["Config groups (choose with GROUP=OPTION):"]
    lines += [f"  {g}: {', '.join(group_options(g))}" for g in GROUPS]
    lines += [
        f"Sweep presets (with -m; conf/sweep/): +sweep={'|'.join(group_options('sweep'))}, "
        "e.g. tip train -m +sweep=budgets train.steps=30; then tip analyze multirun/DATE/TIME.",
        "Values: budget=FLOAT in (0,1], seed=INT, out_dir=PATH, and any field such as train.steps=100, "
        "rollout.max_new_tokens=512, importance.norm=rank, loss.kind=jsd (see `tip config`).",
    ]
    return "\n\n".join(lines)


def explain(err: Exception) -> str:
    """A short message for a config error, naming the closest valid key when an unknown key was given."""
    msg = str(err).split("\nConfig search path")[0].strip()
    found = re.search(r"Could not override '([\w.]+)'", msg)
    if found:
        return unknown_key_message(found.group(1))
    found = re.search(r"Key '\w+' not in '\w+'\s+full_key: ([\w.]+)", msg)  # a config file's unknown key
    if found:
        where = re.match(r"In '([^']+)'", msg)
        return (f"conf/{where.group(1)}.yaml: " if where else "") + unknown_key_message(found.group(1))
    if "submitit" in msg:
        msg += "\nThe SLURM launcher is a plugin: pip install hydra-submitit-launcher (see conf/hydra/launcher/slurm.yaml)"
    cause = err.__cause__
    if cause is not None and str(cause).splitlines():
        msg = f"{msg}: {str(cause).splitlines()[0]}"
    return msg


def _job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job: one for a plain run; for -m, what Hydra's basic sweeper will run: the
    cartesian product of the composed config's `hydra.sweeper.params` (set by a `+sweep=PRESET`) and the command
    line's sweeps, a command-line key replacing the preset's. Raises ConfigError for a sweep Hydra cannot read."""
    if not multirun:
        return [overrides]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            # the loader lets glob(*) sweeps list a group's options
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
            params = compose("config", overrides=fixed, return_hydra_config=True).hydra.sweeper.params or {}
            parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + overrides)
    except (HydraException, OmegaConfBaseException) as err:  # they carry their own message
        raise ConfigError(explain(err)) from err
    finally:
        GlobalHydra.instance().clear()
    return _cartesian(parsed)


def _cartesian(parsed: list) -> list[list[str]]:
    """The jobs Hydra's basic sweeper runs for parsed overrides: the cartesian product of each key's values (one
    for a plain override, each of a list or range sweep), keys in first-seen order, a later override of a key
    replacing an earlier one in its place."""
    values: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise ConfigError(f"cannot sweep {override.input_line!r}: -m runs lists (KEY=A,B) and ranges "
                              "(KEY=range(0,3)), not intervals")
    return [list(job) for job in itertools.product(*values.values())]


def compose_config(overrides: list[str]) -> TipConfig:
    """Compose conf/config.yaml with the overrides (a moved key read under its new name) and validate it; raises
    ConfigError with a readable message."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    own = [o for o in moved_overrides(overrides)[0] if not o.lstrip("~+").startswith("hydra")]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = validate(compose("config", overrides=own))
        _check_installed(cfg)
        return cfg
    except ConfigError:
        raise
    except Exception as err:  # Hydra and OmegaConf errors carry their own message
        raise ConfigError(explain(err)) from err
    finally:
        GlobalHydra.instance().clear()


def eval_job(cfg: TipConfig) -> EvalJob:
    """What `tip eval` reads of the config (tip_cli.eval.benchmark.EvalJob), built once."""
    from tip_cli.eval.benchmark import EvalJob, eval_spec

    return EvalJob(eval_spec(cfg.benchmark, cfg.eval, cfg.pair, cfg.agent, cfg.rollout), cfg.checkpoint, cfg.out_dir,
                   cfg.train.device, cfg.rollout.engine, cfg.rollout.vllm, cfg.seed, cfg.logger)


def _check_installed(cfg: TipConfig) -> None:
    """Options that need an optional dependency fail before any model is loaded when it is missing."""
    wants = [o for o, on in (("rollout.engine=vllm", cfg.rollout.engine == "vllm"),
                             ("teacher.backend=vllm_topk", cfg.teacher.backend == "vllm_topk")) if on]
    if wants and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{' and '.join(wants)} need vLLM, which is not installed: "
                          "`pip install -e .[vllm]` (GPU) or `make setup-vllm` (CPU)")


def _run_job(command: str, cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tip_cli.checkpoint import list_checkpoints
    from tip_cli.train import signals

    tip_cfg = validate(cfg)
    run_dir = Path(tip_cfg.out_dir) if tip_cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    try:
        with signals.sigterm_stops():
            if command == "train":
                from tip_cli.train.recipe import train

                train(tip_cfg, run_dir)
            else:
                from tip_cli.eval.benchmark import run_eval_command

                run_eval_command(eval_job(tip_cfg))
    except USER_FAULTS as err:
        if os.environ.get("TIP_DEBUG"):
            raise
        console.print(f"[red]error:[/] {err}  (TIP_DEBUG=1 shows the traceback)", soft_wrap=True)
        raise SystemExit(2) from err
    except (KeyboardInterrupt, signals.Interrupted) as err:
        name = err.args[0] if isinstance(err, signals.Interrupted) else "SIGINT"
        # the newest committed one, not re-verified: hashing a large checkpoint would outlast SLURM's patience
        last = (list_checkpoints(run_dir) or [None])[-1] if command == "train" else None
        where = f"; last checkpoint: {last.path if last else 'none'} (the same command resumes from it)"
        console.print(f"stopped by {name}{where if command == 'train' else ''}", soft_wrap=True)
        raise SystemExit(128 + getattr(signal, name)) from None


# Hydra's task functions, one per command and module-level, so that launchers which pickle the task function
# to run it elsewhere (SLURM via hydra-submitit-launcher) run the right command.
def _train_job(cfg) -> None:
    _run_job("train", cfg)


def _eval_job(cfg) -> None:
    _run_job("eval", cfg)


def _quoted(value: str) -> str:
    """A Hydra override value that stays this one string whatever it holds (spaces, quotes, '=', commas, '${'):
    single-quoted, with Hydra's escapes (a quote, and the backslashes right before a quote or the closing quote)
    and OmegaConf's (an interpolation's '${', and the backslashes right before it)."""
    escaped = re.sub(r"(\\*)('|\$\{|$)", lambda m: m.group(1) * 2 + {"'": "\\'", "${": "\\${"}.get(m.group(2), ""), value)
    return f"'{escaped}'"


def readable_overrides(overrides: list[str]) -> list[str]:
    """The overrides as Hydra's grammar reads them. A KEY=VALUE it cannot read whose value is a plain string (a
    path with non-ASCII letters, say) is passed quoted, so it arrives unchanged; any other is a ConfigError with a
    hint."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    readable = []
    for override in overrides:
        try:
            parser.parse_override(override)
            readable.append(override)
            continue
        except Exception as err:  # Hydra's grammar errors carry the offending input
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        key, eq, value = override.partition("=")
        if eq and value and not value.startswith(("'", '"', "[", "{")):
            readable.append(f"{key}={_quoted(value)}")
            continue
        raise ConfigError(f"cannot read the override {override!r} ({first}); the form is KEY=VALUE, a list is "
                          f"KEY=[A,B], and a value with brackets, commas or quotes is quoted: KEY=\"'VALUE'\"")
    return readable


def renamed(overrides: list[str]) -> list[str]:
    """The overrides with each moved key under its new name, a line printed for each (compose.MOVED)."""
    overrides, notices = moved_overrides(overrides)
    for notice in notices:
        console.print(notice, soft_wrap=True, markup=False, highlight=False)
    return overrides


def launch(command: str, overrides: list[str], multirun: bool) -> None:
    """Validate every job's config, then hand the overrides to Hydra, which runs the job(s)."""
    import hydra

    overrides = renamed(overrides)

    if not multirun and any(re.match(r"\+*sweep[=/]", o) for o in overrides):
        console.print("[red]error:[/] +sweep=PRESET is a sweep over several jobs: add -m, e.g. tip train -m +sweep=budgets")
        raise typer.Exit(2)
    try:
        overrides = readable_overrides(overrides)
        configs = [compose_config(job) for job in _job_overrides(overrides, multirun)]
    except ConfigError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(2) from err
    from tip_cli.train.rundir import make_run_dir  # torch: only once the config is known to be good

    try:
        # made here rather than by Hydra, so that a path that cannot be a run dir fails in a line; removed again when
        # the job leaves it empty (bad data, a refused config)
        made = [Path(c.out_dir) for c in configs if command == "train" and c.out_dir and make_run_dir(Path(c.out_dir))]
    except UserError as err:  # a path that cannot be a run dir, a full disk
        console.print(f"[red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(2) from err
    register()
    extra = []
    if not multirun and (command == "eval" or configs[0].out_dir):
        # Hydra writes nothing of its own: no outputs/DATE/TIME/.hydra beside a given out_dir (or for eval)
        run_dir = configs[0].out_dir if command == "train" else "."
        extra = ["hydra.output_subdir=null", f"hydra.run.dir={_quoted(run_dir)}"]
    sys.argv = ["tip", *overrides, *extra, *(["--multirun"] if multirun else [])]
    task = _train_job if command == "train" else _eval_job
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(task)()
    finally:
        for run_dir in made:
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="tip: on-policy distillation with token importance (TIP).\n\n" + groups_help(),
)
OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. selector=soft_or budget=0.5 train.steps=100")
MULTIRUN = typer.Option(False, "--multirun", "-m", help="Sweep: comma lists become one job each (budget=0.1,0.5,1.0)")


def _print_version(value: bool) -> None:
    if value:
        print(f"tip {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit"),
) -> None:
    pass


@app.command(epilog=groups_help())
def train(overrides: list[str] = OVERRIDES, multirun: bool = MULTIRUN) -> None:
    """Distil the student from the teacher on its own rollouts, training on the selected tokens.

    Re-running with the same out_dir=PATH resumes from the last verified checkpoint there, if the config is the
    one recorded (else it stops, listing the changes; train.resume=override continues with them).
    """
    launch("train", overrides or [], multirun)


@app.command("eval", epilog=groups_help())
def eval_(
    checkpoint: str = typer.Argument(..., help="A checkpoint dir, a run dir (every checkpoint), a HF id, or toy://student"),
    overrides: list[str] = OVERRIDES,
    multirun: bool = MULTIRUN,
) -> None:
    """Evaluate a model on a benchmark (benchmark=toy|math500|aime24|aime25) with math-verify grading."""
    launch("eval", [f"checkpoint={_quoted(checkpoint)}", *(overrides or [])], multirun)


@app.command()
def toy(
    seed: int = typer.Option(0, help="Seed of the task, tokenizer and both models"),
    force: bool = typer.Option(False, help="Rebuild even if cached"),
) -> None:
    """Build the embedded tiny teacher-student pair (cached under $TIP_CACHE, default ~/.cache/tip)."""
    from tip_cli.toy.build import build_toy, describe_pair

    for line in describe_pair(build_toy(seed=seed, force=force), seed):
        console.print(line, soft_wrap=True, markup=False)  # one line each, a path's brackets kept


@app.command()
def analyze(
    paths: list[Path] = typer.Argument(..., help="Run dirs, or sweep dirs (multirun/DATE/TIME) standing for every run below"),
    out: Path = typer.Option(Path("analysis"), "--out", "-o", help="Where the PNGs and summary.md go"),
    step: int = typer.Option(None, help="Token-sample step for the entropy/divergence histograms (default: each run's last)"),
    benchmark: str = typer.Option(None, help="Benchmark whose accuracy is compared (default: each run's benchmark)"),
    wandb: bool = typer.Option(None, "--wandb/--no-wandb", help="Also log figures and table to W&B (default: if the runs did)"),
) -> None:
    """Compare finished runs: accuracy and cost vs token budget, entropy/divergence histograms with the quadrant
    shares, training curves, and a summary table (printed, and saved as summary.md)."""
    from tip_cli.analysis.report import analyze as run_analysis

    try:
        table, files = run_analysis(paths, out, step=step, benchmark=benchmark, use_wandb=wandb)
    except USER_FAULTS as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from err
    print(table, end="", flush=True)
    # where the time goes (summary.md's second table); by (selector, budget), over seeds; then the counterfactual
    # gradient share, when there is one
    blocks = [b for name in ("summary.md", "by_budget.md") for b in (out / name).read_text().split("\n\n")]
    tables = [block for block in blocks if block.startswith("|")][1:]
    print("\n" + "\n\n".join(t.rstrip("\n") for t in tables), flush=True)
    console.print(f"wrote {len(files)} files into {out}/: summary.md, the comparison PNGs, curves/ and token_hist/")


@app.command(epilog=groups_help())
def config(overrides: list[str] = OVERRIDES) -> None:
    """Print the composed, validated config."""
    from omegaconf import OmegaConf

    try:
        cfg = compose_config(readable_overrides(renamed(overrides or [])))
    except ConfigError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(2) from err
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")


def main() -> None:
    # tip shows its own progress; the Hub's, datasets' and transformers' per-file bars are noise. Set before they are
    # imported (a variable the user set stays theirs), so a command that needs neither does not import them for it.
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
    app()


if __name__ == "__main__":
    main()
