"""The recipe entry: the one place below the CLI that reads the whole config.

`train(cfg, run_dir)` reads the data and the benchmark, opens the run dir, builds the run's frozen specs once
(`specs`: StepSpec for distill_step, LoopSpec for the step loop; EvalSpec for evaluation) and its components
(`prepare`: the pair, the teacher's scorer, the rollout engine and source, the optimizer, the logger), each from its
own config group, and hands them to the step loop (tip_cli.train.loop.run_loop), which never sees the config.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tip_cli.checkpoint import Checkpoint
from tip_cli.config.compose import to_container
from tip_cli.config.schema import TipConfig
from tip_cli.data import Problem, load_problems
from tip_cli.eval.benchmark import (
    EnvBenchmark,
    EvalSpec,
    counting_tokenizer,
    engine_context,
    eval_spec,
    fit_benchmark,
    fit_models,
    load_benchmark,
)
from tip_cli.eval.benchmark import console as eval_console
from tip_cli.models import enable_checkpointing
from tip_cli.pairs import load_pair, resolve_model
from tip_cli.rollout import make_engine
from tip_cli.rollout.batch import Sampling
from tip_cli.rollout.sources import PromptSource, rollout_source
from tip_cli.selection.selectors import needs_support
from tip_cli.teacher.factory import make_scorer
from tip_cli.tracking import MetricsLogger, PeakMemory
from tip_cli.train import checkpoints, parallel, precision, rundir, sharding
from tip_cli.train.loop import Run, console, run_loop
from tip_cli.train.schedule import apply_schedule, lr_lambda, make_optimizer
from tip_cli.train.spec import LoopSpec, RunSpec, SelectionSpec, StepSpec


def train(cfg: TipConfig, run_dir: Path) -> dict:
    """Run (or resume) OPD into run_dir; returns the final evaluation metrics.

    Under torchrun every rank runs this (tip_cli.train.parallel): each on its slice of the prompts, rank 0 alone
    logging.
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
    spec = specs(cfg, device)
    # the run dir's contract (tip_cli.train.rundir): one writer, the recorded config, the newest verified checkpoint
    plan = rundir.open_run(cfg, run_dir, console)
    if plan.complete is not None:
        console.print(f"{run_dir} is complete (step {cfg.train.steps} of {cfg.train.steps}, final eval logged): "
                      "nothing to do; raise train.steps to continue it, or give a new out_dir")
        parallel.teardown()
        return plan.complete
    try:
        return run_loop(prepare(cfg, spec, evals, run_dir, device, plan.checkpoint, problems, bench), too_long)
    finally:
        plan.release()


def specs(cfg: TipConfig, device: torch.device) -> RunSpec:
    """The run's frozen specs on `device`, built once: the step's (T is the config's distill_temperature; a vLLM
    top-K teacher at any T but 1 is refused when the config is composed) and the loop's."""
    t, loss, imp, r = cfg.train, cfg.loss, cfg.importance, cfg.rollout
    selection = SelectionSpec(imp.axis_spec(), cfg.selector.spec(), cfg.budget, cfg.parallel.rank_scope, loss.norm)
    step = StepSpec(
        cfg.distill_temperature, precision.resolve(t.precision, cfg.pair.dtype, device), selection, imp.score_spec(),
        loss.kind, loss.jsd_beta, t.micro_batch_size, imp.chunk_size, loss.chunk_size, loss.backend,
        t.signal_metrics, t.grad_probe_every, imp.support_k if needs_support(selection.selector) else None,
    )
    topk = ("importance.topk", imp.topk) if cfg.teacher.backend == "hf" else ("teacher.topk", cfg.teacher.topk)
    loop = LoopSpec(
        seed=cfg.seed, steps=t.steps, prompts_per_step=t.prompts_per_step,
        sampling=Sampling(r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens, r.top_k),
        max_staleness=r.max_staleness, grad_clip=cfg.optim.grad_clip, lr=cfg.optim.lr, save_every=t.save_every,
        keep_checkpoints=t.keep_checkpoints, eval_every=t.eval_every, eval_before=t.eval_before,
        token_sample_every=t.token_sample_every, token_sample_size=t.token_sample_size,
        max_skipped_steps=t.max_skipped_steps, sigterm_grace_s=t.sigterm_grace_s,
        topk_mass_warn=imp.topk_mass_warn, topk=topk,
    )
    return RunSpec(step, loop)


def prepare(cfg: TipConfig, spec: RunSpec, evals: EvalSpec, run_dir: Path, device: torch.device,
            ckpt: Checkpoint | None, problems: list[Problem] | None, bench: list[Problem] | EnvBenchmark) -> Run:
    """Load the pair (the student from `ckpt` if given) in `spec`'s precision, shard it under torchrun, and build the
    scorer, the engine, the rollout source, the optimizer and schedule (restored from `ckpt`) and the logger."""
    prec, t, r = spec.step.precision, cfg.train, cfg.rollout
    precision.warn_pure_bf16(prec, cfg.optim.lr)
    pair = load_pair(cfg.pair, device, student_path=str(ckpt.path) if ckpt else None,
                     load_teacher=cfg.teacher.backend == "hf", student_dtype=prec.master, teacher_dtype=prec.pair)
    if t.gradient_checkpointing:
        enable_checkpointing(pair.student)
    sharding.shard(pair, cfg.parallel, prec)  # FSDP2 under torchrun, before the optimizer sees the parameters
    scorer = make_scorer(cfg.teacher, cfg.seed, pair, prec.pair, run_dir)
    memory = PeakMemory(device)
    with memory.engine_build():
        engine = make_engine(r, pair.student, pair.tokenizer, pair.student_path, cfg.seed, dtype=prec.compute,
                             vocab=pair.vocab, run_dir=run_dir, version=ckpt.step if ckpt else 0)
    source = rollout_source(cfg.data, cfg.pair, cfg.agent, pair, problems, resolve_model)
    if isinstance(source, PromptSource) and hasattr(engine, "check_prompts"):  # a served context of its own
        engine.check_prompts(list(map(len, source.prompts)), r.max_new_tokens)
    optimizer = make_optimizer(pair.student.parameters(), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, t.steps))
    start = 0
    if ckpt:
        start = checkpoints.resume(ckpt, pair.student, optimizer, scheduler)
        apply_schedule(optimizer, scheduler, cfg.optim, t.steps)
        console.print(f"[bold]resuming[/] from {ckpt.path} (step {start})", soft_wrap=True)
    logger = parallel.NullLogger()
    if parallel.is_main():
        logger = MetricsLogger(run_dir, cfg.logger, to_container(cfg), start, run_dir.name)
    return Run(spec.loop, spec.step, evals, run_dir, device, pair, scorer, engine, source, optimizer, scheduler,
               logger, bench, memory, start)
