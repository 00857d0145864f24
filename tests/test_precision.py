"""train.precision on CPU bf16: fp32 master weights make small AdamW steps land, pure bf16 rounds them away, and
bf16_mixed matches fp32 within bf16 tolerance; the HF export keeps the pair's dtype while the master weights resume."""

import warnings

import pytest
import torch
from safetensors import safe_open

from tip_cli.checkpoint import STATE_FILE
from tip_cli.cli import compose_config
from tip_cli.pairs import load_pair
from tip_cli.rollout.batch import pack
from tip_cli.train import precision, recipe
from tip_cli.train import step as train_step

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
RESPONSES = [[20, 21, 22, 40, 41], [23, 42, 43], [24, 25, 26, 27], [28, 29, 44]]


def step_once(micro_overrides, mode: str, lr: float, extra=()) -> dict:
    """One distill_step + AdamW step of the micro pair under train.precision=mode, on CPU."""
    cfg = compose_config([*micro_overrides, f"train.precision={mode}", f"optim.lr={lr}", "selector=soft_or",
                          "budget=0.5", "optim.grad_clip=0", *extra])
    prec = precision.resolve(cfg.train.precision, cfg.pair.dtype, torch.device("cpu"))
    pair = load_pair(cfg.pair, torch.device("cpu"), student_dtype=prec.master, teacher_dtype=prec.pair)
    before = {n: p.detach().clone() for n, p in pair.student.named_parameters()}
    batch = pack(PROMPTS, RESPONSES, pair.tokenizer.pad_token_id)
    metrics, _, _ = train_step.distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    grads = {n: p.grad.detach().clone() for n, p in pair.student.named_parameters()}
    torch.optim.AdamW(pair.student.parameters(), lr=lr, weight_decay=0.0).step()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in pair.student.named_parameters())
    total = sum(p.numel() for p in pair.student.parameters())
    return {"loss": metrics["loss"], "grads": grads, "changed": changed / total, "prec": prec,
            "dtypes": {p.dtype for p in pair.student.parameters()}, "teacher": pair.teacher.dtype}


def test_one_bf16_mixed_adamw_step_at_lr_1e_6_changes_almost_every_parameter(micro_overrides):
    mixed = step_once(micro_overrides, "bf16_mixed", 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pure = step_once(micro_overrides, "bf16", 1e-6)
    assert mixed["dtypes"] == {torch.float32} and mixed["teacher"] == torch.bfloat16  # fp32 master, bf16 teacher
    assert pure["dtypes"] == {torch.bfloat16}
    assert mixed["changed"] >= 0.99, mixed["changed"]
    assert pure["changed"] < 0.2, pure["changed"]  # the update is below most weights' bf16 spacing


def test_bf16_mixed_loss_and_gradients_match_fp32_within_bf16_tolerance(micro_overrides):
    ref = step_once(micro_overrides, "fp32", 1e-4)
    mixed = step_once(micro_overrides, "bf16_mixed", 1e-4)
    assert ref["prec"].compute == torch.float32 and mixed["prec"].compute == torch.bfloat16
    assert mixed["loss"] == pytest.approx(ref["loss"], rel=3e-2)
    got = torch.cat([g.flatten() for g in mixed["grads"].values()])
    want = torch.cat([g.flatten() for g in ref["grads"].values()])
    assert got.dtype == torch.float32  # gradients land on the fp32 master weights
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 5e-2, rel
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    assert cos > 0.998, cos
    # and bf16 compute did run: the gradients are not bit-identical to fp32's
    assert not torch.equal(got, want)


def test_pure_bf16_warns_at_small_learning_rates():
    prec = precision.resolve("bf16", "auto", torch.device("cpu"))
    with pytest.warns(UserWarning, match="bf16_mixed"):
        precision.warn_pure_bf16(prec, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_pure_bf16(prec, 1e-4)
        precision.warn_pure_bf16(precision.resolve("bf16_mixed", "auto", torch.device("cpu")), 1e-6)


def test_auto_precision_by_device():
    assert precision.resolve("auto", "auto", torch.device("cpu")).mode == "fp32"
    cuda = precision.resolve("auto", "auto", torch.device("cuda"))
    assert (cuda.mode, cuda.master, cuda.compute, cuda.pair) == ("bf16_mixed", torch.float32, torch.bfloat16, torch.bfloat16)
    with pytest.raises(Exception, match="bf16_mixed"):
        compose_config(["train.precision=fp16"])


def test_export_keeps_the_pair_dtype_and_resume_continues_from_the_master_weights(tmp_path, micro_overrides):
    base = [*micro_overrides, "train.precision=bf16_mixed", "pair.dtype=bfloat16", "train.save_every=1",
            "train.eval_before=false", "train.token_sample_every=0", "optim.lr=1e-6"]
    recipe.train(compose_config([*base, "train.steps=1"]), tmp_path)
    ckpt = tmp_path / "checkpoints" / "step_1"
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    master = torch.load(ckpt / STATE_FILE, weights_only=False)["master_weights"]
    assert {v.dtype for v in master.values() if v.is_floating_point()} == {torch.float32}
    # a resumed run starts from the fp32 weights, not from their bf16 rounding in the export
    cfg = compose_config([*base, "train.steps=2"])
    pair = load_pair(cfg.pair, torch.device("cpu"), student_path=str(ckpt), student_dtype=torch.float32)
    rounded = {n: p.detach().clone() for n, p in pair.student.named_parameters()}
    from tip_cli.checkpoint import latest_checkpoint
    from tip_cli.train import checkpoints

    opt = torch.optim.AdamW(pair.student.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    assert checkpoints.resume(latest_checkpoint(tmp_path), pair.student, opt, sched) == 1
    for n, p in pair.student.named_parameters():
        assert torch.equal(p.detach(), master[n])
    assert any(not torch.equal(rounded[n], master[n]) for n in rounded)  # the export alone would have lost bits


def test_head_gradient_adds_up_in_fp32_under_bf16_compute(monkeypatch):
    """Under bf16 compute each loss chunk's head gradient is a bf16 product; across chunks and micro-batches they
    must add up in fp32 onto the fp32 master weight, not be rounded to bf16 on the way (a bf16 copy's gradient)."""
    from tip_cli import losses
    from tip_cli.teacher.targets import DenseTeacher

    g = torch.Generator().manual_seed(0)
    vocab, d, rows, micro = 96, 16, 40, 6
    weight = (torch.randn(vocab, d, generator=g) * 0.5).requires_grad_()  # the fp32 master lm_head
    hidden = torch.randn(rows * micro, d, generator=g).bfloat16()  # the student's bf16 hidden states
    teacher = DenseTeacher(torch.randn(rows * micro, d, generator=g).bfloat16(),
                           (torch.randn(vocab, d, generator=g) * 0.5).bfloat16(), vocab)
    spec = losses.LossSpec(vocab, chunk=8, normalizer=rows * micro)
    parts: list[list[torch.Tensor]] = []  # each micro-batch's chunk head gradients, as the chunks computed them
    chunk = losses._reverse_kl_chunk

    def recorded(*args):
        out = chunk(*args)
        assert out[2].dtype == torch.bfloat16  # the chunk's product is in the compute dtype
        parts[-1].append(out[2].double())
        return out

    monkeypatch.setattr(losses, "_reverse_kl_chunk", recorded)
    for m in range(micro):
        parts.append([])
        part = slice(m * rows, (m + 1) * rows)
        losses.selected_token_loss(hidden[part], weight, teacher.rows(part), spec).backward()

    assert weight.grad.dtype == torch.float32
    exact = sum(sum(p) for p in parts)  # float64 sum of the chunks' contributions
    fp32_err = ((weight.grad.double() - exact).norm() / exact.norm()).item()
    # the same contributions with each micro-batch's sum rounded to bf16 before the fp32 .grad adds it
    bf16_err = ((sum(sum(p).float().bfloat16().double() for p in parts) - exact).norm() / exact.norm()).item()
    assert fp32_err < 1e-6 < 1e-4 < bf16_err, (fp32_err, bf16_err)

    # and the contributions are the head gradient: float64 autograd of the same loss on the bf16 inputs, within
    # what bf16 logits and a bf16 dL/dz allow
    w64 = weight.detach().bfloat16().double().requires_grad_()
    logp_s = torch.log_softmax(hidden.double() @ w64.T, -1)
    logp_t = torch.log_softmax(teacher.hidden.double() @ teacher.weight.double().T, -1)
    ((logp_s.exp() * (logp_s - logp_t)).sum() / (rows * micro)).backward()
    assert ((weight.grad.double() - w64.grad).norm() / w64.grad.norm()).item() < 2e-2
