"""How the scoring pass and the loss walk [rows, V] logits: how many rows at once (`importance.chunk_size`,
`loss.chunk_size`: a number, or `auto` (null) to choose from the device and the vocabulary), and whether each
chunk's softmax work runs as torch.compile'd kernels (`loss.backend`)."""

from __future__ import annotations

import torch

CPU_ROWS = 256  # on CPU larger blocks buy no speed and cost memory (README, Performance)
BLOCK_BYTES = 2**30  # one fp32 [rows, V] block on a GPU; the loss holds about four, scoring three
ROW_MULTIPLE = 64


def auto_rows(vocab: int, device_type: str, device_bytes: int | None = None) -> int:
    """Rows per chunk when the setting is `auto`: 256 on CPU; on CUDA the most rows, in multiples of 64 and at least
    256, whose fp32 [rows, V] block fits min(1 GiB, device memory / 64): 1728 rows at V = 151,936 on an 80+ GB GPU,
    so a chunk's few blocks stay a small share of the device whatever its size."""
    if device_type != "cuda":
        return CPU_ROWS
    budget = BLOCK_BYTES if device_bytes is None else min(BLOCK_BYTES, device_bytes // 64)
    rows = budget // (4 * vocab) // ROW_MULTIPLE * ROW_MULTIPLE
    return max(CPU_ROWS, rows)


def chunk_rows(setting: int | str | None, vocab: int, device: torch.device) -> int:
    """`setting` itself when it is a number, else `auto_rows` for `device` (its total memory, not the free memory,
    so the chunking, and with it the summation order, is the same at every step)."""
    if setting is not None and setting != "auto":
        return int(setting)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return auto_rows(vocab, device.type, total)


def compiled_kernels(backend: str, device: torch.device) -> bool:
    """Whether `loss.backend` runs the compiled kernels on `device`: compiled always, eager never, auto on CUDA."""
    return backend == "compiled" or (backend == "auto" and device.type == "cuda")
