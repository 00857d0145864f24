"""Rollout throughput of the `hf` and `vllm` engines, side by side on the same prompts and sampling settings.

    python scripts/bench_rollout.py                       # the embedded toy student, 64 prompts x 4 samples
    python scripts/bench_rollout.py --model PATH --prompts 256 --max-new-tokens 1024

Each engine first runs one warm-up batch, then `--repeats` timed batches; prints a Markdown table of generated
tokens per second (median) and the ratio vllm / hf, and writes the numbers to bench_rollout.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from tip_cli.config.schema import PairConfig, VLLMConfig
from tip_cli.models import load_model, load_tokenizer, pick_device
from tip_cli.rollout.batch import Sampling
from tip_cli.rollout.hf import HFEngine
from tip_cli.toy.build import toy_path
from tip_cli.toy.tokenizer import chat_prompt


def toy_prompts(tok, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in toy_path("test").open()]
    rows = (rows * (n // len(rows) + 1))[:n]
    return [tok(chat_prompt(tok, r["problem"]), add_special_tokens=False)["input_ids"] for r in rows]


def measure(engine, prompts: list[list[int]], sampling: Sampling, repeats: int) -> dict:
    engine.generate(prompts[: max(1, len(prompts) // 8)], sampling)  # warm-up
    rates, tokens = [], 0
    for i in range(repeats):
        start = time.perf_counter()
        out = engine.generate(prompts, replace(sampling, seed=i))
        seconds = time.perf_counter() - start
        tokens = sum(map(len, out.tokens))
        rates.append(tokens / seconds)
    return {"tokens_per_s": statistics.median(rates), "tokens": tokens, "runs": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or path (default: the toy student)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-batch", type=int, default=64, help="sequences per HF generate call")
    parser.add_argument("--out", default="bench_rollout.json")
    args = parser.parse_args()

    path = args.model or str(toy_path("student"))
    device = pick_device("auto")
    model = load_model(path, PairConfig(), device, trainable=False)
    tok = load_tokenizer(path, PairConfig())
    prompts = toy_prompts(tok, args.prompts) if args.model is None else [
        tok(chat_prompt(tok, f"What is {i} + {i + 1}?"), add_special_tokens=False)["input_ids"] for i in range(args.prompts)
    ]
    sampling = Sampling(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    results = {"hf": measure(HFEngine(model, tok, args.hf_batch), prompts, sampling, args.repeats)}
    from tip_cli.rollout.vllm import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(path, tok, VLLMConfig(), model.dtype, eos=model.generation_config.eos_token_id)
    results["vllm"] = {**measure(engine, prompts, sampling, args.repeats), "startup_s": time.perf_counter() - start}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nrollout throughput on {device_name}: {path}, {args.prompts} prompts x {args.samples} samples, "
          f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}\n")
    print("| engine | tokens/s (median) | tokens per batch | vs hf |\n| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens']} | {r['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x |")
    print(f"\nvLLM engine start-up: {results['vllm']['startup_s']:.1f} s")
    Path(args.out).write_text(json.dumps({"args": vars(args), "device": device_name, "results": results}, indent=1))


if __name__ == "__main__":
    main()
