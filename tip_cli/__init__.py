"""tip: on-policy distillation with token importance (TIP)."""

__version__ = "0.1.0"
