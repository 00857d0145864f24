"""The CUDA path (`make test-gpu`, `pytest -m gpu`): a bf16_mixed step, HF rollouts, a one-rank NCCL FSDP2 step and
the memory benchmark at a small shape. Every test here is marked `gpu` and skips without a CUDA device."""

import json
import os
import socket

import pytest
import torch

from tip_cli.cli import compose_config
from tip_cli.config.schema import PairConfig
from tip_cli.models import load_model, load_tokenizer
from tip_cli.pairs import load_pair
from tip_cli.rollout.batch import pack
from tip_cli.rollout.hf import HFEngine
from tip_cli.train import parallel, precision, recipe, sharding
from tip_cli.train import step as train_step

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
RESPONSES = [[20, 21, 22, 40, 41], [23, 42, 43], [24, 25, 26, 27], [28, 29, 44]]


def cuda_step(cfg, lr: float) -> dict:
    """One distill_step + AdamW step on CUDA under cfg.train.precision (sharded when a process group is joined)."""
    device = torch.device("cuda")
    prec = precision.resolve(cfg.train.precision, cfg.pair.dtype, device)
    pair = load_pair(cfg.pair, device, student_dtype=prec.master, teacher_dtype=prec.pair)
    sharding.shard(pair, cfg.parallel, prec)
    before = [p.detach().clone() for p in pair.student.parameters()]
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=lr, weight_decay=0.0)
    batch = pack(PROMPTS, RESPONSES, pair.tokenizer.pad_token_id).to(device)
    metrics, _, _ = train_step.distill_step(pair, batch, recipe.specs(cfg, device).step, torch.Generator().manual_seed(0), {})
    optimizer.step()
    after = list(pair.student.parameters())
    changed = sum(int((a.detach() != b).sum()) for a, b in zip(after, before, strict=True))
    return {"loss": metrics["loss"], "changed": changed / sum(p.numel() for p in after), "prec": prec,
            "dtypes": {p.dtype for p in after}, "pair": pair}


def test_bf16_mixed_step_on_cuda_moves_every_weight_at_lr_1e_6(micro_overrides):
    cuda = compose_config([*micro_overrides, "train.device=cuda", "train.precision=auto", "selector=all"])
    got = cuda_step(cuda, 1e-6)
    assert got["prec"].mode == "bf16_mixed" and got["dtypes"] == {torch.float32}
    assert got["pair"].teacher.dtype == torch.bfloat16
    assert got["changed"] >= 0.99, got["changed"]
    cpu = compose_config([*micro_overrides, "selector=all"])
    pair = load_pair(cpu.pair, torch.device("cpu"))
    batch = pack(PROMPTS, RESPONSES, pair.tokenizer.pad_token_id)
    ref, _, _ = train_step.distill_step(pair, batch, recipe.specs(cpu, pair.device).step, torch.Generator().manual_seed(0), {})
    assert got["loss"] == pytest.approx(ref["loss"], rel=3e-2)


def test_hf_rollouts_on_cuda_sample_the_tempered_softmax(penalized_student, tempered_check):
    model = load_model(str(penalized_student), PairConfig(dtype="float32"), torch.device("cuda"), trainable=False)
    torch.manual_seed(0)
    tempered_check(model, HFEngine(model, load_tokenizer(str(penalized_student), PairConfig())), 0.8, atol=1e-3)


def test_one_rank_nccl_fsdp2_step(micro_overrides, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    cfg = compose_config([*micro_overrides, "train.device=cuda", "train.precision=bf16_mixed", "selector=soft_or"])
    parallel.setup("cuda")
    try:
        assert torch.distributed.get_backend() in ("nccl", "cuda:nccl,cpu:gloo")
        got = cuda_step(cfg, 1e-6)
        mp = got["pair"].student._get_fsdp_state()._fsdp_param_group.mp_policy
        assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
        assert torch.isfinite(torch.tensor(got["loss"])) and got["changed"] >= 0.99
    finally:
        parallel.teardown()


def test_memory_bench_at_a_small_shape_on_cuda(tmp_path, load_script):
    module = load_script("bench_memory")
    out = tmp_path / "bench.json"
    env = os.environ.copy()
    try:
        module.main(["--device", "cuda", "--vocab", "32768", "--seq", "256", "--prompt", "8", "--warmup", "1",
                     "--steps", "1", "--modes", "naive,tip", "--chunks", "full", "--budgets", "0.1",
                     "--selectors", "soft_or", "--out", str(out)])
    finally:
        os.environ.clear()
        os.environ.update(env)
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["naive", "tip all", "tip soft_or"] and all(r["peak_mb"] > 0 for r in rows)


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_cache():
    """The CPU tests' kernels (one per dtype and for one-row chunks) count toward torch.compile's recompile limit of
    the same functions; CUDA's start from an empty cache."""
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_compiled_loss_and_scoring_on_cuda_match_float64(dtype, rel):
    """loss.backend=compiled (auto's choice on CUDA): the Triton kernels' loss, gradients and H/D against float64."""
    from tip_cli.losses import LossSpec, selected_token_loss
    from tip_cli.selection.scores import ScoreSpec
    from tip_cli.teacher.scoring import score
    from tip_cli.teacher.targets import DenseTeacher

    g = torch.Generator(device="cuda").manual_seed(0)
    k, vocab, d = 300, 5000, 64
    h_s, w_s, h_t, w_t = (torch.randn(*shape, device="cuda", generator=g, dtype=torch.float64)
                          for shape in ((k, d), (vocab, d), (k, d), (vocab, d)))
    low = [t.to(dtype).requires_grad_(i < 2) for i, t in enumerate((h_s, w_s, h_t, w_t))]
    ref = [t.detach().double().requires_grad_(i < 2) for i, t in enumerate(low)]
    loss = selected_token_loss(low[0], low[1], DenseTeacher(low[2], low[3], vocab),
                               LossSpec(vocab, chunk=128, normalizer=float(k), compiled=True))
    logp = (ref[0] @ ref[1].T).log_softmax(-1)
    logq = (ref[2] @ ref[3].T).log_softmax(-1)
    want = (logp.exp() * (logp - logq)).sum() / k
    assert loss.item() == pytest.approx(want.item(), rel=rel)
    for a, b in zip(torch.autograd.grad(loss, low[:2]), torch.autograd.grad(want, ref[:2]), strict=True):
        assert (a.double() - b).norm() <= 3 * rel * b.norm()
    ent, div, _, _, _ = score(low[0].detach(), low[1].detach(), DenseTeacher(low[2], low[3], vocab), vocab, 128,
                           ScoreSpec(), fused=True)
    p = logp.detach().exp()
    torch.testing.assert_close(ent.double(), -(p * logp.detach()).sum(-1), rtol=rel, atol=rel)
    torch.testing.assert_close(div.double(), (p * (logp - logq).detach()).sum(-1), rtol=rel, atol=rel * 10)
