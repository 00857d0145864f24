"""A teacher-student pair from its references: a HF id, a local path, or an embedded pair (`toy://`,
`toy_agent://`, `qwen3_shapes://`, `qwen3_shapes_tiny://` + `teacher|student`), built on first use."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from tip_cli.config.schema import PairConfig
from tip_cli.models import Pair, load_model, load_tokenizer, shared_vocab


def resolve_model(ref: str) -> str:
    """`toy://`, `toy_agent://`, `qwen3_shapes://` or `qwen3_shapes_tiny://` + `teacher|student` -> a cached
    embedded pair (built on first use); else a HF id or path."""
    if ref.startswith("toy://"):
        from tip_cli.toy.build import toy_path

        return str(toy_path(ref.removeprefix("toy://")))
    if ref.split("://")[0] in ("qwen3_shapes", "qwen3_shapes_tiny"):
        from tip_cli.toy.qwen3_shapes import shapes_path

        scheme, kind = ref.split("://", 1)
        return str(shapes_path(scheme, kind))
    if ref.startswith("toy_agent://"):
        from tip_cli.toy.agent_pair import toy_agent_path

        return str(toy_agent_path(ref.removeprefix("toy_agent://")))
    if (ref.startswith((".", "/", "~")) or Path(ref).exists()) and not Path(ref).expanduser().exists():
        raise FileNotFoundError(f"model path {Path(ref).expanduser().resolve()} does not exist")
    return ref


def load_pair(
    cfg: PairConfig, device: torch.device, student_path: str | None = None, load_teacher: bool = True,
    student_dtype: torch.dtype | None = None, teacher_dtype: torch.dtype | None = None,
) -> Pair:
    """Load both models and check they can be distilled; `student_path` (a checkpoint) replaces the student.

    With load_teacher=False only the teacher's tokenizer and config are read (its weights stay on disk). The
    dtypes default to pair.dtype's; the trainer passes its precision's (tip_cli.train.precision: fp32 master weights
    for the student under bf16_mixed, the compute dtype for the teacher).
    """
    s_path = student_path or resolve_model(cfg.student)
    t_path = resolve_model(cfg.teacher)
    tok_s, tok_t = load_tokenizer(s_path, cfg), load_tokenizer(t_path, cfg)
    student = load_model(s_path, cfg, device, trainable=True, dtype=student_dtype)
    if load_teacher:
        teacher = load_model(t_path, cfg, device, trainable=False, dtype=teacher_dtype)
        rows_t = teacher.get_output_embeddings().weight.shape[0]
    else:
        teacher, rows_t = None, AutoConfig.from_pretrained(t_path, trust_remote_code=cfg.trust_remote_code).vocab_size
    rows = (student.get_output_embeddings().weight.shape[0], rows_t)
    # a checkpoint standing in for the student is named as itself: it may come from another pair
    vocab = shared_vocab(tok_s, tok_t, *rows, names=(student_path or cfg.student, cfg.teacher), cfg=cfg)
    return Pair(student, teacher, tok_s, vocab, device, s_path, t_path)
