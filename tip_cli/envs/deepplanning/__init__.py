"""DeepPlanning (QwenLM/Qwen-Agent `benchmark/deepplanning`): common (task files, splits, the database) <- shopping,
travel; travel's Markdown-to-JSON plan conversion in convert."""
