"""The top-K teacher's conversion of vLLM's prompt log-probs into [N, K] targets: per-position dict sorts against
tip_cli.teacher.topk, side by side in one run, on a synthetic payload of the real shape.

    python scripts/bench_topk.py                              # 8 sequences x 4,096 tokens, K 20
    python scripts/bench_topk.py --seqs 2 --length 8192 --vllm   # also vLLM's own building of the two layouts

Two paths, in CPU milliseconds of this process per 1,000 scored positions (median of --repeat):
- server (teacher.backend=vllm_server): a `/v1/completions` answer's bytes (JSON as `vllm serve` writes it, with its
  `decoded_token` strings) to targets: json.loads then a sort of each position's dict, against `topk.json_rows`.
- engine (teacher.backend=vllm_topk): vLLM's per-sequence output to targets: a sort of each position's
  dict[int, Logprob], against `topk.flat_rows` on the FlatLogprobs lists (`SamplingParams(flat_logprobs=True)`).
  With --vllm, also the time vLLM's output processor spends building each layout (vllm.logprobs), which the engine
  path pays before the conversion.
The first --prompt tokens of each sequence are the prompt: every position is scored by vLLM, the rest are kept.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from tip_cli.teacher import topk

TOKENS = [" the", "Ġ", "東京", "\\", '"', " answer", "12", "\n\n", " is"]


@dataclass
class Logprob:  # the fields of vllm.logprobs.Logprob, without importing vLLM
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def payload(rng: random.Random, length: int, k: int, vocab: int) -> list[tuple[list[int], list[float], list[int]]]:
    """Per prompt position 1 .. length - 1, vLLM's K + 1 candidates: (ids, float32-valued log-probs, ranks)."""
    rows = []
    for _ in range(length - 1):
        top = rng.sample(range(vocab), k)
        lps = np.sort(-np.abs(np.asarray([rng.gauss(0, 4) for _ in range(k)], dtype=np.float32)))[::-1].tolist()
        own = rng.randrange(k + 5)  # the prompt token's rank; past K it is outside the top K
        first = (top[own], lps[own]) if own < k else (rng.randrange(vocab), lps[-1] - rng.random())
        rows.append(([first[0], *top], [float(np.float32(first[1])), *lps], [own + 1, *range(1, k + 1)]))
    return rows


def as_dicts(rows, decoded: bool) -> list[dict[int, Logprob] | None]:
    return [None] + [{i: Logprob(lp, r, TOKENS[i % len(TOKENS)] if decoded else None)
                      for i, lp, r in zip(*row, strict=True)} for row in rows]


def as_flat(rows) -> SimpleNamespace:
    widths = [len(ids) for ids, _, _ in rows]
    ends = np.cumsum(widths).tolist()
    return SimpleNamespace(start_indices=[0, 0, *ends[:-1]], end_indices=[0, *ends],
                           token_ids=[i for ids, _, _ in rows for i in ids], logprobs=[lp for _, lps, _ in rows for lp in lps])


def server_bytes(dicts) -> bytes:
    plp = [None if d is None else {str(i): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
                                   for i, v in d.items()} for d in dicts]
    body = {"id": "cmpl-0", "object": "text_completion", "model": "teacher",
            "choices": [{"index": 0, "text": " the", "logprobs": None, "finish_reason": "length", "prompt_logprobs": plp}]}
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def sorted_rows(entries, positions: list[int], k: int, logprob) -> tuple[list[list[int]], list[list[float]]]:
    """The per-position conversion: each position's dict sorted by log-prob, its first K."""
    ids, lps = [], []
    for t in positions:
        best = sorted(entries[t + 1].items(), key=lambda kv: logprob(kv[1]), reverse=True)[:k]
        ids.append([int(tok) for tok, _ in best])
        lps.append([float(logprob(v)) for _, v in best])
    return ids, lps


def as_tensors(parts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [row for p in parts for row in p[0]]
    lps = [row for p in parts for row in p[1]]
    return torch.tensor(ids, dtype=torch.long).view(-1, k), torch.tensor(lps, dtype=torch.float32).view(-1, k)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), out


def vllm_build_times(rows, k: int, repeat: int) -> tuple[float, float]:
    """Seconds vLLM spends appending one sequence's prompt log-probs as dicts and as FlatLogprobs (no detokenizing)."""
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    def build(flat: bool):
        out = create_prompt_logprobs(flat)
        for ids, lps, ranks in rows:
            append_logprobs_for_next_position(out, ids, lps, iter([None] * len(ids)), ranks[0], k)
        return out

    return timed(lambda: build(False), repeat)[0], timed(lambda: build(True), repeat)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--prompt", type=int, default=512, help="leading tokens per sequence that are not scored")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vllm", action="store_true", help="also time vLLM's building of both layouts (imports vLLM)")
    args = ap.parse_args()
    rng = random.Random(0)
    seqs = [payload(rng, args.length, args.k, args.vocab) for _ in range(args.seqs)]
    positions = [list(range(args.prompt - 1, args.length - 1))] * args.seqs
    n = sum(map(len, positions))
    dicts = [as_dicts(rows, decoded=False) for rows in seqs]
    flats = [as_flat(rows) for rows in seqs]
    raws = [server_bytes(as_dicts(rows, decoded=True)) for rows in seqs]

    def old_server():
        return as_tensors([sorted_rows(json.loads(raw)["choices"][0]["prompt_logprobs"], p, args.k,
                                       lambda v: v["logprob"]) for raw, p in zip(raws, positions, strict=True)], args.k)

    def new_server():
        return topk.targets([topk.json_rows(raw, args.length, p) for raw, p in zip(raws, positions, strict=True)], args.k)

    def old_engine():
        return as_tensors([sorted_rows(d, p, args.k, lambda v: v.logprob)
                           for d, p in zip(dicts, positions, strict=True)], args.k)

    def new_engine():
        return topk.targets([topk.flat_rows(f, p) for f, p in zip(flats, positions, strict=True)], args.k)

    per_k = 1000 / n
    print(f"{args.seqs} sequences x {args.length} tokens, {n} scored positions, K {args.k}; "
          f"server answer {statistics.mean(map(len, raws)) / args.length / 1000:.2f} kB per position")
    print(f"{'path':<28} {'old ms/1k pos':>14} {'new ms/1k pos':>14} {'old/new':>8}")
    for name, old, new in (("server (JSON bytes)", old_server, new_server), ("engine (vLLM output)", old_engine, new_engine)):
        t_old, want = timed(old, args.repeat)
        t_new, got = timed(new, args.repeat)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), f"{name}: the conversions differ"
        print(f"{name:<28} {t_old * 1000 * per_k:>14.2f} {t_new * 1000 * per_k:>14.2f} {t_old / t_new:>8.1f}")
    if args.vllm:
        t_dict, t_flat = vllm_build_times(seqs[0], args.k, args.repeat)
        per_k = 1000 / (args.length - 1)
        print(f"{'vLLM builds (dict vs flat)':<28} {t_dict * 1000 * per_k:>14.2f} {t_flat * 1000 * per_k:>14.2f} "
              f"{t_dict / t_flat:>8.1f}")


if __name__ == "__main__":
    main()
