"""The embedded pairs, built on first use: the arithmetic pair (arith), the tool-use pair (agent_pair), and pairs of
Qwen3 shapes (qwen3_shapes)."""
