"""Measuring one mode: its own subprocess (so that its peak is its own), warm-up and measured steps, memory per
phase and time per step; a mode that cannot run here (a missing package, no GPU for Liger, too little memory) is
skipped with the reason, one that crashes (out of memory) reported as an error.

On CPU the peaks are the kernel's VmHWM (reset per phase via /proc/self/clear_refs) with MALLOC_MMAP_THRESHOLD_ set,
so that glibc returns freed tensors to the OS and RSS tracks live tensors; on CUDA they are max_memory_allocated.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tip_cli.cli import compose_config
from tip_cli.models import pick_device
from tip_cli.toy.sft import ModelSpec
from tip_cli.tracking import CudaMemory
from tip_cli.train.chunks import chunk_rows

from .flops import kept_count, total_params
from .peers import liger_loss, naive_loss, tip_runner, trl_runner
from .presets import FULL, Bench, Mode, build_pair, make_batch

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: big buffers via mmap, returned to the OS on free
ENTRY = Path(__file__).resolve().parents[1] / "bench_memory.py"  # `ENTRY --child SPEC OUT` measures one mode


def _proc_kb(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in {path}")


class Meter:
    """Current and peak memory in MB: CUDA allocated on GPU, resident set size on CPU; `reset` restarts the peak."""

    def __init__(self, device: torch.device):
        self.cuda = CudaMemory(device) if device.type == "cuda" else None

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.cuda.allocated() / 2**20
        return _proc_kb("/proc/self/status", "VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.cuda.peak() / 2**20
        return _proc_kb("/proc/self/status", "VmHWM") / 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.cuda.reset_peak()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def model_gb(bench: Bench, device: torch.device) -> float:
    """Weights of both models, plus the student's gradients and AdamW's two moments (in the weights' dtype)."""
    width = bench.weight_dtype(device).itemsize
    return width * (4 * total_params(bench.student, bench.vocab) + total_params(bench.teacher, bench.vocab)) / 2**30


def rough_peak_gb(mode: Mode, bench: Bench) -> float:
    """fp32 [rows, V] tensors the mode holds at its peak, by the counts measured at 2k tokens (README, Performance):
    naive ~8 of [T, V]; tip ~4 of [min(K, loss chunk), V] in the loss (the closed-form reverse KL), ~4 of
    [score chunk, V] while scoring; TRL ~11.5 tiles of [min(N, 4096), 32768]."""
    vocab = bench.vocab
    device = pick_device(bench.device)
    n = bench.tokens
    if mode.kind == "naive":
        elements = 8.5 * bench.batch * (bench.seq + bench.prompt) * vocab
    elif mode.kind == "trl":
        elements = 12 * min(n, 4096) * min(vocab, 32768)
    elif mode.kind == "tip":
        kept = kept_count(mode, n)
        chunk = n if mode.chunk == FULL else chunk_rows(mode.chunk, vocab, device)
        score = min(n, chunk_rows(bench.score_chunk, vocab, device))
        elements = max(4.5 * min(kept, chunk), 4.5 * score) * vocab
    else:
        return 0.0
    return elements * 4 / 2**30


def skip_reason(mode: Mode, bench: Bench) -> str | None:
    """Why `mode` cannot run here: a missing package, no GPU for Liger, or (on CPU) too little free memory, which
    would bring the kernel's OOM killer onto whatever process is largest, not necessarily ours."""
    device = pick_device(bench.device)
    if mode.kind == "trl" and not _importable("trl"):
        return "trl not installed: pip install -e '.[bench]'"
    if mode.kind == "liger":
        if device.type != "cuda":
            return "liger-kernel's fused linear JSD needs Triton on a GPU"
        if not _importable("liger_kernel"):
            return "liger-kernel not installed: pip install liger-kernel"
    if device.type == "cpu":
        need = rough_peak_gb(mode, bench) + (0 if bench.model else model_gb(bench, device))
        free = _proc_kb("/proc/meminfo", "MemAvailable") / 2**20
        if need > 0.9 * free:
            return f"needs ~{need:.0f} GiB, {free:.0f} GiB available"
    return None


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def measure(mode: Mode, bench: Bench) -> dict:
    """Build the pair, run warm-up + measured steps of `mode`, return its memory and time per step:

        peak      = peak over the whole step      - the model-only baseline (RSS or CUDA allocated once models exist)
        loss+bwd  = peak over loss and backward   - the memory held when the step starts (models + AdamW state)
    """
    if reason := skip_reason(mode, bench):
        return {"skipped": reason}
    device = pick_device(bench.device)
    pair = build_pair(bench)
    batch = make_batch(bench, pair.vocab, device)
    meter = Meter(device)
    loss_chunk = None
    if mode.kind == "tip":
        cfg = compose_config(mode.overrides(bench))
        step_fn, loss_chunk = tip_runner(cfg), chunk_rows(cfg.loss.chunk_size, pair.vocab, device)
    else:
        step_fn = trl_runner(pair) if mode.kind == "trl" else {"naive": naive_loss, "liger": liger_loss}[mode.kind]
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=1e-6)
    gc.collect()
    baseline = meter.now()
    rows = []
    for _ in range(bench.warmup + bench.steps):
        gc.collect()
        start = meter.now()
        times: dict = {}
        meter.reset()
        t0 = time.perf_counter()
        with bench.autocast(device):
            loss = step_fn(pair, batch, meter, times)
        loss_peak = meter.peak()
        meter.reset()
        torch.nn.utils.clip_grad_norm_(pair.student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        step_peak = max(times.get("pre_loss_peak", 0.0), loss_peak, meter.peak())
        rows.append({
            "loss": loss, "step_s": step_s, "peak_mb": step_peak - baseline, "loss_peak_mb": loss_peak - start,
            "select_s": times.get("time/select"), "teacher_s": times.get("time/teacher"), "kept": times.get("kept"),
        })
    first_loss = rows[0]["loss"]  # same weights and tokens in every mode: full-token modes agree here
    warmup, rows = rows[: bench.warmup], rows[bench.warmup :]
    shares = [r["select_s"] / r["step_s"] for r in rows if r["select_s"] is not None]
    n_tokens = int(batch.target_mask.sum())
    step_s = statistics.median(r["step_s"] for r in rows)
    return {
        "n_tokens": n_tokens,
        "kept": rows[-1]["kept"] if rows[-1]["kept"] is not None else n_tokens,
        "loss_chunk": loss_chunk,
        "first_loss": first_loss,
        "baseline_mb": baseline,
        "peak_mb": max(r["peak_mb"] for r in rows),
        "loss_peak_mb": max(r["loss_peak_mb"] for r in rows),
        "step_s": step_s,
        "tokens_per_s": n_tokens / step_s,
        "select_share": statistics.median(shares) if shares else None,
        "steps": rows,
        "warmup_steps": warmup,
    }


def child_main(spec_path: str, out_path: str) -> None:
    """The subprocess's side of `run_mode`: measure the mode the spec file names, write the result as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    shapes = {key: ModelSpec(**spec["bench"][key]) for key in ("student", "teacher")}
    bench = Bench(**{**spec["bench"], **shapes})
    result = measure(Mode(**spec["mode"]), bench)
    Path(out_path).write_text(json.dumps(result))


def run_mode(mode: Mode, bench: Bench, timeout: float | None = None) -> dict:
    """Measure `mode` in a fresh Python process (clean peak); a crash (e.g. out of memory) becomes an `error`."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"mode": asdict(mode), "bench": asdict(bench)}))
        cmd = [sys.executable, str(ENTRY), "--child", str(spec), str(out)]
        env = {**os.environ, **MMAP_ENV, **({"OMP_NUM_THREADS": str(bench.threads)} if bench.threads else {})}
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
            return {"error": f"exit {proc.returncode}{killed}: {tail[0]}"}
        return json.loads(out.read_text())
