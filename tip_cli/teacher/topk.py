"""vLLM's top-K prompt log-probs turned into the [N, K] targets of a `TopKTeacher`, with array operations only.

vLLM scores prompt position t + 1 (the distribution after token t) with K + 1 candidates: token t + 1 itself, then
the engine's top K in rank order (K distinct ids, one of which may be token t + 1 again). Read as a dict keyed by token
id, as `prompt_logprobs` is, the repeated id keeps its first place and its last value. A row's targets are the K most
likely of those distinct candidates, ties broken by candidate order: what a stable sort of the dict by log-prob gives.

Candidates arrive flat, E entries with the first one of each position marked: from an in-process engine as vLLM's
`FlatLogprobs` (`flat_rows`), from `vllm serve` as the JSON of a `/v1/completions` answer (`json_rows`). The JSON is
scanned as bytes: each entry is `"<id>":{"logprob":<number>,...}`, and since a JSON string escapes its quotes, that
key pattern never occurs inside a decoded token's text.
"""

from __future__ import annotations

import numpy as np
import torch

_ENTRY = b'":{"logprob":'  # from the closing quote of an entry's token id to its log-prob
_MAX_ID_DIGITS = 19  # int64
_MAX_NUMBER_BYTES = 25  # the longest float repr, -1.2345678901234567e-308, and its terminator


def best_k(ids_PM: np.ndarray, logp_PM: np.ndarray, width_P: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's K most likely distinct candidates, ties in candidate order: ([P, K] int64, [P, K] float64).

    Row p's candidates are its first width_P[p] columns; a later column repeating column 0's id is the same token,
    which keeps column 0's place and takes the later value (a dict's update). Raises ValueError on a row with fewer
    than K distinct candidates.
    """
    logp_PM = logp_PM.copy()
    cols = np.arange(ids_PM.shape[1])
    real = cols < width_P[:, None]
    again = real & (cols > 0) & (ids_PM == ids_PM[:, :1])
    repeated = again.any(1)
    if repeated.any():
        last = ids_PM.shape[1] - 1 - again[:, ::-1].argmax(1)
        logp_PM[repeated, 0] = logp_PM[repeated, last[repeated]]
        real &= ~again
    if (real.sum(1) < k).any():
        raise ValueError(f"a position has fewer than {k} distinct top-K candidates")
    order = np.lexsort((-logp_PM, ~real), axis=-1)[:, :k]  # stable: real first, then log-prob descending
    return np.take_along_axis(ids_PM, order, 1), np.take_along_axis(logp_PM, order, 1)


def targets(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `best_k` rows of several sequences' candidates, in order: ([N, K] int64, [N, K] float32)."""
    m = max((ids.shape[1] for ids, _, _ in parts), default=k)
    parts = [p for p in parts if len(p[2])]
    if not parts:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    ids, logp, width = (np.concatenate([np.pad(a, ((0, 0), (0, m - a.shape[1]))) if a.ndim == 2 else a for a in col])
                        for col in zip(*parts, strict=True))  # columns past a row's width are never candidates
    ids, logp = best_k(ids, logp, width, k)
    return torch.from_numpy(ids), torch.from_numpy(logp.astype(np.float32))


def entries_of(start_P: np.ndarray, width_P: np.ndarray, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The flat entries of positions `rows` (position p: entries start_P[p] .. + width_P[p]) as an [R, M] index
    (a narrower row repeats its last entry), and the rows' widths [R]."""
    rows = np.asarray(rows, dtype=np.int64)
    start, width = start_P[rows], width_P[rows]
    cols = np.arange(max(int(width.max(initial=0)), 1))
    return start[:, None] + np.minimum(cols, np.maximum(width - 1, 0)[:, None]), width


def flat_rows(flat, positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sequence's candidates at `positions` (t predicts token t + 1) from vLLM's `FlatLogprobs`: [R, M] ids,
    log-probs and the rows' widths, for `best_k`."""
    start = np.asarray(flat.start_indices, dtype=np.int64)
    width = np.asarray(flat.end_indices, dtype=np.int64) - start
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    logp = np.asarray(flat.logprobs, dtype=np.float64)
    at, width = entries_of(start, width, [t + 1 for t in positions])
    return ids[at], logp[at], width


def json_rows(raw: bytes, length: int, positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As `flat_rows`, from the raw JSON answer of `/v1/completions` with `prompt_logprobs` for one prompt of
    `length` tokens. Raises ValueError when the answer does not hold length - 1 scored positions."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    key = np.frombuffer(_ENTRY, dtype=np.uint8)
    head = buf[: max(len(buf) - len(key), 0)]
    at = np.flatnonzero((head[:-2] == key[0]) & (head[1:-1] == key[1]) & (head[2:] == key[2]))  # `":{`
    at = at[at > 2]
    for j in range(3, len(key)):
        at = at[buf[at + j] == key[j]]
    ids, digits, alive = np.zeros(len(at), dtype=np.int64), np.zeros(len(at), dtype=np.int64), np.ones(len(at), bool)
    for d in range(1, _MAX_ID_DIGITS + 1):  # the id's digits, read backwards from its closing quote
        byte = buf[np.maximum(at - d, 0)]
        alive &= (byte >= 48) & (byte <= 57) & (at - d >= 0)
        if not alive.any():
            break
        ids += np.where(alive, (byte.astype(np.int64) - 48) * 10 ** (d - 1), 0)
        digits += alive
    opening = np.maximum(at - digits - 1, 0)
    before = buf[np.maximum(opening - 1, 0)]
    if not ((digits > 0) & (buf[opening] == ord('"')) & ((before == ord("{")) | (before == ord(",")))).all():
        raise ValueError("the prompt_logprobs keys are not token ids")
    first = np.flatnonzero(before == ord("{"))  # a position's first entry opens its dict
    if len(first) != length - 1:
        raise ValueError(f"the answer holds {len(first)} scored positions, not {length - 1}")
    rows, width = entries_of(first, np.diff(np.append(first, len(at))), positions)
    at = at[rows].ravel()  # only the kept rows' log-probs are parsed
    number = buf[np.minimum(at[:, None] + len(key) + np.arange(_MAX_NUMBER_BYTES), len(buf) - 1)]  # [R * M, 25]
    ends = (number == ord(",")) | (number == ord("}"))
    if not ends.any(1).all():
        raise ValueError("a prompt log-prob is not a JSON number")
    # NUL-padded after the number, which a bytes dtype strips
    number = np.where(np.arange(_MAX_NUMBER_BYTES) < ends.argmax(1)[:, None], number, 0).astype(np.uint8)
    logp = number.view(f"S{_MAX_NUMBER_BYTES}")[:, 0].astype(np.float64).reshape(rows.shape)
    return ids[rows], logp, width
