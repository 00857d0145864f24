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

The parts: the task (tip_cli.toy.task), the tokenizer (toy.tokenizer), the models and SFT (toy.sft). This module
builds the pair and caches it; `cached_build` is the one build-or-cache of every embedded pair. Every build runs
with BUILD_THREADS threads and torch's deterministic algorithms, so a seed gives the same weights on a given machine
and library stack, and `pair_fingerprint` (a hash of the saved weights) tells whether a pair is the reference one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import tokenizers
import torch
import transformers
from safetensors.torch import load_file

from tip_cli.cache import cache_root
from tip_cli.config.schema import ConfigError
from tip_cli.toy.sft import ModelSpec, new_model, save_model, sft, sft_batches, toy_accuracy
from tip_cli.toy.task import MISREAD, generate_problems, make_splits
from tip_cli.toy.tokenizer import train_tokenizer

TOY_VERSION = "toy-v2"
KINDS = ("teacher", "student", "train", "test")

TEACHER = ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
STUDENT = ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384)

N_TRAIN, N_DEV, N_TEST = 5000, 100, 200
TEACHER_SFT = dict(
    steps=400, batch_size=32, lr=3e-3
)  # 88-97% test accuracy (seeds 0, 1); ~2 min on 2 idle cores
STUDENT_SFT = dict(steps=800, batch_size=32, lr=3e-3)  # a cap; the dev check below stops it earlier
# The student trains until its greedy answers match the MISREAD solutions' on this share of the dev problems: by
# then the misreading is confident, while the arithmetic still slips on about a quarter of the problems, so its
# accuracy on the true answers is near 0.75 x 0.42 (0.42: the share of seed-0 test problems without a misread verb).
STUDENT_MISREAD_TARGET, STUDENT_CHECK_EVERY = 0.75, 50
# Every embedded pair trains with this many threads, whatever the machine or the caller's setting: the reference
# machine's two cores (tiny matmuls gain little from more).
BUILD_THREADS = 2
# toy-v2-seed0 as the reference machine (2 cores, AVX2) builds it from a clean cache, and what it was
# built with: the same seed gives other weights under other library versions or vector kernels (torch's AVX2 vs
# AVX-512 kernels, MKL's code path for the CPU model round differently), and the student's dev-accuracy stop
# amplifies a last-bit difference into another stopping step.
REFERENCE_FINGERPRINT = "2def04140783"
REFERENCE_BUILT_WITH = {
    "torch": "2.13.0+cpu",
    "transformers": "5.19.0",
    "tokenizers": "0.23.3",
    "cpu_kernels": "AVX2",
    "machine": "x86_64",
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The first 12 hex digits of sha256 over `tensors` in name order, each as `name|dtype|shape|` then its bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def pair_fingerprint(root: Path) -> str:
    """`weights_fingerprint` of the teacher's and student's saved tensors, named teacher/<name> and student/<name>."""
    tensors: dict[str, torch.Tensor] = {}
    for kind in ("teacher", "student"):
        files = sorted((root / kind).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{root / kind} holds no *.safetensors weights; rebuild with `tip toy --force`")
        for f in files:
            tensors |= {f"{kind}/{name}": t for name, t in load_file(f).items()}
    return weights_fingerprint(tensors)


def build_environment() -> dict[str, str]:
    """What besides the seed decides a build's weights: library versions, torch's CPU kernels, the architecture."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def describe_pair(root: Path, seed: int) -> list[str]:
    """`tip toy`'s lines on a built pair: its fingerprint and test accuracies, then, for seed 0, a warning when the
    fingerprint is not REFERENCE_FINGERPRINT (a pair cached before fingerprints were stored is hashed here)."""
    info = json.loads((root / "build.json").read_text())
    fingerprint = info.get("fingerprint") or pair_fingerprint(root)
    lines = [
        f"toy pair {root}: fingerprint {fingerprint}, greedy test accuracy teacher "
        f"{info['teacher']['test_accuracy']:.3f}, student {info['student']['test_accuracy']:.3f}"
    ]
    if seed == 0 and fingerprint != REFERENCE_FINGERPRINT:
        built_with = info.get("built_with")
        differs = [f"{k} {v} (reference {REFERENCE_BUILT_WITH.get(k)})" for k, v in (built_with or {}).items()
                   if REFERENCE_BUILT_WITH.get(k) != v]
        if built_with is None:
            why = "its build.json has no build record; `tip toy --force` rebuilds it"
        elif differs:
            why = "built with " + ", ".join(differs)
        else:
            why = "same versions and kernels as the reference, so MKL's code path for this CPU model is the likely cause"
        lines.append(
            f"warning: not the reference pair {REFERENCE_FINGERPRINT} (the reference machine's build; docs: Reproduction), "
            f"so its accuracies and the runs on it will differ from the reference's: {why}"
        )
    return lines


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
    info["fingerprint"], info["built_with"] = pair_fingerprint(out), build_environment()
    return info


@contextmanager
def reproducible_torch(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Run the block with `threads` intra-op threads and torch's deterministic algorithms, then restore both.

    A build's weights then depend on the seed, the library versions and the CPU's vector kernels only, not on the
    machine's core count or the caller's OMP_NUM_THREADS (an intra-op reduction split over other thread counts sums
    in another order)."""
    caller_threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(caller_threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def build_atomically(final: Path, build: Callable[[Path], dict]) -> dict:
    """Run `build(dir)` in a temp dir beside `final`, write its info to build.json and rename the dir into place;
    return the info. An interrupted build leaves no cache behind; when a concurrent build of the same pair wins the
    rename, its result is used."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        start = time.time()
        with reproducible_torch():
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

    Layout: teacher/, student/ (HF model + tokenizer dirs), train.jsonl, dev.jsonl, test.jsonl, build.json (sizes,
    accuracies, `fingerprint` = pair_fingerprint, `built_with` = build_environment).
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
        raise ConfigError(f"unknown toy kind {kind!r}; expected one of: {', '.join(KINDS)}")
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
    with reproducible_torch():
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
