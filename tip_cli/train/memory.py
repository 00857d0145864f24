"""GPU memory of a training run, from the models' shapes: what stays resident, what a micro-batch's activations add,
and how many tokens of KV cache a vLLM engine gets. Arithmetic, not a measurement (scripts/bench_memory.py measures).

    resident     student: weights + grads + AdamW m and v (16 bytes a parameter under bf16_mixed: all fp32), and the
                 bf16 copy of its weights autocast keeps; teacher: its weights in bf16 (2 bytes a parameter)
    activations  what autograd keeps per token per layer (`activation_bytes`) x layers x the micro-batch's tokens;
                 with gradient checkpointing, each layer's input (2 d bytes) plus one layer recomputed in full
    teacher      its final hidden states at every response position of the rollout batch (the loss reads them)
    vLLM KV      2 (K and V) x layers x kv_heads x head_dim x dtype bytes per token
"""

from __future__ import annotations

from dataclasses import dataclass

GB, GIB = 1e9, 2**30


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's sizes, as in its HF config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2.5
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k

    def params(self) -> int:
        """Parameter count: embeddings (and an untied lm_head), per layer q/k/v/o, the SwiGLU MLP and two norms."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate + 2 * d
        layer += (q + 2 * kv) * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        return self.vocab * d * (1 if self.tied else 2) + self.layers * layer + d

    def activation_bytes(self) -> int:
        """Bytes autograd keeps per token per layer under bf16 autocast with SDPA/flash attention (no T x T term), in
        bf16-sized units of 2 bytes: 2 x (6 d + 3 q + 2 kv + 4 I), plus 2 x 3 (q + kv) with a q/k norm, where
        q = heads x head_dim, kv = kv_heads x head_dim, I = intermediate.

        d: the two RMSNorms' fp32 inputs (2 x 2 units) and bf16 outputs (2); q: the rotated q, the attention output
        and o_proj's input; kv: the rotated k and v; I: the gate and up projections, SiLU(gate) and down_proj's
        input; a q/k norm keeps its fp32 input (2) and bf16 output (1) of q and k."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * (6 * d + 3 * q + 2 * kv + 4 * self.intermediate + 3 * (q + kv) * self.qk_norm)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """vLLM's KV cache per token: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# the published configs (config.json of each checkpoint)
SHAPES = {
    "Qwen/Qwen3-1.7B": Shape(2048, 28, 16, 8, 128, 6144, 151_936, tied=True, qk_norm=True),
    "Qwen/Qwen3-8B": Shape(4096, 36, 32, 8, 128, 12288, 151_936, tied=False, qk_norm=True),
    "Qwen/Qwen2.5-1.5B-Instruct": Shape(1536, 28, 12, 2, 128, 8960, 151_936, tied=True, qkv_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": Shape(3584, 28, 28, 4, 128, 18944, 152_064, tied=False, qkv_bias=True),
    "meta-llama/Llama-3.2-1B-Instruct": Shape(2048, 16, 32, 8, 64, 8192, 128_256, tied=True),
    "meta-llama/Llama-3.1-8B-Instruct": Shape(4096, 32, 32, 8, 128, 14336, 128_256, tied=False),
}


@dataclass(frozen=True)
class Estimate:
    """Bytes of each part of a training step's peak, and the vLLM engine's share while it is awake."""

    student_states: float  # fp32 weights, grads, AdamW m and v
    student_bf16: float  # autocast's bf16 copy of the weights
    teacher_weights: float
    activations: float  # the student's, for one micro-batch
    teacher_hidden: float  # [N, d_T] bf16 at the rollout batch's N response positions
    loss_blocks: float  # the chunked loss: about four fp32 [chunk, V] blocks (tip_cli.train.chunks)
    vllm: float  # the rollout engine's pool (weights + KV), asleep while training

    @property
    def resident(self) -> float:
        return self.student_states + self.student_bf16 + self.teacher_weights

    @property
    def train_peak(self) -> float:
        return self.resident + self.activations + self.teacher_hidden + self.loss_blocks

    @property
    def rollout_peak(self) -> float:
        return self.resident + self.vllm


def estimate(student: Shape, teacher: Shape, micro_tokens: int, rollout_tokens: int, checkpointing: bool,
             gpu_bytes: float = 80 * GB, vllm_utilization: float = 0.3, chunk: int = 1728,
             teacher_hf: bool = True) -> Estimate:
    """The memory of one training step under bf16_mixed on one GPU (no FSDP sharding).

    micro_tokens: tokens (prompt + response) of one micro-batch; rollout_tokens: response tokens of the whole rollout
    batch (the teacher's hidden states at each); teacher_hf False: the teacher is a vLLM engine (vllm_topk,
    vllm_server), not in the trainer; chunk: the loss's rows at once (1728 is `auto` at V = 151,936 on CUDA).
    Without checkpointing the activations are activation_bytes x layers x micro_tokens; with it, 2 d x layers x
    micro_tokens (each layer's saved input) + one layer's activation_bytes x micro_tokens (recomputed in backward).
    """
    n = student.params()
    per_layer = student.activation_bytes() * micro_tokens
    acts = (2 * student.hidden * student.layers * micro_tokens + per_layer) if checkpointing else per_layer * student.layers
    return Estimate(
        student_states=16.0 * n,
        student_bf16=2.0 * n,
        teacher_weights=2.0 * teacher.params() if teacher_hf else 0.0,
        activations=float(acts),
        teacher_hidden=2.0 * teacher.hidden * rollout_tokens if teacher_hf else 0.0,
        loss_blocks=4 * 4.0 * chunk * min(student.vocab, teacher.vocab),
        vllm=vllm_utilization * gpu_bytes,
    )


def vllm_kv_tokens(model: Shape, gpu_bytes: float, utilization: float, overhead_bytes: float = 2 * GIB) -> int:
    """Tokens of KV cache a vLLM engine of `model` gets: (utilization x GPU - bf16 weights - overhead) / KV bytes a
    token; overhead is its profiling run's activations and CUDA graphs (about 2 GiB for these sizes)."""
    free = utilization * gpu_bytes - 2 * model.params() - overhead_bytes
    return max(0, int(free // model.kv_bytes_per_token()))
