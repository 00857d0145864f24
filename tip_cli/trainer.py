"""The OPD training loop: rollout -> teacher scoring -> token selection -> selected-token loss -> step.

One step, for a batch of prompts:
  1. the student samples responses (the rollout engine); with data.env, tool-use episodes (tip_cli.rollout.agent) whose
     tool results are masked out, so steps 2-4 see only the student's own tokens;
  2. the teacher runs on the same tokens; we keep its final hidden states at the N response positions [N, d_T]
     (its [N, V] log-probs are recomputed chunk by chunk where needed, never stored), or, with
     teacher.backend=vllm_topk (or vllm_server), its top-K log-probs [N, K] from a vLLM engine (or server);
  3. the student's entropy H and the teacher-student divergence D are computed for all N positions without grad,
     and the selector keeps K of them;
  4. the loss (SPEC section 1) is built only for the K kept positions (tip_cli.losses) and back-propagated.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tip_cli import distributed, precision, rundir
from tip_cli.checkpoint import Checkpoint, latest_checkpoint, storage_errors
from tip_cli.chunks import chunk_rows
from tip_cli.config import ConfigError, TipConfig
from tip_cli.data import Problem, load_problems
from tip_cli.evaluation import EnvBenchmark, evaluate_benchmark, load_benchmark
from tip_cli.evaluation import console as eval_console
from tip_cli.grading import grade
from tip_cli.losses import (
    DenseTeacher,
    LossSpec,
    StatsSink,
    Teacher,
    TopKTeacher,
    scored_logprobs,
    selected_token_loss,
)
from tip_cli.models import (
    Pair,
    enable_checkpointing,
    final_hidden,
    head_weight,
    render_prompt,
)
from tip_cli.pairs import load_pair, resolve_model
from tip_cli.rollout import make_engine
from tip_cli.rollout.batch import Batch, Sampling, eos_ids, pack
from tip_cli.selection import selectors
from tip_cli.selection.quadrants import TokenStats
from tip_cli.selection.scores import token_stats_chunk
from tip_cli.tracking import MetricsLogger, peak_memory_gb, read_jsonl, timed

console = Console()


def prompt_indices(num_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompts of a step: consecutive slices of a per-epoch shuffle, so a resumed run sees the same prompts."""
    perms: dict[int, list[int]] = {}  # one shuffle per epoch the step touches (usually one)
    out = []
    for pos in range((step - 1) * per_step, step * per_step):
        epoch, offset = divmod(pos, num_prompts)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_prompts, generator=gen).tolist()
        out.append(perms[epoch][offset])
    return out


def lr_lambda(cfg: TipConfig):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        if t.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if t.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TipConfig) -> None:
    """After restoring a checkpoint's optimizer and scheduler, put this config's lr, weight decay and schedule in
    force at the restored step: lr = train.lr * lr_lambda(step). With the config that wrote the checkpoint this
    is the value restored; after `train.resume=override` it is the new one."""
    scheduler.base_lrs = [cfg.train.lr] * len(optimizer.param_groups)
    factor = lr_lambda(cfg)
    scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = cfg.train.lr, cfg.train.weight_decay
        group["lr"] = cfg.train.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def valid_hidden(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Final hidden states at the response positions, row-major over [B, T], divided by `temperature`: [N, d].

    (h / T) W^T = logits / T, so every log-prob built from them (H, D, the loss) is that of softmax(logits / T).
    """
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)[batch.target_mask]
    return hidden if temperature == 1.0 else hidden / temperature


def student_hidden(pair: Pair, batch: Batch, temperature: float, prec: precision.Precision) -> torch.Tensor:
    """`valid_hidden` of the student in the compute dtype: its forward under bf16 autocast when bf16_mixed (fp32
    master weights); the lm_head matmuls of scoring and the loss then follow the hidden states' dtype."""
    with prec.autocast(pair.device, pair.student):
        return valid_hidden(pair.student, batch, temperature).to(prec.compute)


def distill_temperature(cfg: TipConfig) -> float:
    """The T of softmax(logits / T) that H, D and the loss compare, for both models: loss.temperature when set, else
    the distribution the rollouts were sampled from (rollout.temperature; 1 for greedy rollouts), as TRL's
    distillation losses do."""
    if cfg.loss.temperature is not None:
        return cfg.loss.temperature
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def _finite(*xs: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def skipped_step(n_tokens: int) -> tuple[dict, None, torch.Tensor]:
    """distill_step's result when H or D is not finite: no loss, no selection (a selector must never rank NaN)."""
    n = float(distributed.global_count(n_tokens))
    return {"loss": math.nan, "tokens/total": n, "tokens/kept": 0.0, "tokens/kept_frac": 0.0}, None, torch.zeros(0)


def micro_slices(batch: Batch, micro: int) -> list[tuple[Batch, int, int]]:
    """Split rows into micro-batches; each comes with the range [lo, hi) of its tokens in the flat [N] order."""
    counts = batch.target_mask.sum(1).tolist()
    out, lo = [], 0
    for start in range(0, batch.input_ids.shape[0], micro):
        hi = lo + sum(counts[start : start + micro])
        out.append((batch.rows(start, start + micro), lo, hi))
        lo = hi
    return out


@torch.no_grad()
def score(
    h_s: torch.Tensor, teacher: Teacher, pair: Pair, cfg: TipConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Teacher]:
    """Student entropy H [N] and divergence D [N] from the hidden states, chunk by chunk over [chunk, V].

    Also returns each row's student log-partition [N] and the teacher carrying its own (a dense teacher), so that
    the loss on the kept rows need not compute them again.
    """
    w_s = head_weight(pair.student).to(h_s.dtype)  # the compute dtype
    chunk = chunk_rows(cfg.importance.chunk_size, pair.vocab, h_s.device)
    ent, div, z_s, z_t = [], [], [], []
    for i in range(0, h_s.shape[0], chunk):
        rows = slice(i, i + chunk)
        logp_s, log_z = scored_logprobs(h_s[rows], w_s, pair.vocab)
        z_s.append(log_z)
        if isinstance(teacher, DenseTeacher):
            logp_t, log_z_t = teacher.scored_target(rows)
            z_t.append(log_z_t)
            h, d = token_stats_chunk(logp_s, logp_t, cfg.importance.score_spec(), consume=True)
            del logp_t
        else:
            h, d = teacher.stats(logp_s, rows, cfg.importance.score_spec())
        ent.append(h)
        div.append(d)
        del logp_s  # before the next chunk's logits, so that two chunks' blocks are never alive together
    if z_t:
        teacher = replace(teacher, log_z=_cat(z_t))
    return _cat(ent), _cat(div), _cat(z_s), teacher


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def teacher_targets(
    pair: Pair, batch: Batch, parts: list[tuple[Batch, int, int]], scorer=None, temperature: float = 1.0
) -> Teacher:
    """The teacher's view of the N response positions: its hidden states (divided by `temperature`), or top-K
    log-probs from `scorer` (at T = 1 only: tip_cli.trainer.check_temperature)."""
    if scorer is not None:  # a VLLMTeacher
        lengths = batch.attention_mask.sum(1).tolist()
        seqs = [row[:n] for row, n in zip(batch.input_ids.tolist(), lengths, strict=True)]
        positions = [m.nonzero()[:, 0].tolist() for m in batch.target_mask.cpu()]
        ids, logp = scorer.topk_logprobs(seqs, positions)
        return TopKTeacher(ids.to(pair.device), logp.to(pair.device))
    hidden = torch.cat([valid_hidden(pair.teacher, mb, temperature) for mb, _, _ in parts])  # [N, d_T]
    return DenseTeacher(hidden, head_weight(pair.teacher), pair.vocab)


def loss_spec(cfg: TipConfig, pair: Pair, normalizer: float) -> LossSpec:
    """The loss group of `cfg` as the method's plain arguments, over the pair's shared vocabulary."""
    chunk = chunk_rows(cfg.loss.chunk_size, pair.vocab, pair.device)
    return LossSpec(pair.vocab, cfg.loss.kind, cfg.loss.jsd_beta, chunk, normalizer)


def distill_step(
    pair: Pair, batch: Batch, cfg: TipConfig, generator: torch.Generator, metrics: dict, scorer=None
) -> tuple[dict, TokenStats, torch.Tensor]:
    """Teacher scoring, selection, and the loss's backward for one rollout batch.

    Returns the step's statistics, the per-token stats [N] and the kept indices [K]; under torchrun, those of the
    global batch (tip_cli.distributed), while the loss is built on this rank's share of the kept tokens. `scorer`
    (a VLLMTeacher or ServerTeacher) replaces the in-process teacher when teacher.backend=vllm_topk or vllm_server.

    With a single micro-batch the student's forward with grad also provides the scores (no second pass); with
    several, a no-grad scoring pass runs first, because the budget is global over the whole rollout batch. When the
    selector keeps every token anyway (selectors.keeps_all), there is no scoring pass: the loss pass computes each
    row's H and D from the log-probs it has in hand, and selection runs afterwards, for the statistics only.

    H, D and the loss compare softmax(logits / T) of both models, T = distill_temperature(cfg). The student's passes
    compute under the run's precision (tip_cli.precision: bf16 autocast under bf16_mixed). When H or D is not
    finite the step stops before selection (stats None, loss NaN) and the trainer skips its update.
    """
    prec = precision.resolve(cfg.train.precision, cfg.pair.dtype, pair.device)
    temp = distill_temperature(cfg)
    micro = cfg.train.micro_batch_size or batch.input_ids.shape[0]
    parts = micro_slices(batch, micro)
    with timed("time/teacher", metrics):
        teacher = teacher_targets(pair, batch, parts, scorer, temp)
    seq_id = batch.target_mask.nonzero()[:, 0]  # [N]
    if selectors.keeps_all(cfg.selector.spec(), cfg.budget):
        return _full_token_step(pair, batch, parts, teacher, seq_id, cfg, generator, metrics, temp, prec)
    fused = len(parts) == 1
    with timed("time/train", metrics):
        h_fused = student_hidden(pair, batch, temp, prec) if fused else None  # [N, d_S], with grad
    with timed("time/select", metrics):
        if fused:
            h_s_scores = h_fused.detach()
        else:
            with torch.no_grad():
                h_s_scores = torch.cat([student_hidden(pair, mb, temp, prec) for mb, _, _ in parts])
        ent, div, log_z_s, teacher = score(h_s_scores, teacher, pair, cfg)
        if not distributed.all_true(_finite(ent, div)):  # every rank skips together
            return skipped_step(ent.numel())
        # stats, selection and the loss normaliser over every rank's tokens under torchrun; this batch's otherwise
        sel = distributed.select_tokens(ent, div, seq_id, batch.input_ids.shape[0], cfg, generator)
        kept = sel.local.to(pair.device)  # [K_r], indices into this batch's N tokens
        del h_s_scores
    normalizer = sel.normalizer
    loss_total = 0.0
    with timed("time/train", metrics):
        for mb, lo, hi in parts:
            local = kept[(kept >= lo) & (kept < hi)]
            if local.numel() == 0 and not distributed.active():  # sharded ranks run every forward and backward alike
                continue
            h_s = h_fused if fused else student_hidden(pair, mb, temp, prec)
            loss = selected_token_loss(
                h_s[local - lo], head_weight(pair.student), teacher.rows(local), loss_spec(cfg, pair, normalizer),
                log_z=log_z_s[local],
            )
            loss.backward()
            loss_total += loss.item()
    return {"loss": loss_total, **sel.metrics}, sel.stats, sel.kept.cpu()


def _full_token_step(
    pair: Pair, batch: Batch, parts: list[tuple[Batch, int, int]], teacher: Teacher, seq_id: torch.Tensor,
    cfg: TipConfig, generator: torch.Generator, metrics: dict, temp: float, prec: precision.Precision,
) -> tuple[dict, TokenStats, torch.Tensor]:
    """distill_step when every token is kept: one loss pass over all N rows that also yields their (H, D)."""
    normalizer = max(1, distributed.global_count(int(seq_id.numel())))  # N = K: either loss.norm divides by it
    sink = StatsSink(cfg.importance.score_spec(), [])
    loss_total = 0.0
    with timed("time/train", metrics):
        for mb, lo, hi in parts:
            loss = selected_token_loss(
                student_hidden(pair, mb, temp, prec), head_weight(pair.student), teacher.rows(slice(lo, hi)),
                loss_spec(cfg, pair, normalizer), sink,
            )
            loss.backward()
            loss_total += loss.item()
    with timed("time/select", metrics):
        ent, div = sink.tensors() if sink.parts else (torch.zeros(0, device=pair.device),) * 2
        if not distributed.all_true(_finite(ent, div)):
            return skipped_step(ent.numel())
        sel = distributed.select_tokens(ent, div, seq_id, batch.input_ids.shape[0], cfg, generator)
    if sel.kept.numel() != len(sel.stats):
        raise RuntimeError(f"selector {cfg.selector.name} at budget {cfg.budget} kept {sel.kept.numel()} of "
                           f"{len(sel.stats)} tokens, but the loss was built on all of them")
    return {"loss": loss_total, **sel.metrics}, sel.stats, sel.kept.cpu()


class NonFiniteStepsError(ValueError):
    """train.max_skipped_steps steps in a row had a non-finite H, D, loss or gradient (the CLI prints it in a line)."""


def non_finite_message(step: int, skipped: int, last) -> str:
    where = last.path if last else "none (no checkpoint was written before)"
    return (f"step {step}: {skipped} steps in a row had a non-finite entropy, divergence, loss or gradient, so none "
            f"of them updated the student (train.max_skipped_steps); last good checkpoint: {where}. Try a lower "
            "train.lr or train.precision=bf16_mixed / fp32, and check the models' logits for inf")


def check_temperature(cfg: TipConfig) -> None:
    """A vLLM top-K teacher (in process or a server) returns log-probs at T = 1, which cannot be re-tempered
    without the rest of the vocabulary."""
    if cfg.teacher.backend in ("vllm_topk", "vllm_server") and distill_temperature(cfg) != 1.0:
        raise ConfigError(
            f"teacher.backend={cfg.teacher.backend} scores at temperature 1, but H, D and the loss would compare "
            f"softmax(logits / {distill_temperature(cfg)}) (rollout.temperature={cfg.rollout.temperature}); "
            "set loss.temperature=1 or use teacher.backend=hf"
        )


def save_token_sample(run_dir: Path, step: int, stats: TokenStats, kept: torch.Tensor, limit: int) -> None:
    """Per-token (H, D, quadrant, kept) of one rollout batch, at most `limit` tokens drawn uniformly, for analysis."""
    n = len(stats)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(step))[:limit].sort().values if n > limit else torch.arange(n)
    kept_mask = torch.zeros(n, dtype=torch.bool)
    kept_mask[kept] = True
    out = run_dir / "token_samples"
    path = out / f"step_{step:06d}.npz"
    with storage_errors(run_dir, path):
        out.mkdir(exist_ok=True)
        np.savez_compressed(
            path,
            entropy=stats.entropy.cpu()[rows].numpy().astype(np.float32),
            divergence=stats.divergence.cpu()[rows].numpy().astype(np.float32),
            quadrant=stats.quadrant.cpu()[rows].numpy().astype(np.int8),
            kept=kept_mask[rows].numpy(),
            h_threshold=np.float32(stats.h_thr),
            d_threshold=np.float32(stats.d_thr),
            total_tokens=np.int64(n),
        )


def train(cfg: TipConfig, run_dir: Path) -> dict:
    """Run (or resume) OPD into run_dir; returns the final evaluation metrics.

    Under torchrun every rank runs this (tip_cli.distributed): each on its slice of the prompts, rank 0 alone logging.
    """
    device = distributed.setup(cfg.train.device)  # joins the torchrun job when launched by one
    distributed.check(cfg)
    run_dir = distributed.broadcast(run_dir)  # rank 0's: each rank's Hydra may have stamped its own
    console.quiet = eval_console.quiet = not distributed.is_main()
    # the data and the benchmark are read first, so that a bad file fails in seconds and leaves no run dir behind
    problems = None if cfg.data.env else load_problems(cfg.data, skip_bad_rows=cfg.eval.skip_bad_rows)
    bench = load_benchmark(cfg)
    check_temperature(cfg)
    # the run dir's contract (tip_cli.rundir): one writer, the recorded config, the newest verified checkpoint
    plan = rundir.open_run(cfg, run_dir, console)
    if plan.complete is not None:
        console.print(f"{run_dir} is complete (step {cfg.train.steps} of {cfg.train.steps}, final eval logged): "
                      "nothing to do; raise train.steps to continue it, or give a new out_dir")
        distributed.teardown()
        return plan.complete
    try:
        return _train(cfg, run_dir, device, plan.checkpoint, problems, bench)
    finally:
        plan.release()


def _train(cfg: TipConfig, run_dir: Path, device: torch.device, ckpt: Checkpoint | None,
           problems: list[Problem] | None, bench: list[Problem] | EnvBenchmark) -> dict:
    """`train` in a run dir it holds, from `ckpt` (None: from the start), on the problems (None with data.env)."""
    prec = precision.resolve(cfg.train.precision, cfg.pair.dtype, device)
    precision.warn_pure_bf16(prec, cfg.train.lr)
    pair = load_pair(cfg.pair, device, student_path=str(ckpt.path) if ckpt else None,
                     load_teacher=cfg.teacher.backend == "hf", student_dtype=prec.master, teacher_dtype=prec.pair)
    student, tok = pair.student, pair.tokenizer
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(student)
    distributed.shard(pair, cfg.train)  # FSDP2 under torchrun, before the optimizer sees the parameters
    scorer = None
    if cfg.teacher.backend == "vllm_topk":
        from tip_cli.rollout.vllm import VLLMTeacher

        scorer = VLLMTeacher(pair.teacher_path, cfg.teacher.vllm, prec.pair, cfg.teacher.topk, cfg.seed)
    elif cfg.teacher.backend == "vllm_server":  # the same top-K from running `vllm serve` replicas
        from tip_cli.teacher_server import ServerTeacher

        scorer = ServerTeacher.connect(cfg.teacher, tok, pair.vocab, run_dir)
    engine = make_engine(cfg.rollout, student, tok, pair.student_path, cfg.seed, dtype=prec.compute)
    tasks = None  # with data.env: tool-use episodes (tip_cli.rollout.agent) instead of single-turn prompts
    if cfg.data.env:
        from tip_cli.envs import make_env
        from tip_cli.rollout import agent

        stop_ids = eos_ids(student.generation_config.eos_token_id, tok)
        tasks = agent.TaskSource(cfg, tok, stop_ids, make_env(cfg.data, cfg.pair, resolve_model))
    else:
        prompts = [render_prompt(tok, p.prompt, cfg.pair) for p in problems]
    n_prompts = len(tasks) if tasks is not None else len(prompts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start = 0
    if ckpt:
        start = distributed.resume(ckpt, student, optimizer, scheduler)
        apply_schedule(optimizer, scheduler, cfg)
        console.print(f"[bold]resuming[/] from {ckpt.path} (step {start})", soft_wrap=True)
    logger = distributed.NullLogger()
    if distributed.is_main():
        logger = MetricsLogger(run_dir, cfg.logger, OmegaConf.to_container(OmegaConf.structured(cfg)), start, run_dir.name)
    r = cfg.rollout
    skipped = skipped_total = 0  # consecutive and all steps without an update (non-finite H, D or loss)

    def run_eval(step: int) -> dict:
        # every rank evaluates (generation is collective); rank 0 logs
        with distributed.gathered(student), prec.autocast(device, student):
            result, _ = evaluate_benchmark(student, tok, cfg, bench, engine=engine)
        metrics = {f"eval/{cfg.benchmark.name}/{k}": v for k, v in result.items()}
        logger.log(metrics, step)
        console.print(f"[bold]eval[/] step {step}: {cfg.benchmark.name} accuracy {result['accuracy']:.3f}")
        return result

    if start == 0 and cfg.train.eval_before:
        run_eval(0)
    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=cfg.train.steps, completed=start, info="")
        for step in range(start + 1, cfg.train.steps + 1):
            # every random draw of a step derives from (seed, step) (and the rank), so a resumed run replays exactly
            torch.manual_seed(distributed.rank_seed(cfg.seed * 1_000_003 + step))
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            m: dict[str, float] = {}
            with timed("time/step", m):
                idx = distributed.my_slice(prompt_indices(n_prompts, cfg.train.prompts_per_step, step, cfg.seed))
                sampling = Sampling(r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens, r.top_k,
                                    seed=distributed.rank_seed(cfg.seed * 1_000_003 + step))
                with timed("time/rollout", m), distributed.gathered(student), prec.autocast(device, student):
                    if tasks is not None:
                        trajs = tasks.rollout(engine, idx, sampling)
                    else:
                        responses = engine.generate([prompts[i] for i in idx], sampling).tokens
                    engine.sleep()
                rows = [i for i in idx for _ in range(sampling.n)]
                if tasks is not None:  # target_mask: the student's own tokens only, never the prompt or tool results
                    batch = agent.pack(trajs, tok.pad_token_id).to(device)
                else:
                    batch = pack([prompts[i] for i in rows], responses, tok.pad_token_id).to(device)
                step_metrics, stats, kept = distill_step(pair, batch, cfg, generator, m, scorer)
                m.update(step_metrics)
                with timed("time/train", m):
                    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.grad_clip or math.inf)
                    # a non-finite H, D, loss or gradient on any rank: no update (AdamW would spread the NaN)
                    good = distributed.all_true(stats is not None and math.isfinite(m["loss"])
                                                and math.isfinite(float(grad_norm)))
                    skipped = 0 if good else skipped + 1
                    skipped_total += 0 if good else 1
                    m["train/skipped_steps"] = float(skipped_total)
                    if good and m["tokens/kept"] > 0:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    m["optim/lr"] = scheduler.get_last_lr()[0]
                    scheduler.step()
                with timed("time/sync", m):
                    engine.sync_weights(student)
            if tasks is not None:
                m.update(agent.rollout_metrics(trajs, tasks.env))
                generated = m["rollout/response_len"] * len(trajs)
            else:
                texts = tok.batch_decode(responses, skip_special_tokens=True)
                m["rollout/response_len"] = sum(map(len, responses)) / len(responses)
                m["rollout/accuracy"] = sum(grade(t, problems[i].answer).correct for t, i in zip(texts, rows, strict=True)) / len(rows)
                generated = sum(map(len, responses))
            m["optim/grad_norm"] = float(grad_norm)
            m["perf/tokens_per_s"] = m["tokens/total"] / m["time/step"]
            m["perf/rollout_tokens_per_s"] = generated / max(m["time/rollout"], 1e-9)
            m["perf/peak_mem_gb"] = peak_memory_gb(device)
            m = distributed.merge_metrics(m)
            logger.log(m, step)
            if skipped:
                console.print(f"[yellow]step {step}: non-finite H, D, loss or gradient; no update[/] "
                              f"({skipped} in a row; {cfg.train.max_skipped_steps} stop the run)")
                if skipped >= cfg.train.max_skipped_steps:
                    raise NonFiniteStepsError(non_finite_message(step, skipped, latest_checkpoint(run_dir)))
            elif distributed.is_main() and cfg.train.token_sample_every and (step == 1 or step % cfg.train.token_sample_every == 0):
                save_token_sample(run_dir, step, stats, kept, cfg.train.token_sample_size)
            info = f"loss {m['loss']:.4f}  kept {m['tokens/kept_frac']:.2f}  Q3 {m.get('tokens/q3_frac', 0.0):.2f}  {m['perf/tokens_per_s']:.0f} tok/s"
            bar.update(task, completed=step, info=info)
            if not console.is_terminal:
                console.print(f"step {step}/{cfg.train.steps}  {info}")
            if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                distributed.save(run_dir, step, student, tok, optimizer, scheduler, cfg.train.keep_checkpoints, prec.pair)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                run_eval(step)
    final = run_eval(cfg.train.steps)
    logger.finish()
    key = f"eval/{cfg.benchmark.name}/accuracy"
    before = [r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] == 0 and key in r]
    if before:
        console.print(f"[bold]student {cfg.benchmark.name} accuracy: {before[0]:.3f} before -> {final['accuracy']:.3f} after[/]")
    console.print(f"run dir: {run_dir}")
    distributed.teardown()
    return final
