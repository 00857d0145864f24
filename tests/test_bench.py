"""The memory benchmark's harness (scripts/bench_memory.py and its parts in scripts/bench/) on a tiny config: report
schema, ratios, budget order, shapes, precisions, gradient checkpointing, the Liger call and the FLOP estimate.

The numbers themselves live in the benchmark (README, Performance); nothing here asserts on time.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from tip_cli.cli import compose_config

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))  # the bench/ package, found as `python scripts/bench_memory.py` finds it
from bench import flops, measure, peers, presets  # noqa: E402

ROW_KEYS = {"mode", "selector", "budget", "chunk", "n_tokens", "kept", "loss_chunk", "first_loss", "baseline_mb",
            "peak_mb", "loss_peak_mb", "step_s", "select_share", "steps", "tokens_per_s", "step_flops", "head_flops",
            "head_share"}


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_memory")


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    """naive, tip full-token and tip soft_or 0.1 with the loss chunk >= N, each in its own process (one thread:
    the machine may be shared, and two contended threads make small ops many times slower)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    bench.main(["--vocab", "32768", "--seq", "256", "--prompt", "8", "--warmup", "1", "--steps", "1", "--threads", "1",
                "--modes", "naive,tip", "--chunks", "full", "--budgets", "0.1", "--selectors", "soft_or",
                "--out", str(out)])
    return json.loads(out.read_text())


def test_report_has_one_measured_row_per_mode(report):
    assert [(r["mode"], r["budget"]) for r in report["rows"]] == [
("naive", 1.0), ("tip all", 1.0), ("tip soft_or", 0.1)]
    for row in report["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["n_tokens"] == 256 and len(row["steps"]) == 1
        assert row["peak_mb"] > 0 and row["loss_peak_mb"] > 0 and row["step_s"] > 0
    assert [r["kept"] for r in report["rows"]] == [256, 256, 26]
    assert all(r["loss_chunk"] == 256 for r in report["rows"][1:])
    assert "targets" not in report  # the bench reports its measurements, not verdicts against fixed numbers
    assert {"head_share_full_token", "best_case_step_x_full", "tip_step_x_full"} <= set(report["flops"])
    naive, full = report["rows"][0], report["rows"][1]
    assert full["first_loss"] == pytest.approx(naive["first_loss"], rel=1e-4)  # same models, tokens and loss


def test_ratios_are_computed_from_the_measured_numbers(report):
    naive, full = report["rows"][0], report["rows"][1]
    for row in report["rows"]:
        for key in ("peak_mb", "loss_peak_mb", "step_s"):
            assert row[f"{key}_x_naive"] == pytest.approx(row[key] / naive[key])
            assert row[f"{key}_x_tip_full"] == pytest.approx(row[key] / full[key])
        assert row["tokens_per_s"] == pytest.approx(row["n_tokens"] / row["step_s"])


def test_lower_budget_never_uses_more_loss_memory(report):
    full, low = report["rows"][1], report["rows"][2]  # budgets 1.0 and 0.1
    assert low["loss_peak_mb"] <= full["loss_peak_mb"] and low["peak_mb"] <= full["peak_mb"]


def test_ratios_and_table_read_the_rows(bench):
    rows = [
        {"mode": "naive", "selector": "all", "budget": 1.0, "chunk": None, "kept": 8, "loss_chunk": None,
         "peak_mb": 100.0, "loss_peak_mb": 80.0, "step_s": 2.0, "select_share": None},
        {"mode": "tip all", "selector": "all", "budget": 1.0, "chunk": None, "kept": 8, "loss_chunk": 4,
         "peak_mb": 50.0, "loss_peak_mb": 40.0, "step_s": 4.0, "select_share": 0.2},
        {"mode": "tip soft_or", "selector": "soft_or", "budget": 0.5, "chunk": None, "kept": 4, "loss_chunk": 4,
         "peak_mb": 30.0, "loss_peak_mb": 16.0, "step_s": 3.0, "select_share": 0.25},
        {"mode": "trl", "selector": "all", "budget": 1.0, "chunk": None, "error": "exit -9 (killed: out of memory?)"},
    ]
    bench.add_ratios(rows)
    assert rows[2]["loss_peak_mb_x_tip_full"] == pytest.approx(0.4)
    assert rows[1]["peak_mb_x_naive"] == pytest.approx(0.5)
    assert rows[2]["step_s_x_tip_full"] == pytest.approx(0.75) and rows[0]["step_s_x_tip_full"] == pytest.approx(0.5)
    assert "peak_mb_x_naive" not in rows[3]  # trl failed: no ratios
    table = bench.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "out of memory" in table


def test_backends_are_compared_side_by_side(bench):
    """--backends eager,compiled: each tip mode once per loss.backend, its overrides carry it, ratios of full-token
    are taken within a backend, and backend_text compares each to the first."""
    modes = presets.default_modes([None], (0.1,), ("soft_or",), ("eager", "compiled"))
    assert [m.name for m in modes][3:] == ["tip all [eager]", "tip soft_or [eager]", "tip all [compiled]",
                                           "tip soft_or [compiled]"]
    assert "loss.backend=compiled" in modes[-1].overrides(presets.Bench())
    rows = [{"mode": m.name, "selector": m.selector, "budget": m.budget, "chunk": None, "backend": m.backend,
             "kept": 4, "loss_chunk": 4, "peak_mb": 10.0, "loss_peak_mb": 5.0, "step_s": s, "select_share": share}
            for m, s, share in zip(modes[3:], (4.0, 3.0, 2.0, 1.2), (0.01, 0.3, 0.01, 0.1), strict=True)]
    bench.add_ratios(rows)
    assert [r["step_s_x_tip_full"] for r in rows] == pytest.approx([1.0, 0.75, 1.0, 0.6])
    text = bench.backend_text(rows).splitlines()
    assert text == ["- tip all 1: loss.backend=compiled / eager: s/step 0.50x; scoring+selection 1% vs 1%",
                    "- tip soft_or 0.1: loss.backend=compiled / eager: s/step 0.40x; scoring+selection 10% vs 30%"]


def test_naive_tip_and_trl_steps_compute_the_same_reverse_kl(bench):
    pytest.importorskip("trl")
    tiny = presets.Bench(vocab=2048, seq=24, prompt=6, batch=2)
    pair = presets.build_pair(tiny)
    batch = presets.make_batch(tiny, pair.vocab, pair.device)
    meter = measure.Meter(pair.device)
    cfg = compose_config(presets.Mode("tip").overrides(tiny))
    naive = peers.naive_loss(pair, batch, meter, {})
    tip = peers.tip_runner(cfg)(pair, batch, meter, {})
    trl = peers.trl_runner(pair)(pair, batch, meter, {})
    assert naive > 0 and tip == pytest.approx(naive, rel=1e-5) and trl == pytest.approx(naive, rel=1e-4)


def test_liger_is_skipped_without_a_gpu(bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "GPU" in measure.measure(presets.Mode("liger"), presets.Bench())["skipped"]


TINY = dict(vocab=1024, seq=40, prompt=8, batch=2)


def tiny_bench(bench, **kw):
    """A pair of a few hundred thousand parameters, an untied teacher as at the real shapes."""
    spec = presets.ModelSpec
    return presets.Bench(student=spec(64, 2, 1, 1, 128), teacher=spec(128, 2, 2, 1, 256, tie_embeddings=False),
                       **{**TINY, **kw})


def test_shapes_resolve_to_presets_or_student_teacher_pairs(bench):
    student, teacher, preset = presets.resolve_shape("qwen3-1.7b:qwen3-8b")
    assert (student, teacher) == (presets.MODELS["qwen3-1.7b"], presets.MODELS["qwen3-8b"])
    assert presets.resolve_shape("qwen3")[:2] == (student, teacher) and preset.vocab == 151_936
    assert presets.resolve_shape("toy")[:2] == (presets.toy_build.STUDENT, presets.toy_build.TEACHER)
    with pytest.raises(SystemExit, match="qwen3-8b"):
        presets.resolve_shape("qwen3-1.7b:qwen3-9b")
    args = bench.parse_args(["--shape", "small", "--seq", "64"])
    b = bench.bench_from_args(args)
    assert (b.seq, b.batch, b.vocab, b.student) == (64, 1, 4096, presets.MODELS["small-student"])


def test_qwen3_shapes_build_on_the_device_in_the_compute_dtype(bench):
    """On the meta device (no memory): every tensor is created there and in bf16, and the sizes are the published
    ones (Qwen3-1.7B: 1.7B parameters, 1.4B without embeddings; Qwen3-8B: 8.2B, 6.95B)."""
    vocab = presets.QWEN3_VOCAB
    for name, total, backbone in (("qwen3-1.7b", 1.7e9, 1.4e9), ("qwen3-8b", 8.2e9, 6.95e9)):
        spec = presets.MODELS[name]
        model = presets.qwen3(spec, vocab, torch.bfloat16, torch.device("meta"))
        tensors = list(model.parameters()) + list(model.buffers())
        assert {t.device.type for t in tensors} == {"meta"}
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        count = sum(p.numel() for p in model.parameters())
        assert count == pytest.approx(total, rel=0.02) and count == pytest.approx(flops.total_params(spec, vocab), rel=1e-3)
        assert flops.backbone_params(spec) == pytest.approx(backbone, rel=0.02)


def _step(bench, mode, pair, batch, b):
    meter = measure.Meter(pair.device)
    if mode.kind == "naive":
        return peers.naive_loss(pair, batch, meter, {})
    if mode.kind == "trl":
        return peers.trl_runner(pair)(pair, batch, meter, {})
    return peers.tip_runner(compose_config(mode.overrides(b)))(pair, batch, meter, {})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flop_estimate_matches_the_matmuls_torch_counts(bench, checkpointing):
    """step_flops' weight and lm_head terms against torch's FlopCounterMode over a whole step (forward, scoring,
    loss, backward): exact without checkpointing; with it, HF recomputes slightly less than a full forward."""
    from torch.utils.flop_counter import FlopCounterMode

    b = tiny_bench(bench, grad_checkpointing=checkpointing)
    modes = [presets.Mode("naive"), presets.Mode("tip"), presets.Mode("tip", "soft_or", 0.25)]
    if importlib.util.find_spec("trl"):
        modes.append(presets.Mode("trl"))
    for mode in modes:
        pair = presets.build_pair(b)
        batch = presets.make_batch(b, pair.vocab, pair.device)
        with FlopCounterMode(display=False) as counter:
            _step(bench, mode, pair, batch, b)
        matmuls = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
        parts = flops.flop_parts(mode, b)
        assert matmuls == pytest.approx(parts["backbone"] + parts["head"], rel=0.03 if checkpointing else 1e-9), mode


def test_checkpointing_and_precisions_keep_the_loss_and_gradients(bench):
    """Gradient checkpointing changes neither the loss nor the gradients; bf16_mixed keeps fp32 weights and bf16
    keeps bf16 ones, both within bf16 rounding of the fp32 loss; tip agrees with naive in each."""
    grads, losses = {}, {}
    for name, kw in (("fp32", {}), ("ckpt", {"grad_checkpointing": True}), ("mixed", {"precision": "bf16_mixed"}),
                     ("bf16", {"precision": "bf16"})):
        b = tiny_bench(bench, **kw)
        for mode in (presets.Mode("naive"), presets.Mode("tip")):
            pair = presets.build_pair(b)
            assert pair.student.is_gradient_checkpointing == (name == "ckpt")
            want = torch.bfloat16 if name == "bf16" else torch.float32
            assert {p.dtype for p in pair.student.parameters()} == {want}
            batch = presets.make_batch(b, pair.vocab, pair.device)
            with b.autocast(pair.device):
                losses[name, mode.kind] = _step(bench, mode, pair, batch, b)
            grads[name, mode.kind] = pair.student.model.layers[0].mlp.up_proj.weight.grad.float()
    ref = losses["fp32", "naive"]
    assert losses["fp32", "tip"] == pytest.approx(ref, rel=1e-5)
    for kind in ("naive", "tip"):
        assert losses["ckpt", kind] == pytest.approx(ref, rel=1e-5)
        torch.testing.assert_close(grads["ckpt", kind], grads["fp32", kind], rtol=1e-4, atol=1e-8)
        assert losses["mixed", kind] == pytest.approx(ref, rel=0.05)
        assert losses["bf16", kind] == pytest.approx(ref, rel=0.05)


def test_liger_mode_calls_the_0_8_5_signature(bench, monkeypatch):
    """liger-kernel 0.8.5's LigerFusedLinearJSD.forward takes shift_labels as a required fifth argument; a stand-in
    with that signature and the reverse KL of beta = 1 gives the naive step's loss."""

    class FusedLinearJSD(torch.nn.Module):
        def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0):
            super().__init__()
            assert jsd_beta == 1.0
            self.seen_labels = "unset"

        def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels):
            assert shift_labels is None
            logp_s = (student_input @ student_weight.T).float().log_softmax(-1)
            logp_t = (teacher_input @ teacher_weight.T).float().log_softmax(-1)
            return (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean()

    package, module = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearJSD = FusedLinearJSD
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    b = tiny_bench(bench)
    pair = presets.build_pair(b)
    batch = presets.make_batch(b, pair.vocab, pair.device)
    naive = _step(bench, presets.Mode("naive"), pair, batch, b)
    assert peers.liger_loss(pair, batch, measure.Meter(pair.device), {}) == pytest.approx(naive, rel=1e-5)


def test_kernel_bench_times_both_backends_of_both_kernels(capsys, load_script):
    module = load_script("bench_kernels")
    report = module.main(["--rows", "8", "--vocab", "64", "--dim", "8", "--repeat", "1", "--device", "cpu"])
    for name in ("scoring H, D", "loss + gradients"):
        assert report[name]["eager_s"] > 0 and report[name]["compiled_s"] > 0
    out = capsys.readouterr().out
    assert out.count("compiled") == 2 and "chunk [8, 64]" in out
