"""The config schema: one plain dataclass per config group, whose `__post_init__` checks choices and ranges.

Hydra merges `conf/<group>/<option>.yaml` into these typed nodes (tip_cli.config.compose), so an unknown key or a
wrong type fails at composition; instantiating the dataclasses then runs every check.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tip_cli.errors import UserError

if TYPE_CHECKING:
    from tip_cli.selection.quadrants import AxisSpec
    from tip_cli.selection.scores import ScoreSpec
    from tip_cli.selection.selectors import SelectorSpec
from tip_cli.selection.options import (
    CAP_BY,
    DIVERGENCES,
    MODES,
    NORMS,
    QUADRANTS,
    SCOPES,
    SELECTORS,
    THRESHOLDS,
)


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message says what was expected."""


def _one_of(where: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{where}={value!r} is not valid; expected one of: {', '.join(map(str, options))}")


def server_urls(where: str, url: Any) -> list[str]:
    """A server URL or a list of them as base URLs (no trailing / or /v1); ConfigError for one that is not http(s)."""
    urls = [url] if isinstance(url, str) else list(url or [])
    urls = [str(u).rstrip("/").removesuffix("/v1") for u in urls]
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise ConfigError(f"{where}={bad[0]!r} is not an http(s) URL; expected e.g. http://10.0.0.2:8000")
    return urls


def _in_range(where: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    _finite(where, value)
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        if hi == math.inf:
            raise ConfigError(f"{where}={value!r} is out of range; expected a number {'>' if lo_open else '>='} {lo}")
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{where}={value!r} is out of range; expected a number in {bracket}{lo}, {hi}]")


def _finite(where: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{where}={value} is not a finite number")


# Ranges of float fields by name, wherever they occur (lo, hi, lo_open); a field's own __post_init__ may narrow it.
FLOAT_RANGES = {
    "temperature": (0.0, math.inf, False),  # 0 = greedy
    "top_p": (0.0, 1.0, True),
    "lr": (0.0, 1.0, True),  # AdamW moves each weight by about lr a step: past 1 it only destroys the model
    "weight_decay": (0.0, math.inf, False),
    "grad_clip": (0.0, math.inf, False),  # 0 = no clipping
    "budget": (0.0, 1.0, True),
}


def check_floats(node: Any, prefix: str = "") -> None:
    """Every float of a config (nested dataclasses) is finite and, where FLOAT_RANGES names its field, in range:
    NaN passes every `x <= 0` test, so the per-group checks alone would let it through to training."""
    for f in dataclasses.fields(node):
        value, where = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_floats(value, where + ".")
        elif isinstance(value, float):
            if f.name in FLOAT_RANGES:
                _in_range(where, value, *FLOAT_RANGES[f.name])
            else:
                _finite(where, value)


def _check_chunk(where: str, value: Any) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}={value!r} is not valid; expected a number of rows >= 1, or auto (null)")


@dataclass
class PairConfig:
    """A teacher-student pair. Model fields take a HF id, a local path, or `toy://teacher|student`."""

    name: str = "toy"  # the pair's label (run names, analysis)
    teacher: str = "toy://teacher"  # the teacher model: HF id, local dir or toy://teacher
    student: str = "toy://student"  # the student model, trained: HF id, local dir or toy://student
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    chat_template: str | None = None  # a Jinja template replacing the tokenizer's own
    # extra arguments of the chat template, e.g. {enable_thinking: false}
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False  # let transformers run the model repository's own code
    # transformers' attention kernel (eager, sdpa, flash_attention_2); null = its choice
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        _one_of("pair.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class SelectorConfig:
    """Which tokens enter the loss (SPEC section 5)."""

    name: str = "soft_or"  # the selector (conf/selector/); set it with selector=NAME
    mode: str = "topk"  # topk | sample
    alpha: float = 1.0  # sampling weight = score ** alpha
    # selector=quadrant: the quadrants kept, e.g. [Q3] (low entropy, high divergence)
    quadrants: list[str] = field(default_factory=lambda: ["Q3"])
    cap_by: str = "divergence"  # ranking used when a mask selector holds more tokens than the budget
    # batch | per_sequence: whether the budget K is counted over the step's batch or within each sequence (which
    # ranks the batch spans under torchrun: parallel.rank_scope)
    scope: str = "batch"

    def __post_init__(self) -> None:
        _one_of("selector.name", self.name, SELECTORS)
        _one_of("selector.mode", self.mode, MODES)
        _one_of("selector.cap_by", self.cap_by, CAP_BY)
        _one_of("selector.scope", self.scope, SCOPES)
        if self.alpha <= 0:
            raise ConfigError(f"selector.alpha={self.alpha} must be > 0")
        for q in self.quadrants:
            _one_of("selector.quadrants[]", q, QUADRANTS)
        if self.name == "quadrant" and not self.quadrants:
            raise ConfigError("selector=quadrant needs at least one quadrant, e.g. selector.quadrants=[Q3]")

    def spec(self) -> SelectorSpec:
        """The method's plain, frozen view of this group (tip_cli.selection.selectors)."""
        from tip_cli.selection.selectors import SelectorSpec  # torch: loaded by the step, not by validation

        return SelectorSpec(self.name, self.mode, self.alpha, tuple(self.quadrants), self.cap_by, self.scope)


@dataclass
class ImportanceConfig:
    """The two axes (entropy H, divergence D), their normalisation and quadrant thresholds (SPEC 2-4)."""

    divergence: str = "reverse_kl"  # D: reverse_kl = KL(p_S || p_T), forward_kl = KL(p_T || p_S), or jsd
    jsd_beta: float = 0.5  # divergence=jsd: m = beta p_T + (1 - beta) p_S; 0 is forward KL, 1 reverse KL
    topk: int | None = None  # restrict D to the teacher's top-K tokens, renormalised
    # warn once a run when the teacher's mean probability mass inside its top-K (teacher/topk_mass) falls below this
    topk_mass_warn: float = 0.9
    # selector=teachability: C_t = the teacher's probability mass on the student's support_k most likely tokens
    support_k: int = 16
    norm: str = "minmax"  # minmax | rank | quantile_clip
    clip_lo: float = 0.01  # norm=quantile_clip: lower quantile clipped to
    clip_hi: float = 0.99  # norm=quantile_clip: upper quantile clipped to
    threshold: str = "quantile"  # quantile (per batch) | absolute (nats)
    h_threshold: float = 0.5  # the median by default
    d_threshold: float = 0.5  # as h_threshold, for D
    # rows of [chunk, V] logits scored at once (256 x 152k fp32 = 155 MB a block); auto/null: tip_cli.train.chunks
    chunk_size: Any = "auto"

    def __post_init__(self) -> None:
        _one_of("importance.divergence", self.divergence, DIVERGENCES)
        _one_of("importance.norm", self.norm, NORMS)
        _one_of("importance.threshold", self.threshold, THRESHOLDS)
        _in_range("importance.jsd_beta", self.jsd_beta, 0.0, 1.0)
        _in_range("importance.topk_mass_warn", self.topk_mass_warn, 0.0, 1.0)
        if not 0.0 <= self.clip_lo < self.clip_hi <= 1.0:
            raise ConfigError(f"importance.clip_lo/clip_hi = {self.clip_lo}/{self.clip_hi}; need 0 <= lo < hi <= 1")
        if self.threshold == "quantile":
            _in_range("importance.h_threshold", self.h_threshold, 0.0, 1.0)
            _in_range("importance.d_threshold", self.d_threshold, 0.0, 1.0)
        if self.topk is not None and self.topk < 2:  # renormalised over one token, both sides are 1 and D = 0
            raise ConfigError(f"importance.topk={self.topk} must be >= 2 (or null for the full vocabulary): "
                              "renormalised over a single token both distributions are 1, so D would be 0")
        _check_chunk("importance.chunk_size", self.chunk_size)
        if self.support_k < 1:
            raise ConfigError(f"importance.support_k={self.support_k} must be >= 1: C sums the teacher's probability "
                              "over the student's support_k most likely tokens (TA-OPD uses 16)")

    def score_spec(self) -> ScoreSpec:
        """How D is taken (tip_cli.selection.scores)."""
        from tip_cli.selection.scores import ScoreSpec

        return ScoreSpec(self.divergence, self.jsd_beta, self.topk)

    def axis_spec(self) -> AxisSpec:
        """How H and D are normalised and split (tip_cli.selection.quadrants)."""
        from tip_cli.selection.quadrants import AxisSpec

        return AxisSpec(self.norm, self.clip_lo, self.clip_hi, self.threshold, self.h_threshold, self.d_threshold)


@dataclass
class LossConfig:
    """Per-token distillation loss over the full vocabulary (SPEC section 1)."""

    kind: str = "reverse_kl"  # the per-token loss: reverse_kl = KL(p_S || p_T), forward_kl, or jsd
    jsd_beta: float = 0.5  # kind=jsd: m = beta p_T + (1 - beta) p_S; 0 is forward KL, 1 reverse KL
    norm: str = "selected"  # selected: mean over kept tokens | total: divide by all response tokens
    # both models' logits are divided by it in H, D and the loss; null = rollout.temperature (the distribution the
    # rollouts were sampled from; greedy rollouts, T = 0, use 1)
    temperature: float | None = None
    # rows of [chunk, V] in the loss at once; memory does not grow with the kept count beyond it. auto/null: 256 on
    # CPU, about 1 GiB of fp32 logits a block on CUDA (tip_cli.train.chunks)
    chunk_size: Any = "auto"
    # the [chunk, V] softmax, reverse KL and gradient of the loss, and H and D of the scoring pass: compiled
    # (torch.compile fuses them), eager, or auto (compiled on CUDA; eager on CPU, where compiling costs more than
    # a short run saves). Compiled kernels exist for loss.kind=reverse_kl and for importance.divergence=reverse_kl
    # (topk null), each against an in-process teacher; the rest runs eagerly.
    backend: str = "auto"

    def __post_init__(self) -> None:
        _one_of("loss.kind", self.kind, DIVERGENCES)
        _one_of("loss.backend", self.backend, ("auto", "eager", "compiled"))
        _one_of("loss.norm", self.norm, ("selected", "total"))
        _in_range("loss.jsd_beta", self.jsd_beta, 0.0, 1.0)
        if self.temperature is not None:  # null = rollout.temperature
            _in_range("loss.temperature", self.temperature, 0.0, math.inf, lo_open=True)
        _check_chunk("loss.chunk_size", self.chunk_size)


ENVS = ("toy_agent", "deepplanning_shopping", "deepplanning_travel")  # tip_cli.envs.REGISTRY


@dataclass
class DatasetConfig:
    """A prompt source: a local JSONL/JSON/Parquet path, `toy://train|test`, or a HF dataset id (path wins)."""

    name: str = "toy"  # the source's label; evaluation metrics are logged as eval/<name>/<metric>
    path: str | None = "toy://test"  # local JSONL/JSON/Parquet file, or toy://train|test; wins over hf_id
    hf_id: str | None = None  # a Hugging Face dataset id, used when path is null
    hf_config: str | None = None  # the HF dataset's config name
    split: str = "test"  # the split to read (HF datasets; DeepPlanning: train, test or all)
    problem_field: str = "problem"  # the column holding the problem (dotted for nested fields)
    answer_field: str = "answer"  # the column holding the gold answer (dotted for nested fields)
    id_field: str | None = "id"  # the column holding a problem id; null = row numbers
    prompt_template: str = "{problem}"  # the user message; {problem} is replaced by the problem
    # sampling defaults for evaluation on this source (eval.* overrides them)
    n: int = 1  # samples per problem
    temperature: float = 0.0  # evaluation sampling temperature; 0 = greedy
    top_p: float = 1.0  # evaluation nucleus-sampling mass
    max_new_tokens: int = 256  # tokens per response (with an env: per model turn)
    # tool-use environments (tip_cli.envs): null = single-turn prompts graded by math-verify
    env: str | None = None  # toy_agent | deepplanning_shopping | deepplanning_travel
    db_path: str | None = None  # the environment's database (DeepPlanning: a local copy of Qwen/DeepPlanning)
    env_options: dict[str, Any] = field(default_factory=dict)  # per-environment settings, e.g. language, levels

    def __post_init__(self) -> None:
        if self.env is not None:
            _one_of(f"{self.name}.env", self.env, ENVS)
        if self.path is None and self.hf_id is None and self.env is None:
            raise ConfigError(f"dataset {self.name!r}: set path= (a local file; it wins when both are set) or hf_id=")
        if "{problem}" not in self.prompt_template:
            raise ConfigError(f"dataset {self.name!r}: prompt_template must contain '{{problem}}'")
        if self.n < 1:
            raise ConfigError(f"dataset {self.name!r}: n={self.n} must be >= 1")


@dataclass
class AgentConfig:
    """Multi-turn tool-use rollouts (tip_cli.rollout.agent), used when data.env / benchmark.env name an environment."""

    max_turns: int = 50  # model turns per episode
    max_tokens: int = 32768  # cap on the whole sequence (prompt, model turns, tool results)

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_tokens < 2:
            raise ConfigError(f"agent: max_turns={self.max_turns} must be >= 1 and max_tokens={self.max_tokens} >= 2")


@dataclass
class VLLMConfig:
    """An offline vLLM engine inside the trainer process (rollout.engine=vllm, teacher.backend=vllm_topk)."""

    gpu_memory_utilization: float = 0.3  # share of GPU memory for weights + KV cache (colocated with training)
    kv_cache_gb: float | None = None  # an explicit KV-cache size; null = from gpu_memory_utilization (CPU: 1 GiB)
    tensor_parallel_size: int = 1  # GPUs the engine shards the model over
    max_model_len: int | None = None  # null = the model's own context length
    # rollout engine only; null = on with CUDA: KV cache and weights freed while training (reloaded at the sync)
    enable_sleep_mode: bool | None = None
    enforce_eager: bool = False  # no CUDA graphs (always eager on CPU)
    enable_prefix_caching: bool = True  # safe: the cache is reset after every weight sync

    def __post_init__(self) -> None:
        _in_range("vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"vllm.tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ConfigError(f"vllm.kv_cache_gb={self.kv_cache_gb} must be > 0 (or null)")


@dataclass
class RolloutConfig:
    # hf (transformers generate on the training module) | vllm (in-process vLLM, the vllm extra) | vllm_server
    # (running `vllm serve` replicas of the student at rollout.url, weights pushed after every update)
    engine: str = "hf"
    max_new_tokens: int = 128  # tokens sampled per response (with an environment: per model turn)
    # sampling temperature of the rollouts; 0 = greedy. H, D and the loss use it too (loss.temperature)
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus-sampling mass of the rollouts
    top_k: int = 0  # top-k sampling; 0 = off
    samples_per_prompt: int = 1  # responses sampled per prompt
    batch_size: int = 64  # sequences generated at once (hf)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    url: Any = None  # vllm_server: base URL of a student replica, or a list of them, e.g. http://10.0.0.3:8000
    model: str | None = None  # vllm_server: the served model name; null = the one model the server lists
    # vllm_server: how each update reaches the replicas: filesystem (safetensors in rollout.weight_dir, which the
    # trainer and every replica must see; works on CPU and across nodes) | nccl (GPU broadcast, vLLM's NCCL engine)
    weight_transfer: str = "filesystem"
    weight_dir: str | None = None  # filesystem transfer: a directory every replica can read; null = <run dir>/weights
    nccl_port: int = 29600  # nccl transfer: the TCP port of the trainer's rendezvous (its host is this machine's)
    # weight versions a rollout may lag the trainer: 0 = synchronous (each step's rollouts come from the current
    # weights); 1 = step t+1's rollouts generate on the student servers while step t trains (vllm_server)
    max_staleness: int = 0
    timeout_s: float = 600.0  # vllm_server: seconds per generation request and per weight push
    retries: int = 2  # vllm_server: attempts after the first, for a request (on another replica) or a push
    backoff_s: float = 2.0  # vllm_server: wait before the first retry, doubling each time
    # vllm_server: a replica whose push still fails after the retries: stop (the run stops, naming it and the last
    # checkpoint) | drop (the run goes on without it; stops when none is left)
    on_push_failure: str = "stop"
    concurrency: int = 64  # vllm_server: generation requests in flight per replica (vLLM batches them)

    def __post_init__(self) -> None:
        _one_of("rollout.engine", self.engine, ("hf", "vllm", "vllm_server"))
        _one_of("rollout.weight_transfer", self.weight_transfer, ("filesystem", "nccl"))
        _one_of("rollout.on_push_failure", self.on_push_failure, ("stop", "drop"))
        self.url = server_urls("rollout.url", self.url)
        if self.engine == "vllm_server" and not self.url:
            raise ConfigError("rollout.engine=vllm_server needs rollout.url: the base URL of a running `vllm serve` "
                              "of the student (e.g. rollout.url=http://10.0.0.3:8000, or a list [URL1,URL2])")
        if self.max_staleness not in (0, 1):  # one batch in flight: a push waits for its generation to end
            raise ConfigError(f"rollout.max_staleness={self.max_staleness} is not valid; expected 0 (synchronous) or 1 "
                              "(the next step's rollouts generate while this step trains)")
        if self.max_staleness > 0 and self.engine != "vllm_server":
            raise ConfigError(f"rollout.max_staleness={self.max_staleness} needs rollout.engine=vllm_server: the hf "
                              f"and vllm engines decode in the trainer process (rollout.engine={self.engine}), so "
                              "generation cannot overlap training; use max_staleness=0 or serve the student")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.concurrency < 1:
            raise ConfigError(f"rollout: timeout_s={self.timeout_s} must be > 0, retries={self.retries} and "
                              f"backoff_s={self.backoff_s} >= 0, concurrency={self.concurrency} >= 1")
        _in_range("rollout.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.max_new_tokens < 1 or self.samples_per_prompt < 1 or self.batch_size < 1:  # temperature: FLOAT_RANGES
            raise ConfigError("rollout: max_new_tokens >= 1, samples_per_prompt >= 1, batch_size >= 1")
        if self.top_k < 0:
            raise ConfigError(f"rollout.top_k={self.top_k} must be >= 0 (0 = off)")


@dataclass
class TeacherConfig:
    """How the teacher scores the student's rollouts.

    hf: the teacher model in the trainer process, full-vocab log-probs (exact; what the selectors are defined on).
    vllm_topk: a vLLM engine returns the teacher's top-K prompt log-probs at every position; D and the loss are
    computed over those K tokens plus one tail bucket holding the remaining mass (an approximation that lets the
    teacher run in its own engine, e.g. on another GPU).
    vllm_server: the same top-K log-probs from running `vllm serve` replicas at `url` (tip_cli.teacher.server).
    """

    backend: str = "hf"  # hf | vllm_topk | vllm_server
    topk: int = 20  # vllm_topk / vllm_server: K teacher log-probs per position (the server needs --max-logprobs >= K)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    url: Any = None  # vllm_server: base URL of a replica, or a list of them, e.g. http://10.0.0.2:8000
    model: str | None = None  # vllm_server: the served model name; null = the one model the server lists
    timeout_s: float = 300.0  # vllm_server: seconds per request
    retries: int = 3  # vllm_server: attempts after the first (on the next replica), backoff doubling each time
    backoff_s: float = 2.0  # vllm_server: wait before the first retry
    concurrency: int = 8  # vllm_server: requests in flight per replica

    def __post_init__(self) -> None:
        _one_of("teacher.backend", self.backend, ("hf", "vllm_topk", "vllm_server"))
        if self.topk < 1:
            raise ConfigError(f"teacher.topk={self.topk} must be >= 1")
        if self.vllm.enable_sleep_mode:
            raise ConfigError("teacher.vllm.enable_sleep_mode=true: the teacher's engine scores during the training "
                              "step and never sleeps, and vLLM allows one sleep-mode engine per process (the rollout "
                              "engine's); leave it null or false")
        self.url = server_urls("teacher.url", self.url)
        if self.backend == "vllm_server" and not self.url:
            raise ConfigError("teacher.backend=vllm_server needs teacher.url: the base URL of a running "
                              "`vllm serve` (e.g. teacher.url=http://10.0.0.2:8000, or a list [URL1,URL2])")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.concurrency < 1:
            raise ConfigError(f"teacher: timeout_s={self.timeout_s} must be > 0, retries={self.retries} and "
                              f"backoff_s={self.backoff_s} >= 0, concurrency={self.concurrency} >= 1")


@dataclass
class TrainConfig:
    """The training run: steps and batch, checkpoint, evaluation and token-sample cadence, resume, precision and
    failure handling. The optimizer is optim (OptimConfig), multi-GPU settings parallel (ParallelConfig)."""

    steps: int = 200  # optimizer steps
    prompts_per_step: int = 16  # prompts per step (a multiple of the number of ranks under torchrun)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = the whole rollout batch at once
    save_every: int = 50  # checkpoint every N steps; the last step is always saved
    # the newest N checkpoints stay (one to fall back on if the newest is damaged); 0 = keep all. A checkpoint holds
    # the fp32 weights and AdamW's two moments (12 bytes a parameter) and the bf16 HF export (2 bytes): at 1.7B
    # parameters 20.6 + 3.4 = 24 GB, so 2 take 48 GB (72 GB while the next is written), where keeping all of a
    # 200-step run saved every 50 steps takes 96 GB
    keep_checkpoints: int = 2
    eval_every: int = 50  # 0 = only before and after training
    eval_before: bool = True  # evaluate the student before the first step
    token_sample_every: int = 10  # save per-token (H, D, quadrant, kept) every N steps for `tip analyze`; 0 = never
    token_sample_size: int = 20000  # tokens kept per sample (drawn uniformly from the rollout batch)
    # log where the learning signal comes from (SPEC 7a: grad/, loss/ quadrant shares, select/overlap_*,
    # teacher/topk_mass): each token's loss and logit-gradient norm, from the passes that compute H and D
    signal_metrics: bool = True
    # recompute the student's layers in backward (less activation memory, more time)
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # re-running into a run dir: auto = continue only if the config is the one recorded (tip_cli.train.rundir);
    # override = continue with this config's values from the newest checkpoint on, recorded in overrides.jsonl
    resume: str = "auto"
    # auto = bf16_mixed on CUDA (fp32 master weights and AdamW state, bf16 compute), fp32 on CPU; bf16 = pure bf16
    precision: str = "auto"
    max_skipped_steps: int = 3  # consecutive steps with a non-finite H, D or loss (no update) before the run stops
    # skip training rows that are malformed or too long for the models' context (each reported) instead of failing
    skip_bad_rows: bool = False
    # on SIGTERM (SLURM's notice before preemption), the step in flight may finish within this many seconds, and a
    # checkpoint of it is saved; past it, or with 0, the run stops at once and a re-run resumes from the last one
    sigterm_grace_s: float = 60.0
    # every N steps one extra backward of the full-token loss gives the cosine between the budgeted and the full-token
    # parameter gradient (grad/param_cosine, grad/param_norm_ratio; tip_cli.train.probe); 0 = off
    grad_probe_every: int = 0

    def __post_init__(self) -> None:
        _one_of("train.resume", self.resume, ("auto", "override"))
        _one_of("train.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("train.precision", self.precision, ("auto", "bf16_mixed", "bf16", "fp32"))
        if self.max_skipped_steps < 1:
            raise ConfigError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 1")
        if self.steps < 0 or self.prompts_per_step < 1 or self.micro_batch_size < 0:
            raise ConfigError("train: steps >= 0, prompts_per_step >= 1, micro_batch_size >= 0")
        if min(self.save_every, self.eval_every, self.keep_checkpoints, self.token_sample_every) < 0:
            raise ConfigError("train: save_every, eval_every, keep_checkpoints, token_sample_every must be >= 0")
        if self.grad_probe_every < 0:
            raise ConfigError(f"train.grad_probe_every={self.grad_probe_every} must be >= 0 (0 = no gradient probe)")
        if self.token_sample_size < 1:
            raise ConfigError(f"train.token_sample_size={self.token_sample_size} must be >= 1")
        if not 0 <= self.sigterm_grace_s < float("inf"):
            raise ConfigError(f"train.sigterm_grace_s={self.sigterm_grace_s} must be a number of seconds >= 0")


@dataclass
class OptimConfig:
    """The optimizer (AdamW, decoupled weight decay) and its learning-rate schedule over train.steps."""

    lr: float = 1e-4  # AdamW learning rate
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0  # linear warm-up steps before the schedule
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0 = no clipping

    def __post_init__(self) -> None:
        _one_of("optim.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class ParallelConfig:
    """Multi-GPU and multi-node training under torchrun (tip_cli.train.parallel, tip_cli.train.sharding); a single
    process reads none of it but cpu_offload, which needs torchrun."""

    # over which ranks' tokens the selection's statistics are taken (min-max/rank normalisation, quadrant
    # thresholds, the top-K budget). Not selector.scope, which says whether K is counted per batch or per sequence:
    # rank_scope says which ranks that batch spans. global: every rank's tokens, gathered (the kept set is the one
    # a single process would pick) | local: each rank its own slice (no gather; the logged quadrant shares and H/D
    # quantiles are then rank 0's). The loss normaliser and tokens/total, tokens/kept are global either way.
    rank_scope: str = "global"
    cpu_offload: bool = False  # FSDP2 keeps the student's shards, grads and optimizer state in CPU memory (CUDA only)
    shard_teacher: bool = False  # shard the teacher with FSDP2 too, instead of a full replica per rank

    def __post_init__(self) -> None:
        _one_of("parallel.rank_scope", self.rank_scope, ("global", "local"))


@dataclass
class EvalConfig:
    """Overrides of the benchmark's own sampling defaults; null = the benchmark's value."""

    n: int | None = None  # samples per problem
    temperature: float | None = None  # sampling temperature; 0 = greedy
    top_p: float | None = None  # nucleus-sampling mass
    max_new_tokens: int | None = None  # tokens per response (with an environment: per model turn)
    limit: int | None = None  # evaluate only the first N problems
    batch_size: int = 64  # prompts generated at once
    skip_bad_rows: bool = False  # skip benchmark rows that are malformed or too long for the model's context (each reported)

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ConfigError(f"eval.n={self.n} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit={self.limit} must be >= 1 (or null for all problems)")


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none; metrics.jsonl is always written
    project: str = "tip"  # the W&B project
    entity: str | None = None  # the W&B entity (user or team); null = the default one
    mode: str = "auto"  # auto: online with credentials, else offline | online | offline | disabled
    tags: list[str] = field(default_factory=list)  # W&B run tags

    def __post_init__(self) -> None:
        _one_of("logger.name", self.name, ("wandb", "none"))
        _one_of("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class TipConfig:
    pair: PairConfig = field(default_factory=PairConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    benchmark: DatasetConfig = field(default_factory=DatasetConfig)
    data: DatasetConfig = field(default_factory=lambda: DatasetConfig(name="toy", path="toy://train", split="train"))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    budget: float = 0.5  # fraction of response tokens kept, K = max(1, round(budget * N)); 1.0 is full-token OPD
    seed: int = 0  # every random draw of the run derives from it and the step
    out_dir: str | None = None  # the run dir; null = Hydra's outputs/DATE/TIME
    checkpoint: str | None = None  # what `tip eval` evaluates

    def __post_init__(self) -> None:
        check_floats(self)
        # greedy decoding has one answer per prompt: several samples of it need a temperature
        n = self.benchmark.n if self.eval.n is None else self.eval.n
        temperature = self.benchmark.temperature if self.eval.temperature is None else self.eval.temperature
        if n > 1 and temperature <= 0:
            raise ConfigError(f"eval.n={n} samples per problem at temperature {temperature} (greedy) would all be the "
                              "same: set eval.temperature > 0 (e.g. 0.6), or eval.n=1")
        if self.rollout.samples_per_prompt > 1 and self.rollout.temperature <= 0:
            raise ConfigError(f"rollout.samples_per_prompt={self.rollout.samples_per_prompt} at rollout.temperature=0 "
                              "(greedy) would all be the same: set rollout.temperature > 0, or samples_per_prompt=1")
        # a vLLM top-K teacher (in process or a server) returns log-probs at T = 1, which cannot be re-tempered without
        # the rest of the vocabulary; T is loss.temperature, else rollout.temperature (1 for greedy rollouts)
        temp = self.distill_temperature
        if self.teacher.backend in ("vllm_topk", "vllm_server") and temp != 1.0:
            raise ConfigError(
                f"teacher.backend={self.teacher.backend} scores at temperature 1, but H, D and the loss would compare "
                f"softmax(logits / {temp}) (rollout.temperature={self.rollout.temperature}); "
                "set loss.temperature=1 or use teacher.backend=hf"
            )

    @property
    def distill_temperature(self) -> float:
        """The T of softmax(logits / T) that H, D and the loss compare, for both models: loss.temperature when set,
        else the distribution the rollouts were sampled from (rollout.temperature; 1 for greedy rollouts), as TRL's
        distillation losses do."""
        if self.loss.temperature is not None:
            return self.loss.temperature
        return self.rollout.temperature if self.rollout.temperature > 0 else 1.0
