"""Rollout engines: the student sampling its own responses.

An engine has `generate(prompts, sampling) -> Generation` (response token ids and, on request, the log-prob of each
sampled token), `sync_weights(model)` (push the trainer's student into the engine after an optimizer step), and
`sleep()` / `wake()` (free the engine's memory during the training phase); `own_weights` says whether it decodes with
a copy of its own (then a sharded student need not be gathered to generate, and generation may overlap training).
`hf` (rollout.hf) generates with the training module itself; `vllm` (rollout.vllm) runs an offline vLLM engine in the
trainer process; `vllm_server` (rollout.server) asks running `vllm serve` replicas of the student and pushes the
weights to them (rollout.weights). Tool-use episodes (rollout.agent) run on any engine; rollout.batch packs rollouts
into a training batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tip_cli.config.schema import ConfigError, RolloutConfig
from tip_cli.rollout.hf import HFEngine


def make_engine(
    cfg: RolloutConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_path: str, seed: int = 0,
    dtype: torch.dtype | None = None, vocab: int | None = None, run_dir: Path | None = None, version: int = 0,
):
    """The rollout engine `cfg.engine` names, generating from `model` (whose weights live at `model_path`); a vLLM
    engine computes in `dtype` (default: the model's); student servers are checked against the `vocab` ids of the
    pair, take the student as weight `version` (its optimizer steps) and stop a run naming `run_dir`'s last
    checkpoint."""
    if cfg.engine == "vllm_server":
        from tip_cli.rollout.server import ServerEngine

        return ServerEngine.connect(cfg, model, tokenizer, vocab or len(tokenizer), run_dir, dtype,
                                    version=version)
    if cfg.engine == "hf":
        return HFEngine(model, tokenizer, cfg.batch_size)
    if cfg.engine == "vllm":
        from tip_cli.rollout.vllm import VLLMEngine

        return VLLMEngine(model_path, tokenizer, cfg.vllm, dtype or model.dtype, seed,
                          eos=model.generation_config.eos_token_id)
    raise ConfigError(f"rollout.engine={cfg.engine!r} is not valid; expected one of: hf, vllm, vllm_server")
