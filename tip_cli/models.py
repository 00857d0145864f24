"""Loading a model and its tokenizer, checking a pair can be distilled, and the two model calls tip needs: final
hidden states and the lm_head. Loading a pair from its references (toy:// included) is tip_cli.pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tip_cli.config.schema import ConfigError, PairConfig

_PROBE_CHAT = [{"role": "user", "content": "What is 1 + 1?"}]


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _not_a_model(path: str, err: Exception) -> ConfigError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"{path} is not a loadable model: expected a Hugging Face model dir (config.json, weights, tokenizer), "
        f"a run dir with checkpoints/step_N/, or a hub id ({reason})"
    )


def load_tokenizer(path: str, cfg: PairConfig) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _not_a_model(path, err) from err
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str, cfg: PairConfig, device: torch.device, trainable: bool, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A causal LM on `device` in `dtype` (default: pair.dtype's), frozen unless `trainable`."""
    kwargs = {"dtype": dtype or pick_dtype(cfg.dtype, device), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    except (OSError, ValueError) as err:
        raise _not_a_model(path, err) from err
    model.train(trainable)
    model.requires_grad_(trainable)
    if model.get_output_embeddings().bias is not None:
        raise ConfigError(f"{path}: an lm_head with a bias is not supported by the selected-token loss")
    return model


def render_prompt(tokenizer: PreTrainedTokenizerBase, text: str, cfg: PairConfig) -> list[int]:
    """Token ids of a one-turn user conversation, ready for the assistant's reply."""
    chat = [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **cfg.chat_template_kwargs)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def shared_vocab(
    tok_s: PreTrainedTokenizerBase,
    tok_t: PreTrainedTokenizerBase,
    rows_s: int,
    rows_t: int,
    names: tuple[str, str],
    cfg: PairConfig,
) -> int:
    """The vocabulary size both models' logits are cut to; raise if the pair cannot be distilled token by token.

    Vocabularies may differ only by padding rows of the lm_head (e.g. 151936 vs 152064): the tokenizers must be
    identical, and the common prefix of the rows covers every token.
    """
    student, teacher = names
    if tok_s.get_vocab() != tok_t.get_vocab():
        raise ConfigError(
            f"teacher {teacher} and student {student} have different tokenizers "
            f"({len(tok_t)} vs {len(tok_s)} tokens); on-policy distillation needs a shared vocabulary"
        )
    probe = [tok.apply_chat_template(_PROBE_CHAT, add_generation_prompt=True, tokenize=False, **cfg.chat_template_kwargs)
             for tok in (tok_s, tok_t)]
    if probe[0] != probe[1]:
        raise ConfigError(
            f"teacher {teacher} and student {student} render different chat templates:\n"
            f"  student: {probe[0]!r}\n  teacher: {probe[1]!r}\n"
            "set pair.chat_template to force one template for both"
        )
    vocab = min(rows_s, rows_t)
    if len(tok_s) > vocab:
        raise ConfigError(f"tokenizer has {len(tok_s)} tokens but the lm_heads have only {rows_s} (student) / {rows_t} (teacher) rows")
    return vocab


@dataclass
class Pair:
    student: PreTrainedModel
    teacher: PreTrainedModel | None  # None when the teacher is served elsewhere (teacher.backend=vllm_topk)
    tokenizer: PreTrainedTokenizerBase
    vocab: int  # logits of both models are cut to [:vocab]
    device: torch.device
    student_path: str = ""
    teacher_path: str = ""


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward instead of storing them (newer transformers renamed it)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after the final norm, before the lm_head: [B, T] ids -> [B, T, d]. No logits are formed."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def response_hidden(model: PreTrainedModel, batch, temperature: float = 1.0) -> torch.Tensor:
    """Final hidden states at a rollout batch's response positions (`batch.target_mask`), row-major over [B, T],
    divided by `temperature`: [N, d]. (h / T) W^T = logits / T, so every log-prob built from them (H, D, the
    loss) is that of softmax(logits / T)."""
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)[batch.target_mask]
    return hidden if temperature == 1.0 else hidden / temperature


def head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The lm_head matrix [V, d] (tied or not); gradients through it reach the right parameter."""
    return model.get_output_embeddings().weight
