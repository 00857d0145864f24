"""The config: its schema (plain dataclasses) and its composition (Hydra, OmegaConf)."""
