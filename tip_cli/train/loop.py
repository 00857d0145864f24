"""The OPD training loop: rollout -> teacher scoring -> token selection -> selected-token loss -> update -> log.

One step, for a batch of prompts:
  1. the student samples responses (the rollout engine); with data.env, tool-use episodes (tip_cli.rollout.agent) whose
     tool results are masked out, so steps 2-4 see only the student's own tokens (tip_cli.rollout.sources);
  2-4. the teacher scores the same tokens, the selector keeps K of them and the loss is built on those
     (tip_cli.train.step.distill_step);
  5. the optimizer steps unless a value was non-finite, and an engine with its own copy of the student takes the new
     weights; metrics (with each phase's seconds, tracking.STEP_PHASES), token samples, checkpoints and evaluations
     follow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tip_cli.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints
from tip_cli.config.compose import to_container
from tip_cli.config.schema import TipConfig
from tip_cli.data import Problem, load_problems
from tip_cli.errors import UserError
from tip_cli.eval.benchmark import (
    EnvBenchmark,
    EvalSpec,
    counting_tokenizer,
    engine_context,
    eval_spec,
    evaluate_benchmark,
    fit_benchmark,
    fit_models,
    load_benchmark,
)
from tip_cli.eval.benchmark import console as eval_console
from tip_cli.models import Pair, enable_checkpointing
from tip_cli.pairs import load_pair, resolve_model
from tip_cli.rollout import make_engine
from tip_cli.rollout.batch import Sampling, response_positions
from tip_cli.rollout.sources import EpisodeSource, PromptSource, Rollout, rollout_source
from tip_cli.seeds import derive_seed, stream_seed
from tip_cli.selection.selectors import needs_support
from tip_cli.teacher.factory import make_scorer
from tip_cli.tracking import STEP_PHASES, MetricsLogger, PeakMemory, read_jsonl, save_token_sample, timed
from tip_cli.train import checkpoints, parallel, precision, rundir, sharding, signals
from tip_cli.train.pipeline import RolloutPipeline
from tip_cli.train.schedule import apply_schedule, lr_lambda, make_optimizer, prompt_indices
from tip_cli.train.spec import SelectionSpec, StepSpec
from tip_cli.train.step import distill_step, weights_finite

console = Console()


class NonFiniteStepsError(UserError, ValueError):
    """train.max_skipped_steps steps in a row had a non-finite H, D, loss or gradient, or an update made the
    weights non-finite (the CLI prints it in a line)."""


def non_finite_message(step: int, skipped: int, last) -> str:
    where = last.path if last else "none (no checkpoint was written before)"
    return (f"step {step}: {skipped} steps in a row had a non-finite entropy, divergence, loss or gradient, so none "
            f"of them updated the student (train.max_skipped_steps); last good checkpoint: {where}. Try a lower "
            "optim.lr or train.precision=bf16_mixed / fp32, and check the models' logits for inf")


def train(cfg: TipConfig, run_dir: Path) -> dict:
    """Run (or resume) OPD into run_dir; returns the final evaluation metrics.

    Under torchrun every rank runs this (tip_cli.train.parallel): each on its slice of the prompts, rank 0 alone logging.
    """
    device = parallel.setup(cfg.train.device)  # joins the torchrun job when launched by one
    parallel.check(cfg.train, cfg.parallel)
    run_dir = parallel.broadcast(run_dir)  # rank 0's: each rank's Hydra may have stamped its own
    console.quiet = eval_console.quiet = not parallel.is_main()
    # the data and the benchmark are read first, so that a bad file fails in seconds and leaves no run dir behind
    problems, too_long = None, {}  # rows left out for not fitting the context, logged when skipping is on
    models = [resolve_model(cfg.pair.student), resolve_model(cfg.pair.teacher)]
    tokenizer = functools.cache(lambda: counting_tokenizer(models[0], cfg.pair))  # one load for data and benchmark
    if not cfg.data.env:
        skip = cfg.train.skip_bad_rows
        problems = load_problems(cfg.data, skip_bad_rows=skip, skip_key="train.skip_bad_rows")
        problems, n = fit_models(cfg.pair, engine_context(cfg.rollout), problems, models, tokenizer,
                                 cfg.rollout.max_new_tokens, cfg.data.name, skip, "train.skip_bad_rows")
        too_long |= {"data/skipped_too_long": n} if skip else {}
    evals = eval_spec(cfg.benchmark, cfg.eval, cfg.pair, cfg.agent, cfg.rollout)
    bench, n = fit_benchmark(evals, load_benchmark(evals), models[:1], tokenizer)
    too_long |= {f"eval/{cfg.benchmark.name}/skipped_too_long": n} if evals.skip_bad_rows else {}
    spec = step_spec(cfg, device)
    # the run dir's contract (tip_cli.train.rundir): one writer, the recorded config, the newest verified checkpoint
    plan = rundir.open_run(cfg, run_dir, console)
    if plan.complete is not None:
        console.print(f"{run_dir} is complete (step {cfg.train.steps} of {cfg.train.steps}, final eval logged): "
                      "nothing to do; raise train.steps to continue it, or give a new out_dir")
        parallel.teardown()
        return plan.complete
    try:
        return _train(prepare(cfg, spec, evals, run_dir, device, plan.checkpoint, problems, bench), too_long)
    finally:
        plan.release()


def step_spec(cfg: TipConfig, device: torch.device) -> StepSpec:
    """The run's frozen step spec on `device`, built once; T is the config's distill_temperature (a vLLM top-K
    teacher at any T but 1 is refused when the config is composed)."""
    temp = cfg.distill_temperature
    t, loss = cfg.train, cfg.loss
    selection = SelectionSpec(cfg.importance.axis_spec(), cfg.selector.spec(), cfg.budget, cfg.parallel.rank_scope,
                              loss.norm)
    return StepSpec(
        temp, precision.resolve(t.precision, cfg.pair.dtype, device), selection, cfg.importance.score_spec(),
        loss.kind, loss.jsd_beta, t.micro_batch_size, cfg.importance.chunk_size, loss.chunk_size, loss.backend,
        t.signal_metrics, t.grad_probe_every,
        cfg.importance.support_k if needs_support(selection.selector) else None,
    )


@dataclass
class Run:
    """Everything a training run holds: the specs of its step (its precision included) and its evaluation (built
    once, from `cfg`), the pair, the teacher's scorer, the rollout engine and source, the optimizer and schedule, the
    logger, and the step it starts after."""

    cfg: TipConfig
    step: StepSpec
    evals: EvalSpec
    run_dir: Path
    device: torch.device
    pair: Pair
    scorer: object
    engine: object
    source: PromptSource | EpisodeSource
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    logger: object
    bench: list[Problem] | EnvBenchmark
    memory: PeakMemory  # perf/peak_mem_gb, net of the rollout engine
    start: int = 0
    skipped: int = 0  # consecutive steps without an update (non-finite H, D, loss or gradient)
    skipped_total: int = 0
    topk_mass_warned: bool = False  # the low teacher/topk_mass line is printed once a run

    def evaluate(self, step: int) -> dict:
        """Evaluate the student on the benchmark; each rank its share of the rows, rank 0 logs the metrics."""
        name, student = self.evals.benchmark.name, self.pair.student
        with sharding.gathered(student, self.engine), self.step.precision.autocast(self.device, student):
            result, _ = evaluate_benchmark(student, self.pair.tokenizer, self.evals, self.bench, engine=self.engine,
                                           shard=parallel.eval_shard())
        self.logger.log({f"eval/{name}/{k}": v for k, v in result.items()}, step)
        console.print(f"[bold]eval[/] step {step}: {name} accuracy {result['accuracy']:.3f}")
        return result


def prepare(cfg: TipConfig, spec: StepSpec, evals: EvalSpec, run_dir: Path, device: torch.device,
            ckpt: Checkpoint | None, problems: list[Problem] | None, bench: list[Problem] | EnvBenchmark) -> Run:
    """Load the pair (the student from `ckpt` if given) in `spec`'s precision, shard it under torchrun, and build the
    scorer, the engine, the rollout source, the optimizer and schedule (restored from `ckpt`) and the logger."""
    prec = spec.precision
    precision.warn_pure_bf16(prec, cfg.optim.lr)
    pair = load_pair(cfg.pair, device, student_path=str(ckpt.path) if ckpt else None,
                     load_teacher=cfg.teacher.backend == "hf", student_dtype=prec.master, teacher_dtype=prec.pair)
    student = pair.student
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(student)
    sharding.shard(pair, cfg.parallel, prec)  # FSDP2 under torchrun, before the optimizer sees the parameters
    scorer = make_scorer(cfg.teacher, cfg.seed, pair, prec.pair, run_dir)
    memory = PeakMemory(device)
    with memory.engine_build():
        engine = make_engine(cfg.rollout, student, pair.tokenizer, pair.student_path, cfg.seed, dtype=prec.compute,
                             vocab=pair.vocab, run_dir=run_dir, version=ckpt.step if ckpt else 0)
    source = rollout_source(cfg.data, cfg.pair, cfg.agent, pair, problems, resolve_model)
    if isinstance(source, PromptSource) and hasattr(engine, "check_prompts"):  # a served context of its own
        engine.check_prompts(list(map(len, source.prompts)), cfg.rollout.max_new_tokens)
    optimizer = make_optimizer(student.parameters(), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
    start = 0
    if ckpt:
        start = checkpoints.resume(ckpt, student, optimizer, scheduler)
        apply_schedule(optimizer, scheduler, cfg.optim, cfg.train.steps)
        console.print(f"[bold]resuming[/] from {ckpt.path} (step {start})", soft_wrap=True)
    logger = parallel.NullLogger()
    if parallel.is_main():
        logger = MetricsLogger(run_dir, cfg.logger, to_container(cfg), start, run_dir.name)
    return Run(cfg, spec, evals, run_dir, device, pair, scorer, engine, source, optimizer, scheduler, logger, bench, memory,
               start)


def step_generator(run: Run, step: int) -> torch.Generator:
    """Seed the step: every random draw derives from (seed, step) (and the rank), so a resumed run replays exactly."""
    torch.manual_seed(parallel.rank_seed(stream_seed(run.cfg.seed, step)))
    return torch.Generator().manual_seed(stream_seed(run.cfg.seed, step))


def step_prompts(run: Run, step: int) -> tuple[list[int], Sampling]:
    """This step's prompts (this rank's slice) and its sampling, seeded from (seed, step, rank)."""
    cfg, r = run.cfg, run.cfg.rollout
    idx = parallel.my_slice(prompt_indices(len(run.source), cfg.train.prompts_per_step, step, cfg.seed))
    return idx, Sampling(r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens, r.top_k,
                         seed=derive_seed(cfg.seed, step, parallel.rank()))


def generate(run: Run, step: int):
    """The student's rollouts for this step's prompts, as the source generates them (any thread: a pipeline with
    max_staleness=1 runs it in the background)."""
    idx, sampling = step_prompts(run, step)
    student = run.pair.student
    with sharding.gathered(student, run.engine), run.step.precision.autocast(run.device, student):
        out = run.source.generate(run.engine, idx, sampling)
        run.engine.sleep()
    return out


def pack(run: Run, step: int, out) -> Rollout:
    """A step's generated rollouts packed into a training batch on the run's device."""
    idx, sampling = step_prompts(run, step)
    run.memory.start()
    return run.source.pack(out, idx, sampling, run.device)


def rollout_pipeline(run: Run) -> RolloutPipeline:
    """The run's rollouts in time (tip_cli.train.pipeline): at each step, or one step ahead with max_staleness=1;
    with a teacher server, each prompt's responses are sent for scoring as soon as they are generated."""
    if hasattr(run.scorer, "prefetch") and hasattr(run.engine, "on_done") and isinstance(run.source, PromptSource):
        def score_ahead(_: int, prompt: list[int], responses: list[list[int]]) -> None:
            for row in filter(None, responses):
                run.scorer.prefetch(prompt + row, list(response_positions(prompt, row)))

        run.engine.on_done = score_ahead
    return RolloutPipeline(functools.partial(generate, run), functools.partial(pack, run),
                           lambda: getattr(run.engine, "version", 0), run.cfg.rollout.max_staleness, run.cfg.train.steps)


def update(run: Run, stats, m: dict) -> torch.Tensor:
    """Clip, and step the optimizer unless H, D, the loss or the gradient is non-finite on any rank (AdamW would
    spread the NaN) or no token was kept; step the schedule either way. Returns the gradient norm."""
    student, cfg = run.pair.student, run.cfg
    with timed("time/train", m):
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip or math.inf)
        good = parallel.all_true(stats is not None and math.isfinite(m["loss"]) and math.isfinite(float(grad_norm)))
        run.skipped = 0 if good else run.skipped + 1
        run.skipped_total += 0 if good else 1
        m["train/skipped_steps"] = float(run.skipped_total)
        if good and m["tokens/kept"] > 0:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        m["optim/lr"] = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
    return grad_norm


def sync_weights(run: Run, pipe: RolloutPipeline, m: dict) -> None:
    """Push the updated student into an engine that decodes with its own copy (time/weight_sync), once the
    generation in flight has ended; one that decodes with the training module has nothing to push (step_metrics
    logs 0.0)."""
    if run.engine.own_weights:
        pipe.settle(m)
        with timed("time/weight_sync", m):
            run.engine.sync_weights(run.pair.student)


def step_metrics(run: Run, out: Rollout, m: dict, grad_norm: torch.Tensor) -> dict[str, float]:
    """The step's logged metrics: rollout, optimizer, throughput and every phase's time (STEP_PHASES, 0.0 for one
    the step did not run), merged over the ranks."""
    # a phase the step did not run is 0.0: time/wait, for one, unless its rollouts were generated in the background
    m |= {name: m.get(name, 0.0) for name in STEP_PHASES}
    rollout_m, generated = out.metrics()
    m.update(rollout_m)
    m["optim/grad_norm"] = float(grad_norm)
    m["perf/tokens_per_s"] = m["tokens/total"] / m["time/step"]
    m["perf/rollout_tokens_per_s"] = generated / max(m["time/rollout"], 1e-9)
    m["perf/peak_mem_gb"] = run.memory.gb()
    return parallel.merge_metrics(m)


def save(run: Run, step: int) -> None:
    p = run.pair
    checkpoints.save(run.run_dir, step, p.student, p.tokenizer, run.optimizer, run.scheduler,
                     run.cfg.train.keep_checkpoints, run.step.precision.pair)


def stop_after(run: Run, step: int) -> None:
    """SIGTERM came during `step`: save it (unless after_step just did) and stop (signals.Interrupted)."""
    committed = list_checkpoints(run.run_dir)  # not verified: hashing a large checkpoint would eat the grace period
    if not committed or committed[-1].step != step:
        save(run, step)
    raise signals.Interrupted("SIGTERM")


def warn_topk_mass(run: Run, step: int, m: dict) -> None:
    """One line, once a run, when the teacher's top-K holds less mass than importance.topk_mass_warn: D or the loss
    then compares distributions with much of the teacher's probability in one tail bucket or cut away."""
    floor, mass = run.cfg.importance.topk_mass_warn, m.get("teacher/topk_mass")
    if run.topk_mass_warned or mass is None or not mass < floor or not parallel.is_main():
        return
    run.topk_mass_warned = True
    top_k = ("teacher.topk", run.cfg.teacher.topk) if run.cfg.teacher.backend != "hf" else ("importance.topk",
                                                                                          run.cfg.importance.topk)
    console.print(f"[yellow]step {step}: the teacher's top-K holds {mass:.3f} of its probability on average "
                  f"(teacher/topk_mass < importance.topk_mass_warn={floor:g}); consider a larger "
                  f"{top_k[0]} (now {top_k[1]})[/]")


def after_step(run: Run, step: int, m: dict, stats, kept: torch.Tensor) -> str:
    """Stop on too many skipped steps, save a token sample and checkpoints, evaluate when due; returns the progress
    line."""
    t = run.cfg.train
    warn_topk_mass(run, step, m)
    if run.skipped:
        console.print(f"[yellow]step {step}: non-finite H, D, loss or gradient; no update[/] "
                      f"({run.skipped} in a row; {t.max_skipped_steps} stop the run)")
        if run.skipped >= t.max_skipped_steps:
            raise NonFiniteStepsError(non_finite_message(step, run.skipped, latest_checkpoint(run.run_dir)))
    elif not parallel.all_true(weights_finite(run.pair.student)):  # before it is saved: a checkpoint to fall back on
        last = latest_checkpoint(run.run_dir)
        raise NonFiniteStepsError(f"step {step}: the update made the student's weights non-finite (NaN or inf) at "
                                  f"optim.lr={run.cfg.optim.lr:g}; nothing of it was saved; last good "
                                  f"checkpoint: {last.path if last else 'none'}. Try a lower optim.lr")
    elif parallel.is_main() and t.token_sample_every and (step == 1 or step % t.token_sample_every == 0):
        save_token_sample(run.run_dir, step, stats, kept, t.token_sample_size)
    info = f"loss {m['loss']:.4f}  kept {m['tokens/kept_frac']:.2f}  Q3 {m.get('tokens/q3_frac', 0.0):.2f}  {m['perf/tokens_per_s']:.0f} tok/s"
    if not console.is_terminal:
        console.print(f"step {step}/{t.steps}  {info}")
    if step == t.steps or (t.save_every and step % t.save_every == 0):
        save(run, step)
    if t.eval_every and step % t.eval_every == 0 and step != t.steps:
        run.evaluate(step)
    return info


def finish(run: Run) -> dict:
    """The final evaluation, and the accuracy before and after on the console."""
    cfg = run.cfg
    final = run.evaluate(cfg.train.steps)
    run.logger.finish()
    key = f"eval/{cfg.benchmark.name}/accuracy"
    before = [r[key] for r in read_jsonl(run.run_dir / "metrics.jsonl") if r["step"] == 0 and key in r]
    if before:
        console.print(f"[bold]student {cfg.benchmark.name} accuracy: {before[0]:.3f} before -> {final['accuracy']:.3f} after[/]")
    console.print(f"run dir: {run.run_dir}", soft_wrap=True)
    parallel.teardown()
    return final


PROGRESS = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))


def _train(run: Run, too_long: dict[str, int]) -> dict:
    """`train` in a run dir it holds, prepared (from a checkpoint or the start): each step is rollout -> teacher ->
    select -> loss (distill_step) -> update -> log. `too_long` (rows skipped for the context) is logged at the step
    the run starts from."""
    cfg = run.cfg
    if too_long:
        run.logger.log(too_long, run.start)
    if run.start == 0 and cfg.train.eval_before:
        run.evaluate(0)
    pipe = rollout_pipeline(run)
    with Progress(*PROGRESS, console=console) as bar, signals.sigterm_grace(cfg.train.sigterm_grace_s) as stop:
        task = bar.add_task("train", total=cfg.train.steps, completed=run.start, info="")
        try:
            for step in range(run.start + 1, cfg.train.steps + 1):
                generator = step_generator(run, step)
                m: dict[str, float] = {}
                with timed("time/step", m):
                    out, _ = pipe.take(step, m)
                    metrics, stats, kept = distill_step(run.pair, out.batch, run.step, generator, m, run.scorer, step)
                    m.update(metrics)
                    grad_norm = update(run, stats, m)
                    sync_weights(run, pipe, m)
                m = step_metrics(run, out, m, grad_norm)
                run.logger.log(m, step)
                bar.update(task, completed=step, info=after_step(run, step, m, stats, kept))
                if not parallel.all_true(not stop.requested):  # every rank saves, or none
                    stop_after(run, step)
        finally:
            pipe.close()
    return finish(run)
