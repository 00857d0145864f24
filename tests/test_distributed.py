"""Scale-out (tip_cli.train.parallel) on CPU with gloo: 2 ranks spawned with torch.multiprocessing, each compared with one
process holding the whole batch: the kept token set and the loss, one FSDP2 training step, and a sharded checkpoint's
save -> kill -> resume."""

import dataclasses
import faulthandler
import json
import os
import socket
import weakref
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from tip_cli.checkpoint import Checkpoint, list_checkpoints
from tip_cli.cli import compose_config
from tip_cli.config.schema import (
    ConfigError,
    ImportanceConfig,
    LossConfig,
    ParallelConfig,
    RolloutConfig,
    SelectorConfig,
    TipConfig,
    TrainConfig,
)
from tip_cli.eval.benchmark import eval_spec, evaluate_benchmark, load_benchmark
from tip_cli.losses import LossSpec, selected_token_loss
from tip_cli.models import enable_checkpointing
from tip_cli.pairs import load_pair
from tip_cli.rollout import sources, weights
from tip_cli.rollout.batch import pack
from tip_cli.rollout.hf import HFEngine
from tip_cli.rollout.vllm import VLLMEngine
from tip_cli.rollout.weights import WeightPusher
from tip_cli.selection import quadrants as importance
from tip_cli.selection import selectors
from tip_cli.teacher.targets import DenseTeacher
from tip_cli.tracking import PeakMemory, read_jsonl
from tip_cli.train import checkpoints, loop, parallel, precision, recipe, schedule, sharding
from tip_cli.train import step as train_step

WORLD = 2
RANK_TIMEOUT_S = 240


def _rank_main(rank: int, port: int, out_dir: Path, fn, args: tuple) -> None:
    """One rank: the environment torchrun would set, then fn(*args), whose result goes to out_dir/rank{r}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)  # a rank stuck in a collective fails, with its stack
    torch.save(fn(*args), out_dir / f"rank{rank}.pt")
    faulthandler.cancel_dump_traceback_later()


def spawn(fn, out_dir: Path, *args) -> list:
    """Run fn(*args) on WORLD gloo ranks; returns each rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(port, out_dir, fn, args), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------------------------------
# Selection and loss over the global batch, on fixed synthetic scores

SEQ_LENS = [5, 9, 3, 12, 7, 8]  # ranks hold sequences 0-2 (17 tokens) and 3-5 (27): unequal token counts
V, D_S, D_T = 31, 8, 12
CASES = [
    dict(selector=SelectorConfig(name="soft_or"), budget=0.3),
    dict(selector=SelectorConfig(name="entropy", mode="sample"), budget=0.5, loss=LossConfig(norm="total")),
    dict(selector=SelectorConfig(name="divergence", scope="per_sequence"), budget=0.4),
    dict(selector=SelectorConfig(name="quadrant", quadrants=["Q3"]), budget=0.2, importance=ImportanceConfig(norm="rank")),
    dict(selector=SelectorConfig(name="hard_or"), budget=0.5, importance=ImportanceConfig(norm="quantile_clip", h_threshold=0.7)),
    dict(selector=SelectorConfig(name="random"), budget=0.6),
]


def synthetic_batch() -> dict[str, torch.Tensor]:
    """Scores of one global rollout batch (ties included) and the hidden states / heads the loss is built on."""
    g = torch.Generator().manual_seed(0)
    n = sum(SEQ_LENS)
    ent = (torch.rand(n, generator=g) * 3).round(decimals=1)  # rounded: ties across ranks must break as in one process
    return {
        "entropy": ent, "divergence": torch.rand(n, generator=g) * 2,
        "seq_id": torch.repeat_interleave(torch.arange(len(SEQ_LENS)), torch.tensor(SEQ_LENS)),
        "h_s": torch.randn(n, D_S, generator=g), "w_s": torch.randn(V, D_S, generator=g),
        "h_t": torch.randn(n, D_T, generator=g), "w_t": torch.randn(V, D_T, generator=g),
    }


def loss_and_grad(data, rows: torch.Tensor, normalizer: int) -> tuple[float, torch.Tensor]:
    w_s = data["w_s"].clone().requires_grad_()
    loss = selected_token_loss(data["h_s"][rows], w_s, DenseTeacher(data["h_t"][rows], data["w_t"], V), LossSpec(V, normalizer=normalizer))
    loss.backward()
    return loss.item(), w_s.grad


def select_on_ranks() -> dict[str, list[dict]]:
    """Every case under both selection scopes, on this rank's three sequences."""
    parallel.setup("cpu")
    data, r = synthetic_batch(), parallel.rank()
    lo = sum(SEQ_LENS[: 3 * r])
    mine = slice(lo, lo + sum(SEQ_LENS[3 * r : 3 * r + 3]))
    out: dict[str, list[dict]] = {"global": [], "local": []}
    for scope, case in ((scope, case) for scope in out for case in CASES):
        cfg = TipConfig(parallel=ParallelConfig(rank_scope=scope), **case)
        sel = parallel.select_tokens(data["entropy"][mine], data["divergence"][mine], data["seq_id"][mine] - 3 * r, 3,
                                        recipe.specs(cfg, torch.device("cpu")).step.selection,
                                        torch.Generator().manual_seed(7))
        local = {k: v[mine] if k in ("h_s", "h_t") else v for k, v in data.items()}
        loss, grad = loss_and_grad(local, sel.local, sel.normalizer)
        totals = torch.cat([torch.tensor([loss]), grad.flatten()])
        torch.distributed.all_reduce(totals)  # what FSDP's summed reduce-scatter does with the gradients
        out[scope].append({"kept": sel.kept, "mine": sel.local + lo, "normalizer": sel.normalizer, "metrics": sel.metrics,
                    "loss": totals[0].item(), "grad": totals[1:].view_as(grad)})
    parallel.teardown()
    return out


@pytest.fixture(scope="module")
def selections(tmp_path_factory) -> list[dict[str, list[dict]]]:
    return spawn(select_on_ranks, tmp_path_factory.mktemp("select"))


def test_two_ranks_select_the_same_tokens_and_loss_as_one_process(selections):
    ranks = [r["global"] for r in selections]
    data = synthetic_batch()
    for i, case in enumerate(CASES):
        cfg = TipConfig(**case)
        stats = importance.compute_stats(data["entropy"], data["divergence"], data["seq_id"], cfg.importance)
        kept = selectors.select(stats, cfg.selector, cfg.budget, torch.Generator().manual_seed(7))
        normalizer = max(1, kept.numel() if cfg.loss.norm == "selected" else len(stats))
        loss, grad = loss_and_grad(data, kept, normalizer)
        got = [r[i] for r in ranks]
        assert kept.numel() > 0
        for g in got:
            assert torch.equal(g["kept"], kept), case
            assert g["normalizer"] == normalizer
            assert g["metrics"] == pytest.approx(importance.stats_metrics(stats, kept))
            assert g["loss"] == pytest.approx(loss, rel=1e-6)
            torch.testing.assert_close(g["grad"], grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(torch.cat([g["mine"] for g in got]), kept)  # each kept token is one rank's, in order


def test_local_scope_selects_per_rank_with_a_global_normaliser(selections):
    ranks = [r["local"] for r in selections]
    data = synthetic_batch()
    for i, case in enumerate(CASES):
        cfg = TipConfig(**case)
        kept_all = []
        for r in range(WORLD):
            lo = sum(SEQ_LENS[: 3 * r])
            mine = slice(lo, lo + sum(SEQ_LENS[3 * r : 3 * r + 3]))
            stats = importance.compute_stats(data["entropy"][mine], data["divergence"][mine], data["seq_id"][mine], cfg.importance)
            kept = selectors.select(stats, cfg.selector, cfg.budget, torch.Generator().manual_seed(7 + r))
            assert torch.equal(ranks[r][i]["kept"], kept), case
            kept_all.append(kept + lo)
        k = sum(x.numel() for x in kept_all)
        for r in range(WORLD):
            assert ranks[r][i]["normalizer"] == max(1, k if cfg.loss.norm == "selected" else sum(SEQ_LENS))
            assert ranks[r][i]["metrics"]["tokens/kept"] == k and ranks[r][i]["metrics"]["tokens/total"] == sum(SEQ_LENS)


# ---------------------------------------------------------------------------------------------------------------------
# One FSDP2 training step on the micro pair

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17]]
RESPONSES = [[20, 21, 22], [23], [24, 25, 26, 27], [28, 29], [30, 31, 32, 33, 34], [35, 36]]


def one_step(cfg: TipConfig) -> dict:
    """distill_step, grad clipping and one AdamW step, on this process's share of the batch (all of it alone)."""
    pair = load_pair(cfg.pair, torch.device("cpu"))
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(pair.student)
    sharding.shard(pair, cfg.parallel, recipe.specs(cfg, pair.device).step.precision)
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=cfg.optim.lr)
    batch = pack(parallel.my_slice(PROMPTS), parallel.my_slice(RESPONSES), pair.tokenizer.pad_token_id)
    seen = []  # the dtype the final norm computed in (bf16 under bf16_mixed's FSDP2 policy)
    hook = pair.student.base_model.norm.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    metrics, _, kept = train_step.distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    hook.remove()
    grads = {n: p.grad for n, p in pair.student.named_parameters()}
    grad_norm = float(torch.nn.utils.clip_grad_norm_(pair.student.parameters(), cfg.optim.grad_clip))
    optimizer.step()
    if parallel.active():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        grads = {n: g.full_tensor() for n, g in grads.items()}
        weights = get_model_state_dict(pair.student, options=StateDictOptions(full_state_dict=True))
    else:
        weights = pair.student.state_dict()
    metrics = parallel.merge_metrics(metrics)
    policy = None
    if parallel.active():
        mp = pair.student._get_fsdp_state()._fsdp_param_group.mp_policy
        policy = (mp.param_dtype, mp.reduce_dtype)
    return {"metrics": metrics, "kept": kept, "grads": grads, "grad_norm": grad_norm, "weights": weights,
            "policy": policy, "compute_dtype": seen[0], "param_dtypes": {p.dtype for p in pair.student.parameters()}}


def steps_on_ranks(cfgs: list[TipConfig]) -> list[dict]:
    parallel.setup("cpu")
    out = [one_step(cfg) for cfg in cfgs]
    parallel.teardown()
    return out


_STEP_RANKS: list = []  # the ranks' steps, spawned once for the two tests below (micro_overrides is function-scoped)


@pytest.fixture
def step_ranks(tmp_path_factory, micro_overrides) -> tuple[dict[str, list[TipConfig]], list[list[dict]]]:
    """{"fp32": two configs, "bf16_mixed": one}, and each rank's steps of all three, in that order, from one spawn."""
    if not _STEP_RANKS:
        base = [*micro_overrides, "optim.lr=1e-2", "optim.grad_clip=1.0"]
        mixed = [*micro_overrides, "optim.lr=1e-2", "optim.grad_clip=1e9", "selector=all"]  # no clipping: raw grads
        cfgs = {
            "fp32": [
                compose_config([*base, "selector=soft_or", "budget=0.5", "train.gradient_checkpointing=true"]),
                compose_config([*base, "selector=entropy", "selector.mode=sample", "budget=0.3",
                                "train.micro_batch_size=1", "loss.norm=total", "parallel.shard_teacher=true"]),
            ],
            "bf16_mixed": [compose_config([*mixed, "train.precision=bf16_mixed"])],
        }
        _STEP_RANKS.append((cfgs, spawn(steps_on_ranks, tmp_path_factory.mktemp("steps"), [*cfgs["fp32"], *cfgs["bf16_mixed"]])))
    return _STEP_RANKS[0]


def test_fsdp_step_on_two_ranks_matches_one_process(step_ranks):
    configs, ranks = step_ranks
    cfgs = configs["fp32"]
    before = load_pair(cfgs[0].pair, torch.device("cpu")).student.state_dict()
    for i, cfg in enumerate(cfgs):
        want = one_step(cfg)
        got = ranks[0][i]
        assert torch.equal(got["kept"], want["kept"]) and torch.equal(ranks[1][i]["kept"], want["kept"])
        assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=1e-5)
        for key in ("tokens/total", "tokens/kept", "tokens/q3_frac", "div/kept_mean", "grad/kept_share",
                    "grad/q3_share", "grad/kept_q1_share", "loss/q2_share", "select/overlap_entropy"):
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7)
        for name, weight in want["weights"].items():
            # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, float noise in g moves it by a share of lr
            torch.testing.assert_close(got["weights"][name], weight, rtol=1e-5, atol=1e-2 * cfg.optim.lr)
        assert max((want["weights"][n] - w).abs().max().item() for n, w in before.items()) > 1e-3  # the step moved them


def test_fsdp_bf16_mixed_step_on_two_ranks_uses_the_mixed_precision_policy(step_ranks):
    """train.precision=bf16_mixed under FSDP2: bf16 parameters in forward/backward, fp32 reduction and fp32 shards;
    the step matches one fp32 process within bf16 tolerance."""
    configs, ranks = step_ranks
    (mixed,), got = configs["bf16_mixed"], ranks[0][len(configs["fp32"])]
    want = one_step(dataclasses.replace(mixed, train=dataclasses.replace(mixed.train, precision="fp32")))
    assert got["policy"] == (torch.bfloat16, torch.float32) and want["policy"] is None
    assert got["compute_dtype"] == torch.bfloat16 and want["compute_dtype"] == torch.float32
    assert got["param_dtypes"] == {torch.float32}  # the sharded master weights (and so AdamW's state) stay fp32
    assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=3e-2)
    g = torch.cat([got["grads"][n].flatten().float() for n in want["grads"]])
    w = torch.cat([x.flatten() for x in want["grads"].values()])
    assert ((g - w).norm() / w.norm()).item() < 5e-2 and not torch.equal(g, w)


# ---------------------------------------------------------------------------------------------------------------------
# Sharded checkpoints


def dies_in_step(pack, step: int | None):
    """sources.pack, raising in the given step (before that step's checkpoint)."""
    calls = {"n": 0}

    def pack_or_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("killed")
        return pack(*args, **kwargs)

    return pack_or_die


def train_on_ranks(cfg: TipConfig, runs: list[tuple[Path, int | None]]) -> None:
    """recipe.train into each run dir in turn, in one process group; a run given a step dies there, and with it
    this process, so the next spawn starts afresh, as after a kill."""
    torch.distributed.init_process_group("gloo")  # train() joins it rather than making one per run
    real_pack = sources.pack
    for run_dir, die_in in runs:
        sources.pack = dies_in_step(real_pack, die_in)
        recipe.train(cfg, run_dir)
    torch.distributed.destroy_process_group()


def test_sharded_checkpoint_save_kill_resume_continues_the_run(tmp_path, micro_overrides):
    cfg = compose_config([*micro_overrides, "train.steps=3", "train.save_every=1", "train.eval_before=false",
                          "train.token_sample_every=0", "train.device=cpu"])  # gloo ranks, even beside a GPU
    crashed, reference = tmp_path / "crashed", tmp_path / "reference"
    with pytest.raises(Exception, match="killed"):
        spawn(train_on_ranks, tmp_path / "a", cfg, [(reference, None), (crashed, 3)])
    ckpts = list_checkpoints(crashed)
    assert [c.step for c in ckpts] == [1, 2]
    assert (ckpts[-1].path / "dcp" / ".metadata").exists() and (ckpts[-1].path / "model.safetensors").exists()

    spawn(train_on_ranks, tmp_path / "b", cfg, [(crashed, None)])
    got = [r for r in read_jsonl(crashed / "metrics.jsonl") if "loss" in r]
    want = [r for r in read_jsonl(reference / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    from transformers import AutoModelForCausalLM

    resumed, straight = (AutoModelForCausalLM.from_pretrained(d / "checkpoints" / "step_3") for d in (crashed, reference))
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    with pytest.raises(ConfigError, match="2 torchrun ranks"):  # a sharded checkpoint resumes under torchrun only
        checkpoints.resume(Checkpoint(3, crashed / "checkpoints" / "step_3"), None, None, None)


def test_launch_checks():
    with pytest.raises(ConfigError, match="parallel.rank_scope"):
        ParallelConfig(rank_scope="everywhere")
    with pytest.raises(ConfigError, match="torchrun"):
        parallel.check(TrainConfig(), ParallelConfig(cpu_offload=True))
    assert parallel.my_slice([3, 1, 2]) == [3, 1, 2] and parallel.rank_seed(5) == 5


# ---------------------------------------------------------------------------------------------------------------------
# Weight sync, evaluation and checkpoint hashing on two ranks


class SpyLLM:
    """vllm.LLM's `collective_rpc("reload_weights")`, consuming the weights as vLLM's worker does (one at a time) and
    counting, at each new tensor, how many of those before it are still alive."""

    def __init__(self):
        self.seen, self.alive = [], []

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        refs = []
        for name, tensor in kwargs["weights_iterator"]:
            self.alive.append(sum(r() is not None for r in refs))
            self.seen.append((name, tensor.dtype, tuple(tensor.shape), type(tensor).__name__))
            refs.append(weakref.ref(tensor))
            del tensor

    def reset_prefix_cache(self):
        pass

    def apply_model(self, fn):
        pass


def spy_vllm_engine() -> VLLMEngine:
    engine = object.__new__(VLLMEngine)  # no vLLM: its entry points are the spy's
    engine.llm, engine.dtype, engine.asleep, engine.sleep_mode = SpyLLM(), torch.bfloat16, False, False
    return engine


class CountingHF(HFEngine):
    """The HF engine, counting the prompts it is asked to generate for."""

    prompts = 0

    def generate(self, prompts, sampling, on_batch=None):
        self.prompts += len(prompts)
        return super().generate(prompts, sampling, on_batch)


def unshards_in_rollout(cfg: TipConfig, pair, engine) -> int:
    """FSDP unshard calls while loop.generate generates with `engine` (the source's generate faked)."""
    from torch.distributed.fsdp import FSDPModule

    calls = {"n": 0}
    real = FSDPModule.unshard

    def unshard(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    class Source:  # what loop.generate asks of a rollout source, generating nothing
        def __len__(self):
            return 8

        def generate(self, *args):
            return []

        def pack(self, *args):
            return None

    spec = recipe.specs(cfg, torch.device("cpu"))
    run = SimpleNamespace(loop=spec.loop, source=Source(), engine=engine, pair=pair, device=torch.device("cpu"),
                          step=SimpleNamespace(precision=precision.resolve("fp32", "auto", torch.device("cpu"))), memory=PeakMemory(torch.device("cpu")))
    FSDPModule.unshard = unshard
    try:
        loop.generate(run, 1)
    finally:
        FSDPModule.unshard = real
    return calls["n"]


def push_to_a_fake_replica(student, run_dir: Path) -> list[str]:
    """A filesystem push of the sharded student as version 5 to a replica that takes any update (its HTTP faked):
    every rank joins the gathers, rank 0 writes the file, and every rank learns the replicas left."""
    served = {}

    def replica(url, body=None, timeout=60.0, get=False):
        if url.endswith("/finish_weight_update"):
            served["version"] = body["weight_version"]
        return {"weight_version": served.get("version")}

    with patch.object(weights, "_request", replica):
        pusher = WeightPusher(RolloutConfig(engine="vllm_server", url=FAKE_REPLICA), run_dir, dtype=torch.bfloat16)
        return pusher.push(student, 5)


def io_on_ranks(cfg: TipConfig, ckpt_root: Path) -> dict:
    """On a sharded student: a weight sync into a spy vLLM, loop.generate's gathers per engine, a sharded evaluation
    and a sharded checkpoint whose files are hashed by the ranks that own them."""
    from tip_cli import checkpoint

    parallel.setup("cpu")
    pair = load_pair(cfg.pair, torch.device("cpu"))
    sharding.shard(pair, cfg.parallel, recipe.specs(cfg, pair.device).step.precision)
    out = {}
    engine = spy_vllm_engine()
    engine.sync_weights(pair.student)
    out["sync"], out["alive"] = engine.llm.seen, engine.llm.alive
    out["pushed"] = push_to_a_fake_replica(pair.student, ckpt_root)
    out["unshards"] = {"vllm": unshards_in_rollout(cfg, pair, spy_vllm_engine()),
                       "hf": unshards_in_rollout(cfg, pair, HFEngine(pair.student, pair.tokenizer))}

    hf = CountingHF(pair.student, pair.tokenizer, cfg.eval.batch_size)
    evals = eval_spec(cfg.benchmark, cfg.eval, cfg.pair, cfg.agent, cfg.rollout)
    bench = load_benchmark(evals)
    with sharding.gathered(pair.student, hf):
        out["eval"] = evaluate_benchmark(pair.student, pair.tokenizer, evals, bench, engine=hf, shard=parallel.eval_shard())
    out["eval_prompts"] = hf.prompts

    hashed = []
    real_sha = checkpoint._sha256
    checkpoint._sha256 = lambda path: hashed.append(str(path.relative_to(staging))) or real_sha(path)
    staging = checkpoint.staging_dir(ckpt_root, 1)
    optimizer = schedule.make_optimizer(pair.student.parameters(), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoints.save(ckpt_root, 1, pair.student, pair.tokenizer, optimizer, scheduler, keep=2)
    checkpoint._sha256 = real_sha
    out["hashed"] = hashed
    parallel.teardown()
    return out


FAKE_REPLICA = "http://127.0.0.1:9"
_IO_RANKS: list = []  # the ranks' run, made once for the tests below (micro_overrides is function-scoped)


@pytest.fixture
def io_ranks(tmp_path_factory, micro_overrides) -> tuple[TipConfig, Path, list[dict]]:
    if not _IO_RANKS:
        # greedy, one prompt per generate call: a problem's response cannot depend on which rank or batch it is in
        cfg = compose_config([*micro_overrides, "eval.limit=5", "eval.n=1", "eval.temperature=0", "eval.batch_size=1"])
        root = tmp_path_factory.mktemp("io")
        _IO_RANKS.append((cfg, root / "run", spawn(io_on_ranks, root / "ranks", cfg, root / "run")))
    return _IO_RANKS[0]


def test_sync_to_vllm_gathers_one_parameter_at_a_time_in_the_compute_dtype(io_ranks):
    cfg, _, ranks = io_ranks
    student = load_pair(cfg.pair, torch.device("cpu"), load_teacher=False).student
    want = [(n, torch.bfloat16, tuple(p.shape), "Tensor") for n, p in student.named_parameters()]
    assert student.dtype == torch.float32  # the sharded master weights, cast before they are gathered
    for r in ranks:
        assert r["sync"] == want  # every parameter, full shape, a plain tensor in the engine's dtype
        assert r["alive"] == [0] * len(want)  # none of the ones before is still held when the next is made


def test_a_push_of_the_sharded_student_writes_it_whole_once_and_every_rank_learns_the_replicas(io_ranks):
    cfg, run_dir, ranks = io_ranks
    student = load_pair(cfg.pair, torch.device("cpu"), load_teacher=False).student
    assert [r["pushed"] for r in ranks] == [[FAKE_REPLICA]] * len(ranks)
    assert [p.name for p in (run_dir / "weights").iterdir()] == ["v5.safetensors"]
    with safe_open(str(run_dir / "weights" / "v5.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(n for n, _ in student.named_parameters())
        for name, p in student.named_parameters():  # the run's student is untrained: the checkpoint's weights
            assert torch.equal(f.get_tensor(name), p.detach().to(torch.bfloat16)), name


def test_rollouts_gather_the_student_for_hf_only(io_ranks):
    for r in io_ranks[2]:
        assert r["unshards"]["vllm"] == 0 and r["unshards"]["hf"] > 0


def test_evaluation_is_split_over_ranks_and_matches_one_process(io_ranks):
    cfg, _, ranks = io_ranks
    pair = load_pair(cfg.pair, torch.device("cpu"), load_teacher=False)
    hf = CountingHF(pair.student, pair.tokenizer, cfg.eval.batch_size)
    evals = eval_spec(cfg.benchmark, cfg.eval, cfg.pair, cfg.agent, cfg.rollout)
    metrics, records = evaluate_benchmark(pair.student, pair.tokenizer, evals, load_benchmark(evals), engine=hf)
    assert hf.prompts == 5 and [r["eval_prompts"] for r in ranks] == [3, 3]  # ceil(5 / 2) each, the last padded
    for r in ranks:
        got_metrics, got_records = r["eval"]
        assert [g["id"] for g in got_records] == [w["id"] for w in records]
        assert [g["responses"] for g in got_records] == [w["responses"] for w in records]
        assert got_metrics == metrics


def test_rank_shares_cover_the_rows_once_in_order():
    rows = list(range(7))
    shares = []
    for r in range(3):
        with patch.object(parallel, "rank", lambda r=r: r), patch.object(parallel, "world_size", lambda: 3):
            shares.append(parallel.RankShard().split(rows))
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert [x for s in shares for x in s][:7] == rows


def test_sharded_checkpoint_files_are_hashed_once_each_by_their_own_rank(io_ranks):
    from tip_cli import checkpoint

    _, run, ranks = io_ranks
    ckpt = checkpoint.list_checkpoints(run)[-1]
    assert checkpoint.verify(ckpt) is None
    manifest = json.loads((ckpt.path / checkpoint.MANIFEST).read_text())["files"]
    hashed = [r["hashed"] for r in ranks]
    assert sorted(hashed[0] + hashed[1]) == sorted(manifest)  # every file once, none twice
    for r in range(WORLD):
        assert f"dcp/__{r}_0.distcp" in hashed[r]
    sizes = [sum(manifest[n]["size"] for n in h) for h in hashed]
    assert min(sizes) > 0.25 * sum(sizes)  # shared, not all on rank 0


def test_hash_shares_give_each_rank_its_shards_and_balance_the_rest():
    sizes = {"dcp/__0_0.distcp": 100, "dcp/__1_0.distcp": 100, "dcp/.metadata": 5, "model.safetensors": 80,
             "config.json": 1, "trainer_state.pt": 3}
    owner = checkpoints.hash_shares(sizes, 2)
    assert owner["dcp/__0_0.distcp"] == 0 and owner["dcp/__1_0.distcp"] == 1
    assert owner["model.safetensors"] == 0 and owner["dcp/.metadata"] == 1  # largest first to the lighter rank
    load = [sum(s for n, s in sizes.items() if owner[n] == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(sizes.values()) and set(owner) == set(sizes)


def test_teardown_destroys_vllms_groups_before_the_process_group_it_built_them_on(monkeypatch):
    """vLLM in torchrun mode builds its groups on the job's process group; destroying that group first makes vLLM's
    own shutdown at exit fail, so teardown releases vLLM's groups first (a fake parallel_state records the order)."""
    calls = []
    state = SimpleNamespace(destroy_model_parallel=lambda: calls.append("vllm model parallel"),
                            destroy_distributed_environment=lambda: calls.append("vllm world"))
    monkeypatch.setitem(__import__("sys").modules, "vllm.distributed.parallel_state", state)
    monkeypatch.setitem(parallel._JOB, "joined", True)
    monkeypatch.setitem(parallel._JOB, "owned", True)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.dist, "destroy_process_group", lambda: calls.append("process group"))
    parallel.teardown()
    assert calls == ["vllm model parallel", "vllm world", "process group"]
    assert not parallel._JOB["joined"]
