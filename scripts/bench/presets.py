"""What the benchmark runs: model shapes (random-init Qwen3 presets, or a checkpoint's sizes), the settings of a run
(`Bench`), the modes compared (`Mode`), and the pair and tokens every mode steps on."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tip_cli.models import Pair, enable_checkpointing, head_weight, pick_device
from tip_cli.rollout.batch import Batch, pack
from tip_cli.toy import build as toy_build
from tip_cli.toy.sft import ModelSpec

FULL = "full"  # loss chunk >= N: the loss holds all K kept rows at once (its O(K x V) regime)
QWEN3_VOCAB = 151_936
# Random-init model presets (Qwen3 architecture). The Qwen3 rows are the published configs' sizes.
MODELS: dict[str, ModelSpec] = {
    "toy-student": toy_build.STUDENT,
    "toy-teacher": toy_build.TEACHER,
    # Qwen3-1.7B / Qwen3-8B scaled down 8x in width (and the vocabulary 37x), so that the lm_head and loss are about
    # the same share of the step's FLOPs as at the real shapes (12% vs 11%, step_flops), unlike the toy pair (92%)
    "small-student": ModelSpec(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=768),
    "small-teacher": ModelSpec(hidden=512, layers=6, heads=8, kv_heads=2, intermediate=1536, tie_embeddings=False),
    "qwen3-0.6b": ModelSpec(hidden=1024, layers=28, heads=16, kv_heads=8, intermediate=3072, head_dim=128),
    "qwen3-1.7b": ModelSpec(hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144, head_dim=128),
    "qwen3-4b": ModelSpec(hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728, head_dim=128),
    "qwen3-8b": ModelSpec(hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, head_dim=128,
                          tie_embeddings=False),
}


@dataclass(frozen=True)
class Preset:
    """A named pair and the defaults it runs at (each can be overridden on the command line)."""

    pair: str  # STUDENT:TEACHER of MODELS
    vocab: int
    seq: int  # response tokens per row
    batch: int


PRESETS: dict[str, Preset] = {
    "toy": Preset("toy-student:toy-teacher", QWEN3_VOCAB, seq=2048, batch=1),
    "small": Preset("small-student:small-teacher", 4096, seq=512, batch=1),
    "qwen3": Preset("qwen3-1.7b:qwen3-8b", QWEN3_VOCAB, seq=4096, batch=2),  # Qwen3-8B teaching Qwen3-1.7B
}
PRECISIONS = ("auto", "fp32", "bf16", "bf16_mixed")


def resolve_shape(shape: str) -> tuple[ModelSpec, ModelSpec, Preset]:
    """`--shape` -> (student, teacher, defaults): a PRESETS name, or STUDENT:TEACHER of MODELS (Qwen3 defaults)."""
    preset = PRESETS.get(shape) or next((p for p in PRESETS.values() if p.pair == shape), None)
    preset = preset or Preset(shape, QWEN3_VOCAB, seq=4096, batch=2)
    names = preset.pair.split(":")
    unknown = [n for n in names if n not in MODELS]
    if len(names) != 2 or unknown:
        raise SystemExit(f"--shape {shape!r}: expected one of {', '.join(PRESETS)} or STUDENT:TEACHER of "
                         f"{', '.join(MODELS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return MODELS[names[0]], MODELS[names[1]], preset


def spec_of(ref: str) -> tuple[ModelSpec, int]:
    """A checkpoint's sizes (Qwen/Llama-style configs), for the FLOP estimate, and its vocabulary."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(ref).get_text_config()
    heads = c.num_attention_heads
    spec = ModelSpec(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
                     kv_heads=getattr(c, "num_key_value_heads", None) or heads, intermediate=c.intermediate_size,
                     head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                     tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
    return spec, c.vocab_size


@dataclass(frozen=True)
class Bench:
    vocab: int = QWEN3_VOCAB
    student: ModelSpec = toy_build.STUDENT
    teacher: ModelSpec = toy_build.TEACHER
    shape: str = "toy"
    model: str | None = None  # HF id or path of the student (the random pair when None)
    teacher_model: str | None = None  # defaults to `model`
    seq: int = 2048  # response tokens per row
    prompt: int = 32  # prompt tokens per row
    batch: int = 1
    warmup: int = 1
    steps: int = 3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | bf16_mixed
    grad_checkpointing: bool = False  # on the student, in every mode
    threads: int = 0  # CPU threads per mode (0: torch's default, one per core)
    score_chunk: int | None = None  # tip's importance.chunk_size (rows scored at once) when not the default

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    def precision_on(self, device: torch.device) -> str:
        return ("bf16" if device.type == "cuda" else "fp32") if self.precision == "auto" else self.precision

    def weight_dtype(self, device: torch.device) -> torch.dtype:
        """bf16 weights only in pure bf16; bf16_mixed keeps fp32 master weights and autocasts."""
        return torch.bfloat16 if self.precision_on(device) == "bf16" else torch.float32

    def autocast(self, device: torch.device):
        if self.precision_on(device) == "bf16_mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()


@dataclass(frozen=True)
class Mode:
    kind: str  # naive | tip | trl | liger
    selector: str = "all"
    budget: float = 1.0
    chunk: int | str | None = None  # tip's loss.chunk_size: None = the product default, FULL = N
    backend: str = "auto"  # tip's loss.backend (auto: compiled kernels on CUDA, eager on CPU)

    @property
    def name(self) -> str:
        if self.kind != "tip":
            return self.kind
        return f"tip {self.selector}" + ("" if self.backend == "auto" else f" [{self.backend}]")

    def overrides(self, bench: Bench) -> list[str]:
        """tip's config overrides for this mode."""
        chunk = bench.tokens if self.chunk == FULL else self.chunk
        return [f"selector={self.selector}", f"budget={self.budget}", f"loss.backend={self.backend}",
                *([f"loss.chunk_size={chunk}"] if chunk else []),
                *([f"importance.chunk_size={bench.score_chunk}"] if bench.score_chunk else [])]


def default_modes(
    chunks: list[int | str | None], budgets=(0.5, 0.3, 0.1), selectors=("soft_or", "entropy"), backends=("auto",)
) -> list[Mode]:
    """naive, TRL, Liger, then per loss chunk: tip full-token and tip at the budgets. At the default chunk every
    selector at every budget; at other chunks, to save time, the first selector at the highest and lowest budget
    (memory depends on how many tokens are kept, not on which). Each tip mode once per loss.backend of `backends`."""
    modes = [Mode("naive"), Mode("trl"), Mode("liger")]
    for backend in backends:
        for chunk in chunks:
            modes.append(Mode("tip", "all", 1.0, chunk, backend))
            if chunk is None:
                modes += [Mode("tip", sel, b, chunk, backend) for sel in selectors for b in budgets]
            else:
                modes += [Mode("tip", selectors[0], b, chunk, backend) for b in dict.fromkeys((max(budgets), min(budgets)))]
    return modes


def qwen3(spec: ModelSpec, vocab: int, dtype: torch.dtype, device: torch.device):
    """A random-init Qwen3 causal LM, created on `device` in `dtype` (no fp32 CPU copy first)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        intermediate_size=spec.intermediate, max_position_embeddings=32_768, tie_word_embeddings=spec.tie_embeddings,
    )
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_pair(bench: Bench) -> Pair:
    """The student (trainable) and teacher (frozen) at the benchmark's device and dtype; same seed, same weights."""
    from transformers import AutoModelForCausalLM

    device = pick_device(bench.device)
    dtype = bench.weight_dtype(device)
    torch.manual_seed(bench.seed)
    if bench.model:
        student = AutoModelForCausalLM.from_pretrained(bench.model, dtype=dtype, device_map=device)
        teacher = AutoModelForCausalLM.from_pretrained(bench.teacher_model or bench.model, dtype=dtype,
                                                       device_map=device)
    else:
        student, teacher = qwen3(bench.student, bench.vocab, dtype, device), qwen3(bench.teacher, bench.vocab, dtype, device)
    student.train().requires_grad_(True)
    teacher.eval().requires_grad_(False)
    if bench.grad_checkpointing:
        enable_checkpointing(student)
    vocab = min(head_weight(student).shape[0], head_weight(teacher).shape[0])
    return Pair(student, teacher, None, vocab, device)


def make_batch(bench: Bench, vocab: int, device: torch.device) -> Batch:
    """`batch` rows of random prompt + response tokens, all of the same length (no padding)."""
    gen = torch.Generator().manual_seed(bench.seed + 1)
    rows = [torch.randint(0, vocab, (bench.prompt + bench.seq,), generator=gen).tolist() for _ in range(bench.batch)]
    return pack([r[: bench.prompt] for r in rows], [r[bench.prompt :] for r in rows], pad_id=0).to(device)
