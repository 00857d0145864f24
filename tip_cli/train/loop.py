"""The OPD training loop: rollout -> teacher scoring -> token selection -> selected-token loss -> update -> log.

One step, for a batch of prompts:
  1. the student samples responses (the rollout engine); with data.env, tool-use episodes (tip_cli.rollout.agent) whose
     tool results are masked out, so steps 2-4 see only the student's own tokens (tip_cli.rollout.sources);
  2-4. the teacher scores the same tokens, the selector keeps K of them and the loss is built on those
     (tip_cli.train.step.distill_step);
  5. the optimizer steps unless a value was non-finite, and an engine with its own copy of the student takes the new
     weights; metrics (with each phase's seconds, tracking.STEP_PHASES), token samples, checkpoints and evaluations
     follow.

The loop runs on what the recipe (tip_cli.train.recipe) built once per run: the specs (LoopSpec, StepSpec, EvalSpec)
and the components. It never reads the config.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tip_cli.checkpoint import latest_checkpoint, list_checkpoints
from tip_cli.data import Problem
from tip_cli.errors import UserError
from tip_cli.eval.benchmark import EnvBenchmark, EvalSpec, evaluate_benchmark
from tip_cli.models import Pair
from tip_cli.rollout.batch import Sampling, response_positions
from tip_cli.rollout.sources import EpisodeSource, PromptSource, Rollout
from tip_cli.seeds import derive_seed, stream_seed
from tip_cli.tracking import STEP_PHASES, PeakMemory, read_jsonl, save_token_sample, timed
from tip_cli.train import checkpoints, parallel, sharding, signals
from tip_cli.train.pipeline import RolloutPipeline
from tip_cli.train.schedule import prompt_indices
from tip_cli.train.spec import LoopSpec, StepSpec
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


@dataclass
class Run:
    """Everything a training run holds: the specs of its loop, its step (its precision included) and its evaluation
    (built once, by tip_cli.train.recipe), the pair, the teacher's scorer, the rollout engine and source, the optimizer
    and schedule, the logger, and the step it starts after."""

    loop: LoopSpec
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


def step_generator(run: Run, step: int) -> torch.Generator:
    """Seed the step: every random draw derives from (seed, step) (and the rank), so a resumed run replays exactly."""
    torch.manual_seed(parallel.rank_seed(stream_seed(run.loop.seed, step)))
    return torch.Generator().manual_seed(stream_seed(run.loop.seed, step))


def step_prompts(run: Run, step: int) -> tuple[list[int], Sampling]:
    """This step's prompts (this rank's slice) and its sampling, seeded from (seed, step, rank)."""
    loop = run.loop
    idx = parallel.my_slice(prompt_indices(len(run.source), loop.prompts_per_step, step, loop.seed))
    return idx, replace(loop.sampling, seed=derive_seed(loop.seed, step, parallel.rank()))


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
                           lambda: getattr(run.engine, "version", 0), run.loop.max_staleness, run.loop.steps)


def update(run: Run, stats, m: dict) -> torch.Tensor:
    """Clip, and step the optimizer unless H, D, the loss or the gradient is non-finite on any rank (AdamW would
    spread the NaN) or no token was kept; step the schedule either way. Returns the gradient norm."""
    student = run.pair.student
    with timed("time/train", m):
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), run.loop.grad_clip or math.inf)
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
                     run.loop.keep_checkpoints, run.step.precision.pair)


def stop_after(run: Run, step: int) -> None:
    """SIGTERM came during `step`: save it (unless after_step just did) and stop (signals.Interrupted)."""
    committed = list_checkpoints(run.run_dir)  # not verified: hashing a large checkpoint would eat the grace period
    if not committed or committed[-1].step != step:
        save(run, step)
    raise signals.Interrupted("SIGTERM")


def warn_topk_mass(run: Run, step: int, m: dict) -> None:
    """One line, once a run, when the teacher's top-K holds less mass than importance.topk_mass_warn: D or the loss
    then compares distributions with much of the teacher's probability in one tail bucket or cut away."""
    floor, mass = run.loop.topk_mass_warn, m.get("teacher/topk_mass")
    if run.topk_mass_warned or mass is None or not mass < floor or not parallel.is_main():
        return
    run.topk_mass_warned = True
    top_k = run.loop.topk
    console.print(f"[yellow]step {step}: the teacher's top-K holds {mass:.3f} of its probability on average "
                  f"(teacher/topk_mass < importance.topk_mass_warn={floor:g}); consider a larger "
                  f"{top_k[0]} (now {top_k[1]})[/]")


def after_step(run: Run, step: int, m: dict, stats, kept: torch.Tensor) -> str:
    """Stop on too many skipped steps, save a token sample and checkpoints, evaluate when due; returns the progress
    line."""
    t = run.loop
    warn_topk_mass(run, step, m)
    if run.skipped:
        console.print(f"[yellow]step {step}: non-finite H, D, loss or gradient; no update[/] "
                      f"({run.skipped} in a row; {t.max_skipped_steps} stop the run)")
        if run.skipped >= t.max_skipped_steps:
            raise NonFiniteStepsError(non_finite_message(step, run.skipped, latest_checkpoint(run.run_dir)))
    elif not parallel.all_true(weights_finite(run.pair.student)):  # before it is saved: a checkpoint to fall back on
        last = latest_checkpoint(run.run_dir)
        raise NonFiniteStepsError(f"step {step}: the update made the student's weights non-finite (NaN or inf) at "
                                  f"optim.lr={run.loop.lr:g}; nothing of it was saved; last good "
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
    name = run.evals.benchmark.name
    final = run.evaluate(run.loop.steps)
    run.logger.finish()
    key = f"eval/{name}/accuracy"
    before = [r[key] for r in read_jsonl(run.run_dir / "metrics.jsonl") if r["step"] == 0 and key in r]
    if before:
        console.print(f"[bold]student {name} accuracy: {before[0]:.3f} before -> {final['accuracy']:.3f} after[/]")
    console.print(f"run dir: {run.run_dir}", soft_wrap=True)
    parallel.teardown()
    return final


PROGRESS = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))


def run_loop(run: Run, too_long: dict[str, int]) -> dict:
    """The steps of a run prepared by tip_cli.train.recipe (from a checkpoint or the start), in a run dir it holds:
    each is rollout -> teacher -> select -> loss (distill_step) -> update -> log. `too_long` (rows skipped for the
    context) is logged at the step the run starts from; returns the final evaluation metrics."""
    loop = run.loop
    if too_long:
        run.logger.log(too_long, run.start)
    if run.start == 0 and loop.eval_before:
        run.evaluate(0)
    pipe = rollout_pipeline(run)
    with Progress(*PROGRESS, console=console) as bar, signals.sigterm_grace(loop.sigterm_grace_s) as stop:
        task = bar.add_task("train", total=loop.steps, completed=run.start, info="")
        try:
            for step in range(run.start + 1, loop.steps + 1):
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
