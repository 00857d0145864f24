"""Evaluation: sample k responses per problem, grade them with math-verify, report avg@k / pass@k / maj@k.

`tip eval PATH` takes a checkpoint dir (or any HF id / `toy://student`), or a run dir, whose checkpoints are all
evaluated (skipping those already evaluated with the same settings) into an accuracy curve.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoConfig, GenerationConfig

from tip_cli.checkpoint import (
    MANIFEST,
    Checkpoint,
    CheckpointError,
    is_run_checkpoint,
    list_checkpoints,
    verify,
)
from tip_cli.config.schema import (
    AgentConfig,
    ConfigError,
    DatasetConfig,
    EvalConfig,
    LoggerConfig,
    PairConfig,
    RolloutConfig,
    VLLMConfig,
)
from tip_cli.data import Problem, fit_context, load_problems
from tip_cli.eval.metrics import summarize
from tip_cli.grading import grade
from tip_cli.models import load_model, load_tokenizer, pick_device, pick_dtype, render_prompt
from tip_cli.pairs import resolve_model
from tip_cli.rollout.batch import Sampling
from tip_cli.rollout.hf import HFEngine
from tip_cli.tracking import init_wandb

console = Console()


def eval_sampling(bench: DatasetConfig, ev: EvalConfig) -> Sampling:
    """The benchmark's own sampling defaults, with any eval.* value that is set taking precedence."""

    def pick(override, default):
        return default if override is None else override

    return Sampling(
        n=pick(ev.n, bench.n),
        temperature=pick(ev.temperature, bench.temperature),
        top_p=pick(ev.top_p, bench.top_p),
        max_new_tokens=pick(ev.max_new_tokens, bench.max_new_tokens),
    )


def engine_context(rollout: RolloutConfig) -> int | None:
    """The context the rollout engine caps prompts and answers at beyond the models' own: rollout.vllm.max_model_len
    under vLLM; None otherwise."""
    return rollout.vllm.max_model_len if rollout.engine == "vllm" else None


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation reads of the config, built once (`eval_spec`): the benchmark and its sampling, the batch
    size, the row limit and whether rows too long for the context are skipped, the chat template (pair), the
    agent's limits (for an environment) and the engine's context cap (`engine_context`)."""

    benchmark: DatasetConfig
    sampling: Sampling
    batch_size: int
    limit: int | None
    skip_bad_rows: bool
    pair: PairConfig
    agent: AgentConfig
    context: int | None = None

    def settings(self) -> dict[str, Any]:
        """What makes two evaluations comparable: the benchmark, its sampling, and the problem limit."""
        out = {"benchmark": asdict(self.benchmark), "sampling": asdict(self.sampling), "limit": self.limit}
        return out | ({"agent": asdict(self.agent)} if self.benchmark.env else {})


def eval_spec(bench: DatasetConfig, ev: EvalConfig, pair: PairConfig, agent: AgentConfig,
              rollout: RolloutConfig) -> EvalSpec:
    """The evaluation's spec from its config groups (the rollout group for the engine's context)."""
    return EvalSpec(bench, eval_sampling(bench, ev), ev.batch_size, ev.limit, ev.skip_bad_rows, pair, agent,
                    engine_context(rollout))


class Shard(Protocol):
    """How the ranks of a job split an evaluation: `split(rows)` is this rank's share of the rows, `gather(out, n)`
    every rank's outputs for its share, concatenated in row order, the first n (what one process would have)."""

    def split(self, rows: list) -> list: ...

    def gather(self, out: list, n: int) -> list: ...


class Whole:
    """One process evaluates every row."""

    def split(self, rows: list) -> list:
        return rows

    def gather(self, out: list, n: int) -> list:
        return out[:n]


def evaluate(
    model, tokenizer, pair_cfg: PairConfig, problems: list[Problem], sampling: Sampling, batch_size: int, engine=None,
    shard: Shard | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate `sampling.n` responses per problem and grade them; returns (metrics, per-problem records).

    `engine` (e.g. the trainer's vLLM engine, synced with `model`) generates instead of `HFEngine(model)`; under
    `shard` this process generates and grades its share of the problems, and every process gets all the records.
    """
    shard = shard or Whole()
    engine = engine or HFEngine(model, tokenizer, batch_size)
    n_problems, problems = len(problems), shard.split(problems)
    prompts = [render_prompt(tokenizer, p.prompt, pair_cfg) for p in problems]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("eval", total=len(prompts) * sampling.n)
        responses = engine.generate(prompts, sampling, on_batch=lambda done: bar.update(task, completed=done)).tokens
    records = []
    for i, problem in enumerate(problems):
        ids = responses[i * sampling.n : (i + 1) * sampling.n]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        verdicts = [grade(t, problem.answer) for t in texts]
        records.append({
            "id": problem.id, "gold": problem.answer, "meta": problem.meta, "prompt": problem.prompt,
            "responses": texts, "correct": [v.correct for v in verdicts], "preds": [v.pred for v in verdicts],
            "response_lens": [len(r) for r in ids],
        })
    records = shard.gather(records, n_problems)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= sampling.n} | {sampling.n})
    metrics = summarize(records, ks)
    metrics["accuracy"] = metrics[f"avg@{sampling.n}"]
    return metrics, records


@dataclass
class EnvBenchmark:
    """A benchmark run as tool-use episodes in an environment (benchmark.env), scored by the environment."""

    env: Any  # tip_cli.envs.Environment
    tasks: list  # [tip_cli.envs.Task]


def context_length(path: str, pair_cfg: PairConfig) -> int | None:
    """The positions a model (dir or HF id) declares in its config, None when it declares none."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=pair_cfg.trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def counting_tokenizer(model: str, pair_cfg: PairConfig):
    """`model`'s tokenizer for counting prompt tokens in `fit_models` (loaded once per command, shared by its calls)."""
    tokenizer = load_tokenizer(model, pair_cfg)
    tokenizer.model_max_length = 1 << 62  # prompts are only counted: fit_context, not a warning, judges them
    return tokenizer


def fit_models(pair_cfg: PairConfig, context: int | None, problems: list[Problem], models: list[str],
               tokenizer: Callable[[], Any], answer_tokens: int, name: str, skip_bad_rows: bool,
               skip_key: str) -> tuple[list[Problem], int]:
    """`fit_context` for the models that will read these prompts: the smallest of their context lengths (and the
    engine's `context` cap, `engine_context`), the prompt rendered in `pair_cfg`'s template and counted by
    `tokenizer()` (the first model's `counting_tokenizer`, loaded only when a context is known, and once for the
    calls that share it)."""
    contexts = [c for c in (context_length(m, pair_cfg) for m in models) if c]
    if context:
        contexts.append(context)
    if not contexts:
        return problems, 0
    tok = tokenizer()
    return fit_context(problems, lambda p: len(render_prompt(tok, p.prompt, pair_cfg)), min(contexts),
                       answer_tokens, name, skip_bad_rows, skip_key)


def fit_benchmark(spec: EvalSpec, bench: list[Problem] | EnvBenchmark, models: list[str],
                  tokenizer: Callable[[], Any]) -> tuple[list[Problem] | EnvBenchmark, int]:
    """The benchmark's problems that leave `models` room for eval's max_new_tokens (`fit_models`; eval.skip_bad_rows
    skips the others), and how many were left out; environments' tasks are kept as they are."""
    if isinstance(bench, EnvBenchmark):
        return bench, 0
    return fit_models(spec.pair, spec.context, bench, models, tokenizer, spec.sampling.max_new_tokens,
                      spec.benchmark.name, spec.skip_bad_rows, "eval.skip_bad_rows")


def load_benchmark(spec: EvalSpec) -> list[Problem] | EnvBenchmark:
    """The benchmark's problems, or its environment and tasks when benchmark.env names one (first eval.limit)."""
    if spec.benchmark.env is None:
        return load_problems(spec.benchmark, limit=spec.limit, skip_bad_rows=spec.skip_bad_rows)
    from tip_cli.envs import make_env

    env = make_env(spec.benchmark, spec.pair, resolve_model)
    return EnvBenchmark(env, env.tasks()[: spec.limit])


def evaluate_benchmark(model, tokenizer, spec: EvalSpec, bench: list[Problem] | EnvBenchmark, engine=None,
                       shard: Shard | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`evaluate` for problem lists; agent episodes (tip_cli.rollout.agent) for an environment, `accuracy` its
    headline; under `shard` each process runs its share of the problems or tasks."""
    sampling = spec.sampling
    if not isinstance(bench, EnvBenchmark):
        return evaluate(model, tokenizer, spec.pair, bench, sampling, spec.batch_size, engine=engine, shard=shard)
    from tip_cli.rollout import agent

    shard = shard or Whole()
    engine = engine or HFEngine(model, tokenizer, spec.batch_size)
    trajs = agent.rollout(engine, tokenizer, bench.env, shard.split(bench.tasks), sampling, spec.agent, spec.pair,
                          engine.eos_ids)
    trajs = shard.gather(trajs, len(bench.tasks) * sampling.n)  # n episodes per task, task by task
    return agent.summarize(trajs, bench.env), agent.records(trajs, tokenizer)


def results_dir(model_or_run_dir: Path, benchmark: str) -> Path:
    """Where results of one benchmark live: <checkpoint or run dir>/eval/<benchmark>/."""
    return model_or_run_dir / "eval" / benchmark


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


def _log_wandb(logger: LoggerConfig, spec: EvalSpec, out_dir: Path, metrics: dict[str, float], records: list[dict],
               step: int) -> None:
    import wandb

    run = init_wandb(logger, out_dir, job_type="eval", config=spec.settings(), reinit="finish_previous")
    name = spec.benchmark.name
    run.log({f"eval/{name}/{k}": v for k, v in metrics.items()} | {"step": step})
    if spec.benchmark.env:  # agent episodes (tip_cli.rollout.agent.records)
        columns = ["id", "prompt", "transcript", "accuracy"]
        rows = [[r["id"], r["prompt"], r["transcript"], r["metrics"]["accuracy"]] for r in records[:200]]
    else:
        columns = ["id", "prompt", "response", "gold", "pred", "correct"]
        rows = [[r["id"], r["prompt"], r["responses"][0], r["gold"], r["preds"][0], r["correct"][0]] for r in records[:200]]
    run.log({f"eval/{name}/samples": wandb.Table(columns=columns, data=rows)})
    run.finish()


def _eos_token_id(path: str) -> int | list[int] | None:
    """The end-of-sequence id(s) a model dir declares: its generation config's, else its model config's."""
    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        return AutoConfig.from_pretrained(path).eos_token_id


@dataclass(frozen=True)
class EvalJob:
    """What `tip eval` reads of the config, built once by the CLI (tip_cli.cli.eval_job): the evaluation's spec, the
    model or run to evaluate and where results go, and how the model runs (device, engine, seed, logger)."""

    spec: EvalSpec
    checkpoint: str | None  # a run dir, a checkpoint dir, a HF id or toy://student
    out_dir: str | None
    device: str  # auto | cpu | cuda
    engine: str  # rollout.engine: vllm generates in vLLM; any other engine in transformers
    vllm: VLLMConfig
    seed: int
    logger: LoggerConfig


def evaluate_checkpoint(job: EvalJob, ckpt: Checkpoint, out_dir: Path, problems: list[Problem] | EnvBenchmark,
                        skipped: int = 0) -> dict[str, float]:
    """Evaluate one model into out_dir/eval/<benchmark>/results.json, reusing a result with identical settings;
    with eval.skip_bad_rows, the metrics count the `skipped` rows that did not fit the context (`skipped_too_long`)."""
    spec = job.spec
    out_file = results_dir(out_dir, spec.benchmark.name) / "results.json"
    settings = spec.settings()
    if out_file.exists():
        previous = json.loads(out_file.read_text())
        if previous.get("settings") == settings:
            console.print(f"[dim]{out_file} already has these settings; skipping[/]")
            return previous["metrics"]
    device = pick_device(job.device)
    path = resolve_model(str(ckpt.path) if ckpt.step >= 0 else job.checkpoint)
    tokenizer = load_tokenizer(path, spec.pair)
    model, engine = None, None
    if job.engine == "vllm":  # the engine loads the weights itself: no HF copy beside it
        from tip_cli.rollout.vllm import VLLMEngine

        engine = VLLMEngine(path, tokenizer, job.vllm, pick_dtype(spec.pair.dtype, device), job.seed,
                            eos=_eos_token_id(path))
    else:  # the student servers of rollout=vllm_server serve the run's student, not this checkpoint
        model = load_model(path, spec.pair, device, trainable=False)
    metrics, records = evaluate_benchmark(model, tokenizer, spec, problems, engine=engine)
    if spec.skip_bad_rows:
        metrics["skipped_too_long"] = skipped
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({"model": str(ckpt.path), "settings": settings, "metrics": metrics, "records": records}, indent=1))
    if job.logger.name == "wandb":
        _log_wandb(job.logger, spec, out_file.parent, metrics, records, max(ckpt.step, 0))
    del model
    return metrics


def run_eval_command(job: EvalJob) -> dict[str, Any]:
    """`tip eval PATH`: a run dir -> every checkpoint whose manifest verifies, and the curve; anything else -> that
    one model. Results go under out_dir when it is given; else a run's into the run dir, a model's under ./eval/
    (never into a model's own folder)."""
    if not job.checkpoint:
        raise ConfigError("tip eval needs a checkpoint dir, a run dir, or a model id: tip eval PATH")
    target = Path(job.checkpoint).expanduser()
    spec = job.spec
    problems = load_benchmark(spec)
    name = spec.benchmark.name
    ckpts = list_checkpoints(target)
    if not ckpts and (target / MANIFEST).is_file() and (reason := verify(Checkpoint(-1, target))) is not None:
        raise CheckpointError(f"checkpoint {target} is damaged: {reason}; evaluate another checkpoint of its run")
    # a prompt too long for the model fails here, before any model loads, not midway through the evaluation
    model = str(ckpts[0].path) if ckpts else resolve_model(job.checkpoint)
    problems, skipped = fit_benchmark(spec, problems, [model], lambda: counting_tokenizer(model, spec.pair))
    if not ckpts:  # one model: a checkpoint dir, a HF id, or toy://student
        if job.out_dir is None and is_run_checkpoint(target):
            out_dir = target  # a run's checkpoint keeps its results beside it, as `tip eval RUN_DIR` does
        else:
            label = target.name if target.is_dir() else job.checkpoint.replace("://", "_").replace("/", "_")
            out_dir = Path(job.out_dir or "eval") / label
        metrics = evaluate_checkpoint(job, Checkpoint(-1, Path(job.checkpoint)), out_dir, problems, skipped)
        print_metrics(f"{name}: {job.checkpoint}", metrics)
        return metrics
    root = Path(job.out_dir) if job.out_dir else target
    curve = []
    for ckpt in ckpts:
        reason = verify(ckpt)
        if reason is not None:
            console.print(f"[yellow]skipping checkpoint {ckpt.path}: {reason}[/]", soft_wrap=True)
            continue
        out_dir = root / "checkpoints" / ckpt.path.name if job.out_dir else ckpt.path
        metrics = evaluate_checkpoint(job, ckpt, out_dir, problems, skipped)
        curve.append({"step": ckpt.step, **metrics})
        console.print(f"step {ckpt.step}: {name} accuracy {metrics['accuracy']:.3f}")
    if not curve:
        raise CheckpointError(f"{target}: no checkpoint verifies (each is listed above with the reason)")
    curve_file = results_dir(root, name) / "curve.json"
    curve_file.parent.mkdir(parents=True, exist_ok=True)
    curve_file.write_text(json.dumps(curve, indent=1))
    table = Table(title=f"{name} over training: {target}")
    for col in ("step", "accuracy", "no_answer", "response_len"):
        table.add_column(col, justify="right")
    for row in curve:
        table.add_row(str(row["step"]), *(f"{row.get(c, float('nan')):.3f}" for c in ("accuracy", "no_answer", "response_len")))
    console.print(table)
    return {"curve": curve}
