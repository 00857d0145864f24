"""The embedded pairs, built on first use: the arithmetic pair (task, tokenizer, sft, build), the tool-use pair (agent_pair), and pairs of
Qwen3 shapes (qwen3_shapes) with Qwen3's tokenizer built offline (qwen3_tokenizer)."""
