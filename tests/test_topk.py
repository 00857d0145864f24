"""The top-K teacher's conversion (tip_cli.teacher.topk) against a plain per-position sort of vLLM's dicts, on random
payloads with ties, repeated ids and the JSON `vllm serve` writes."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tip_cli.teacher import topk

# decoded tokens that look like JSON structure, escapes, non-ASCII
TOKENS = ["a", " the", '"', "\\", '":{"logprob":-1,', '{"7":{"logprob":0.5}}', "},{", "東京", "🙂", "\n", "null", ""]


def _payload(rng: random.Random, length: int, k: int, vocab: int = 160_000):
    """Per prompt position 1 .. length - 1: vLLM's K + 1 candidates (the prompt token, then K distinct top ids in
    rank order) as (ids, log-probs); the log-probs come from a few values, so ties are common."""
    values = [-0.0, -0.5, -1.0, -1.25, -2.5, -1e-05, -3.0517578125e-05, -9999.0, -0.6931471805599453]
    rows = []
    for _ in range(length - 1):
        top = rng.sample(range(vocab), k)
        lps = sorted((rng.choice(values) if rng.random() < 0.7 else -rng.random() * 12 for _ in range(k)), reverse=True)
        if rng.random() < 0.4:  # the prompt token is one of the top K: vLLM sends it twice, same value
            j = rng.randrange(k)
            rows.append(([top[j], *top], [lps[j], *lps]))
        else:
            rows.append(([rng.randrange(vocab), *top], [rng.choice(values), *lps]))
    return rows


def _as_dicts(rows) -> list[dict[int, float] | None]:
    """vLLM's dict per position (a repeated id keeps its first place, the last value); position 0 has none."""
    out = [None]
    for ids, lps in rows:
        d = {}
        for i, lp in zip(ids, lps, strict=True):
            d[i] = lp
        out.append(d)
    return out


def _reference(dicts, positions, k):
    """The plain per-position sort: each dict's K most likely entries, ties in dict order."""
    best = [sorted(dicts[t + 1].items(), key=lambda kv: kv[1], reverse=True)[:k] for t in positions]
    return (torch.tensor([[i for i, _ in row] for row in best], dtype=torch.long).view(-1, k),
            torch.tensor([[lp for _, lp in row] for row in best], dtype=torch.float32).view(-1, k))


def _flat(rows) -> SimpleNamespace:
    """The fields of vLLM's FlatLogprobs for these positions (position 0 empty)."""
    ids = [i for r, _ in rows for i in r]
    starts = [0, *np.cumsum([0] + [len(r) for r, _ in rows])[:-1].tolist()]
    ends = [0, *np.cumsum([len(r) for r, _ in rows]).tolist()]
    return SimpleNamespace(start_indices=starts, end_indices=ends, token_ids=ids,
                           logprobs=[lp for _, lps in rows for lp in lps])


def _server_json(dicts, rng: random.Random) -> bytes:
    """A `/v1/completions` answer as `vllm serve` writes it (Starlette's JSONResponse separators, no ASCII escapes)."""
    plp = [None if d is None else {str(i): {"logprob": lp, "rank": r + 1, "decoded_token": rng.choice(TOKENS)}
                                   for r, (i, lp) in enumerate(d.items())} for d in dicts]
    body = {"id": "cmpl-1", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": "{", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                         "prompt_logprobs": plp, "prompt_token_ids": None}],
            "usage": {"prompt_tokens": len(dicts), "total_tokens": len(dicts) + 1, "completion_tokens": 1}}
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("k", [1, 2, 5, 20])
def test_both_conversions_equal_the_per_position_sort(k):
    rng = random.Random(k)
    seqs = [_payload(rng, n, k) for n in (2, 7, 40, 130)]
    positions = [sorted(rng.sample(range(len(rows)), rng.randrange(1, len(rows) + 1))) for rows in seqs]
    dicts = [_as_dicts(rows) for rows in seqs]
    want = [_reference(d, p, k) for d, p in zip(dicts, positions, strict=True)]
    want = torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want])
    assert any(len(set(d.values())) < len(d) for ds in dicts for d in ds[1:])  # ties: their order is checked too
    flat = topk.targets([topk.flat_rows(_flat(rows), p) for rows, p in zip(seqs, positions, strict=True)], k)
    served = topk.targets([topk.json_rows(_server_json(d, rng), len(d), p)
                           for d, p in zip(dicts, positions, strict=True)], k)
    for ids, logp in (flat, served):
        assert ids.dtype == torch.long and logp.dtype == torch.float32 and ids.shape == (sum(map(len, positions)), k)
        assert torch.equal(ids, want[0])
        assert torch.equal(logp, want[1])


def test_json_numbers_parse_as_python_floats():
    """Every float repr JSON can carry (exponents, subnormals, 17 digits) reads back bit for bit."""
    gen = np.random.default_rng(0)
    lps = np.concatenate([-np.abs(gen.standard_normal(3000)) * 10.0 ** gen.integers(-300, 5, 3000),
                          [-5e-324, -2.2250738585072014e-308, -1.7976931348623157e308, -0.0, -9999.0]])
    dicts = [None, *({i: float(lp)} for i, lp in enumerate(lps))]
    ids, logp, width = topk.json_rows(_server_json(dicts, random.Random(0)), len(dicts), list(range(len(lps))))
    assert width.tolist() == [1] * len(lps)
    assert ids[:, 0].tolist() == list(range(len(lps)))
    assert logp[:, 0].tobytes() == lps.tobytes()


def test_an_answer_in_another_layout_is_refused():
    rng = random.Random(0)
    dicts = _as_dicts(_payload(rng, 6, 3))
    raw = _server_json(dicts, rng)
    with pytest.raises(ValueError, match="holds 5 scored positions, not 6"):
        topk.json_rows(raw, 7, [0])
    with pytest.raises(ValueError, match="holds 0 scored positions"):  # the fields in another order
        topk.json_rows(raw.replace(b'{"logprob"', b'{"rank":1,"logprob"'), 6, [0])
    with pytest.raises(ValueError, match="fewer than 3 distinct"):
        topk.best_k(np.array([[4, 4, 5, 6]]), np.zeros((1, 4)), np.array([3]), 3)
