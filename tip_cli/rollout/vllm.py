"""vLLM in the trainer process: the student's rollout engine (weights synced in place); the top-K teacher scorer on
the same engine settings is tip_cli.teacher.vllm.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), colocated with training. After each optimizer step
`sync_weights` hands the student's tensors to the workers' `reload_weights` (vLLM's in-place reload: checkpoint-format
names, the same stacking of q/k/v and gate/up as a load from disk), then resets the prefix cache so no KV computed
with the old weights is reused. With sleep mode (default on CUDA) the engine frees its KV cache and its weights
(sleep level 2: they are reloaded from the student before the next rollout anyway) while the trainer runs the step.

Under torchrun every rank runs its own engine on its own GPU (vLLM's torchrun mode, `external_launcher`) on its own
slice of the prompts. Requests carry no seed of their own (vLLM gives sample c of a request seeded s the seed s + c,
and its V1 runner draws seeded requests' noise in a loop over them); a call's `Sampling.seed` seeds the RNGs the
workers' sampler draws from instead, so a call's responses follow from its prompts and seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tip_cli.config.schema import ConfigError, VLLMConfig
from tip_cli.rollout.batch import Generation, Sampling, eos_ids, trim_at_eos
from tip_cli.rollout.vllm_plugin import refresh_packed_lm_head
from tip_cli.rollout.weights import weights_for_sync

INSTALL_HINT = "install it with `pip install -e .[vllm]` (GPU) or `make setup-vllm` (CPU)"


def import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"vLLM is not installed ({err}); {INSTALL_HINT}") from err
    return vllm


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def launch_kwargs(cfg: VLLMConfig) -> dict:
    """How the engine's worker finds its device: under torchrun (RANK / WORLD_SIZE set), vLLM's torchrun mode, which
    takes the GPU from LOCAL_RANK and joins the trainer's process group; vLLM's single-process executor would put
    every rank's engine on GPU 0. Outside torchrun, vLLM's default."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return {}
    if cfg.tensor_parallel_size > 1:
        # torchrun mode shards one engine over a group of ranks that must submit identical requests, while each
        # rank rolls out its own slice of the prompts
        raise ConfigError(f"vllm.tensor_parallel_size={cfg.tensor_parallel_size} under torchrun: every rank runs "
                          "its own engine on its own GPU (tensor_parallel_size=1); for a model that needs several "
                          "GPUs, run one process without torchrun")
    return {"distributed_executor_backend": "external_launcher"}


def engine_kwargs(path: str, cfg: VLLMConfig, dtype: torch.dtype, seed: int, max_logprobs: int = 20,
                  sleep: bool = True) -> dict:
    """Arguments of `vllm.LLM` for one model under `cfg`; `sleep=False` for an engine that never sleeps (only one
    sleep-mode engine fits in a process: vLLM's cuMem allocator is a per-process singleton)."""
    kwargs = {
        "model": path,
        "tokenizer": path,
        "dtype": str(dtype).removeprefix("torch."),
        # the same on every rank; a rank's rollouts differ through Sampling.seed
        "seed": seed,
        "enforce_eager": cfg.enforce_eager or _on_cpu(),
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "max_logprobs": max_logprobs,
        # sampling comes from tip's settings alone, never the checkpoint's generation_config.json (EOS aside)
        "generation_config": "vllm",
        # a sampled token's log-prob under the distribution it was drawn from (logits / T, top_p / top_k applied),
        # as the HF engine reports it
        "logprobs_mode": "processed_logprobs",
        **launch_kwargs(cfg),
    }
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    kv_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None else (1.0 if _on_cpu() else None)
    if kv_gb is not None:  # on CPU, gpu_memory_utilization would reserve that share of host RAM
        kwargs["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
    if sleep and (cfg.enable_sleep_mode if cfg.enable_sleep_mode is not None else not _on_cpu()):
        kwargs["enable_sleep_mode"] = True
    return kwargs


def _seed_sampler(worker, seed: int) -> None:
    """On each vLLM worker: seed the RNGs its sampler draws from for requests without a seed of their own. Torch's:
    the V1 runner's noise for the whole batch (CUDA: the device's default generator; CPU: the per-row seeds of the
    fused Gumbel sampler). NumPy's: the V2 runner (the CUDA default) gives each such request a seed from it, its
    noise then a function of (that seed, position)."""
    torch.manual_seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])


class VLLMEngine:
    """Rollouts from an offline `vllm.LLM`; same interface as `HFEngine`."""

    own_weights = True  # decodes with its copy of the student (synced after each step), never the training module

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        cfg: VLLMConfig,
        dtype: torch.dtype,
        seed: int = 0,
        eos: int | list[int] | None = None,
    ):
        vllm = import_vllm()
        self._vllm = vllm
        kwargs = engine_kwargs(model_path, cfg, dtype, seed)
        self.llm = vllm.LLM(**kwargs)
        self.eos_ids = eos_ids(eos, tokenizer)
        self.dtype = dtype
        self.sleep_mode = kwargs.get("enable_sleep_mode", False)
        self.asleep = False
        self._weights_awake = False

    def _params(self, sampling: Sampling):
        """Every sampling field set from tip's settings: softmax(logits / T) cut by top_p / top_k, no penalties."""
        return self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            min_tokens=0,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=sorted(self.eos_ids | set(sampling.stop_token_ids)),
            logprobs=0 if sampling.logprobs else None,
            detokenize=False,
        )

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, on_batch: Callable[[int], None] | None = None
    ) -> Generation:
        self.wake()
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        if sampling.seed is not None:
            self.llm.collective_rpc(_seed_sampler, args=(sampling.seed,))
        outputs = self.llm.generate(requests, self._params(sampling), use_tqdm=False)
        stops = self.eos_ids | set(sampling.stop_token_ids)
        tokens, logprobs = [], []
        for out in outputs:  # vLLM returns requests in submission order, each with its n completions
            for completion in sorted(out.outputs, key=lambda c: c.index):
                row = trim_at_eos(list(completion.token_ids), stops)
                tokens.append(row)
                if sampling.logprobs:
                    logprobs.append([step[tok].logprob for step, tok in zip(completion.logprobs, row, strict=False)])
        if on_batch:
            on_batch(len(tokens))
        return Generation(tokens, logprobs if sampling.logprobs else None)

    def sync_weights(self, model: PreTrainedModel) -> None:
        """Load the student's current weights into the engine in place (no disk round trip)."""
        if self.asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])  # memory mapped again; its contents are the reload's to write
            self._weights_awake = True
        # an iterator, not a list: the in-process executor hands it to the worker as it is, which pulls one tensor
        # at a time
        weights = weights_for_sync(model, self.dtype)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if _on_cpu():
            self.llm.apply_model(refresh_packed_lm_head)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache and the weights (level 2: discarded, not copied to host, as `sync_weights` reloads them
        before the next rollout); CUDA only."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self._weights_awake = True, False

    def wake(self) -> None:
        if not self.asleep:
            return
        if not self._weights_awake:
            raise RuntimeError("the vLLM engine's weights were discarded by sleep(); sync_weights(model) must "
                               "reload them before it generates again")
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = self._weights_awake = False
