"""Which teacher scorer a run uses: the in-process teacher (None here: tip_cli.teacher.targets runs the model), or
top-K log-probs from an in-process vLLM engine (vllm) or from `vllm serve` replicas (server)."""

from __future__ import annotations

from pathlib import Path

import torch

from tip_cli.config.schema import TeacherConfig
from tip_cli.models import Pair


def make_scorer(teacher: TeacherConfig, seed: int, pair: Pair, dtype: torch.dtype, run_dir: Path):
    """The teacher's top-K scorer when teacher.backend is vllm_topk or vllm_server; None for the in-process teacher.
    A vLLM engine computes in `dtype` (the pair's under train.precision), seeded with `seed`."""
    if teacher.backend == "vllm_topk":
        from tip_cli.teacher.vllm import VLLMTeacher

        return VLLMTeacher(pair.teacher_path, teacher.vllm, dtype, teacher.topk, seed)
    if teacher.backend == "vllm_server":  # the same top-K from running `vllm serve` replicas
        from tip_cli.teacher.server import ServerTeacher

        return ServerTeacher.connect(teacher, pair.tokenizer, pair.vocab, run_dir)
    return None
