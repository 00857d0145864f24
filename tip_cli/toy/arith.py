"""The embedded toy teacher-student pair: a synthetic arithmetic task, a local tokenizer and two tiny Qwen3 models.

No model hub is needed: `build_toy` generates word problems ("Ann has 3 apples. She buys 5 more. ..."), trains a BPE
tokenizer on them, SFT-trains a teacher that solves most of them and a smaller student, and caches both as ordinary
HF model dirs. On-policy distillation from the teacher should then raise the student's accuracy within minutes of CPU
training.

The student is SFT-trained on a systematic misreading rather than on the gold solutions: it gets the direction of an
exchange backwards, reading "gives away", "sells" and "gives ... to a friend" as gains (MISREAD), while "loses" and
"uses" still subtract. It trains until it reproduces that misreading on most dev problems, so it is confident at those
operator tokens (low entropy, p ~ 0.99) while the teacher, trained on the gold solutions, puts its mass on the other
sign (high divergence): the "overconfident and wrong" region Q3 holds a systematic, correctable error, beside the
uncertain arithmetic slips of a small model. Fewer than half of the problems have no misread verb (42% of the seed-0
test split), and the student's arithmetic is right on about three quarters of its own solutions, which puts its
accuracy near 30%.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from tip_cli.cache import cache_root
from tip_cli.envs.toy_agent import NAMES
from tip_cli.grading import grade
from tip_cli.rollout.batch import Sampling
from tip_cli.rollout.hf import HFEngine

TOY_VERSION = "toy-v2"
KINDS = ("teacher", "student", "train", "test")

# ---------------------------------------------------------------------------------------------------------------------
# The task

OBJECTS = "apples pears marbles stickers coins books pencils cookies shells cards stamps balloons".split()
GAIN = [
    "buys {k} more",
    "finds {k} more",
    "gets {k} more from a friend",
    "picks up {k} more",
    "wins {k} more",
]
LOSS = ["gives away {k}", "loses {k}", "sells {k}", "gives {k} to a friend", "uses {k}"]
THEN = ["Then", "After that,", "Later,"]
MAX_START, MAX_STEP = 12, 6  # operands stay small so a few-million-parameter model can learn the arithmetic


# The toy student's systematic error: the exchanges in LOSS read as gains ("loses" and "uses" still subtract).
MISREAD = ("gives away {k}", "sells {k}", "gives {k} to a friend")


def generate_problems(n: int, seed: int, misread: tuple[str, ...] = ()) -> list[dict]:
    """`n` distinct word problems of 2-3 add/subtract steps, deterministic in `seed`.

    Each dict has `id`, `problem`, `answer` (a str) and `solution` ("3 + 5 = 8. 8 - 2 = 6. \\boxed{6}"); every
    intermediate count is a non-negative integer. Problem texts are unique, so slicing one call gives disjoint splits.
    With `misread` (templates from LOSS), `solution` and `answer` are what a solver who reads those phrasings as gains
    writes; the problems, ids and their order are the same as without it.
    """
    unknown = set(misread) - set(LOSS)
    if unknown:
        raise ValueError(f"misread={sorted(unknown)} are not LOSS phrasings; expected some of: {', '.join(LOSS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        name, pron = rng.choice(NAMES)
        obj = rng.choice(OBJECTS)
        count = read = rng.randint(2, MAX_START)  # from 2: "has 1 apples" reads badly
        sentences = [f"{name} has {count} {obj}."]
        steps = []
        for i in range(rng.choice((2, 3))):
            k = rng.randint(1, MAX_STEP)
            add = k > count or rng.random() < 0.5  # never take away more than there is
            template = rng.choice(GAIN if add else LOSS)
            lead = pron.capitalize() if i == 0 else f"{rng.choice(THEN)} {pron}"
            sentences.append(f"{lead} {template.format(k=k)}.")
            count = count + k if add else count - k
            # the solver's own running count: a misread step adds, so it never drops below the true count
            sign = 1 if add or template in misread else -1
            steps.append(f"{read} {'+' if sign > 0 else '-'} {k} = {read + sign * k}.")
            read += sign * k
        sentences.append(f"How many {obj} does {name} have now?")
        problem = " ".join(sentences)
        if problem in seen:
            continue
        seen.add(problem)
        out.append(
            {
                "id": f"toy-{seed}-{len(out)}",
                "problem": problem,
                "answer": str(read),
                "solution": " ".join(steps) + f" \\boxed{{{read}}}",
            }
        )
    return out


def make_splits(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and test problems from one deduplicated draw, so no problem text is in both."""
    problems = generate_problems(n_train + n_test, seed)
    return problems[:n_train], problems[n_train:]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(problems: list[dict], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (lossless round-trip) with single-digit tokens and a ChatML chat template.

    `vocab_size` is a cap: the toy corpus runs out of merges near 470 tokens.

    Digits are split one per token so numbers share a 10-symbol alphabet the models can do arithmetic on.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [t for p in problems for t in (p["problem"], p["solution"])] + ["user\n", "assistant\n"]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def chat_prompt(tokenizer: PreTrainedTokenizerFast, problem: str) -> str:
    """The problem as a single user turn, ending with the assistant header the model continues from."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=False
    )


# ---------------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """Qwen3 sizes. The toy pairs keep head_dim 64: vLLM's CPU attention rejects smaller heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 64
    tie_embeddings: bool = True


TEACHER = ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
STUDENT = ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384)


def qwen3_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, vocab: int, context: int, **extra) -> Qwen3Config:
    """The Qwen3 config of `spec` over `vocab` rows and `context` positions, with the tokenizer's EOS and pad ids and
    no BOS; `extra` sets further Qwen3Config fields (rope_theta, ...)."""
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=context,
        tie_word_embeddings=spec.tie_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **extra,
    )


def new_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM sized by `spec`, deterministic in `seed`."""
    config = qwen3_config(spec, tokenizer, len(tokenizer), 512)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def save_model(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save model and tokenizer side by side, so the dir loads like a hub model with either Auto class."""
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its new class name; the old alias also loads under transformers 4 (e.g. beside vLLM)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def sft_batches(tokenizer: PreTrainedTokenizerFast, problems: list[dict]) -> list[tuple[list[int], int]]:
    """Each problem as (prompt + solution + eos token ids, prompt length); the loss covers only what follows."""
    out = []
    for p in problems:
        prompt = tokenizer(chat_prompt(tokenizer, p["problem"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(p["solution"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append((prompt + answer, len(prompt)))
    return out


def _collate(examples: list[tuple[list[int], int | list[bool]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Pad (ids, what is scored) pairs: a prompt length (every later token is scored) or a per-token bool mask."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)  # [B, T]
    labels = torch.full((len(examples), width), -100)  # [B, T]; -100 = not scored
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for i, (ids, scored) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        keep = torch.arange(len(ids)) >= scored if isinstance(scored, int) else torch.tensor(scored, dtype=torch.bool)
        labels[i, : len(ids)] = torch.where(keep, torch.tensor(ids), -100)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def sft(
    model: Qwen3ForCausalLM,
    data: list[tuple[list[int], int | list[bool]]],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] = print,
    name: str = "sft",
    check_every: int = 0,
    check: Callable[[], bool] | None = None,
) -> int:
    """Minimise the mean cross-entropy of the response tokens (AdamW, warmup + cosine); return the steps taken.

    Each example is (token ids, prompt length) or (token ids, a bool per token saying which are trained on).

    When `check` is given it runs every `check_every` steps and training stops at the first True, which is how
    the student is stopped as soon as it has learned its misreading.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed)
    order: list[int] = []
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        input_ids, labels, mask = _collate(batch, pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps:
            log(f"[{name}] step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if check is not None and check_every and step % check_every == 0:
            stop = check()
            model.train()
            if stop:
                return step
    return steps


@torch.no_grad()
def toy_accuracy(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[dict],
    max_new_tokens: int = 48,
    batch_size: int = 100,
) -> float:
    """Fraction of `problems` whose greedy completion `grade`s correct against `answer`."""
    engine = HFEngine(model, tokenizer, batch_size)
    prompts = [tokenizer(chat_prompt(tokenizer, p["problem"]), add_special_tokens=False)["input_ids"] for p in problems]
    responses = engine.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens)).tokens
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return sum(grade(t, p["answer"]).correct for t, p in zip(texts, problems, strict=True)) / max(1, len(problems))


# ---------------------------------------------------------------------------------------------------------------------
# Building and caching the pair

N_TRAIN, N_DEV, N_TEST = 5000, 100, 200
TEACHER_SFT = dict(
    steps=400, batch_size=32, lr=3e-3
)  # 88-97% test accuracy (seeds 0, 1); ~2 min on 2 idle cores
STUDENT_SFT = dict(steps=800, batch_size=32, lr=3e-3)  # a cap; the dev check below stops it earlier
# The student trains until its greedy answers match the MISREAD solutions' on this share of the dev problems: by
# then the misreading is confident, while the arithmetic still slips on about a quarter of the problems, so its
# accuracy on the true answers is near 0.75 x 0.42 (0.42: the share of seed-0 test problems without a misread verb).
STUDENT_MISREAD_TARGET, STUDENT_CHECK_EVERY = 0.75, 50


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_into(out: Path, seed: int, log: Callable[[str], None]) -> dict:
    """Generate the data, train tokenizer, teacher (on the gold solutions) and student (on the MISREAD ones), and
    write them all under `out`."""
    n = N_TRAIN + N_DEV + N_TEST
    problems, misread_problems = generate_problems(n, seed), generate_problems(n, seed, misread=MISREAD)
    train, dev, test = problems[:N_TRAIN], problems[N_TRAIN : N_TRAIN + N_DEV], problems[N_TRAIN + N_DEV :]
    tokenizer = train_tokenizer(train)
    data = sft_batches(tokenizer, train)
    info: dict = {
        "version": TOY_VERSION,
        "seed": seed,
        "vocab_size": len(tokenizer),
        "n_train": len(train),
        "n_dev": len(dev),
        "n_test": len(test),
    }

    teacher = new_model(TEACHER, tokenizer, seed)
    log(f"[toy] teacher: {_n_params(teacher):,} params, SFT {TEACHER_SFT['steps']} steps")
    steps = sft(teacher, data, tokenizer.pad_token_id, seed=seed, log=log, name="teacher", **TEACHER_SFT)
    info["teacher"] = {
        "params": _n_params(teacher),
        "sft_steps": steps,
        **asdict(TEACHER),
        "test_accuracy": toy_accuracy(teacher, tokenizer, test),
    }
    log(f"[toy] teacher test accuracy {info['teacher']['test_accuracy']:.3f}")
    save_model(teacher, tokenizer, out / "teacher")

    student = new_model(STUDENT, tokenizer, seed + 1)
    misread_dev = misread_problems[N_TRAIN : N_TRAIN + N_DEV]
    misread_acc: list[float] = []

    def learned() -> bool:
        misread_acc.append(toy_accuracy(student, tokenizer, misread_dev))
        log(f"[student] matches the misread dev answers: {misread_acc[-1]:.3f} (stop at >= {STUDENT_MISREAD_TARGET})")
        return misread_acc[-1] >= STUDENT_MISREAD_TARGET

    log(
        f"[toy] student: {_n_params(student):,} params, SFT on solutions that misread {', '.join(MISREAD)} as gains, "
        f"until it reproduces >= {STUDENT_MISREAD_TARGET} of them on dev"
    )
    steps = sft(
        student,
        sft_batches(tokenizer, misread_problems[:N_TRAIN]),
        tokenizer.pad_token_id,
        seed=seed + 1,
        log=log,
        name="student",
        check_every=STUDENT_CHECK_EVERY,
        check=learned,
        **STUDENT_SFT,
    )
    info["student"] = {
        "params": _n_params(student),
        "sft_steps": steps,
        **asdict(STUDENT),
        "misread": list(MISREAD),
        "misread_dev_accuracy": misread_acc[-1] if misread_acc else None,
        "dev_accuracy": toy_accuracy(student, tokenizer, dev),
        "test_accuracy": toy_accuracy(student, tokenizer, test),
    }
    log(f"[toy] student test accuracy {info['student']['test_accuracy']:.3f}")
    save_model(student, tokenizer, out / "student")

    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", rows)
    return info


def build_atomically(final: Path, build: Callable[[Path], dict]) -> dict:
    """Run `build(dir)` in a temp dir beside `final`, write its info to build.json and rename the dir into place;
    return the info. An interrupted build leaves no cache behind; when a concurrent build of the same pair wins the
    rename, its result is used."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    threads = torch.get_num_threads()
    torch.set_num_threads(min(8, os.cpu_count() or 1))  # tiny matmuls gain nothing from more threads
    try:
        start = time.time()
        info = build(tmp)
        info["seconds"] = round(time.time() - start, 1)
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():  # force, or a stale dir without build.json: move it aside, then swap
            old = final.with_name(f"{tmp.name}-old")
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
    except OSError:
        if not (final / "build.json").exists():
            raise
        info = json.loads((final / "build.json").read_text())  # another process finished the same build first
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def cached_build(name: str, build: Callable[[Path], dict], force: bool = False) -> tuple[Path, dict | None]:
    """`cache_root()/name`, built by `build` (through build_atomically) unless its build.json exists and not
    `force`; returns the dir and the new build's info (None when the cache already held the pair)."""
    final = cache_root() / name
    if (final / "build.json").exists() and not force:
        return final, None
    return final, build_atomically(final, build)


def build_toy(seed: int = 0, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build (or find) the toy pair in `cache_root()/toy-v2-seed{seed}` and return that dir.

    Layout: teacher/, student/ (HF model + tokenizer dirs), train.jsonl, dev.jsonl, test.jsonl, build.json.
    """
    final, info = cached_build(f"{TOY_VERSION}-seed{seed}", lambda out: _build_into(out, seed, log), force)
    if info is not None:
        log(
            f"[toy] built {final} in {info['seconds']:.0f}s: teacher {info['teacher']['test_accuracy']:.1%}, "
            f"student {info['student']['test_accuracy']:.1%} greedy test accuracy"
        )
    return final


def toy_path(kind: str, seed: int = 0) -> Path:
    """The toy teacher/student model dir or train/test JSONL file, building the pair first if needed."""
    if kind not in KINDS:
        raise ValueError(f"unknown toy kind {kind!r}; expected one of: {', '.join(KINDS)}")
    root = build_toy(seed)
    return root / (f"{kind}.jsonl" if kind in ("train", "test") else kind)


MICRO_TEACHER = ModelSpec(hidden=128, layers=1, heads=2, kv_heads=1, intermediate=256)
MICRO_STUDENT = ModelSpec(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=128)


def build_micro_pair(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny pair for fast tests, built in seconds: `(out_dir/teacher, out_dir/student)`.

    Same tokenizer recipe and architecture family as the toy pair; the teacher gets a few SFT steps and the
    student none, so their next-token distributions differ. Also writes train.jsonl and test.jsonl.
    """
    out_dir = Path(out_dir)
    train, test = make_splits(300, 20, seed)
    tokenizer = train_tokenizer(train)
    teacher = new_model(MICRO_TEACHER, tokenizer, seed)
    sft(
        teacher,
        sft_batches(tokenizer, train),
        tokenizer.pad_token_id,
        steps=20,
        batch_size=16,
        lr=3e-3,
        seed=seed,
        log=lambda _: None,
    )
    student = new_model(MICRO_STUDENT, tokenizer, seed + 1)
    save_model(teacher, tokenizer, out_dir / "teacher")
    save_model(student, tokenizer, out_dir / "student")
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "test.jsonl", test)
    return out_dir / "teacher", out_dir / "student"
