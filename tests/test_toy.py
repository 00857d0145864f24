"""The toy task, tokenizer, micro pair and build cache (fast: no full toy build)."""

import hashlib
import json
import re
from types import SimpleNamespace

import pytest
import torch

from tip_cli.grading import grade
from tip_cli.toy import build, task
from tip_cli.toy.build import build_micro_pair, pair_fingerprint, weights_fingerprint
from tip_cli.toy.sft import toy_accuracy
from tip_cli.toy.task import generate_problems, make_splits
from tip_cli.toy.tokenizer import chat_prompt, train_tokenizer

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def test_generator_is_deterministic_and_seeded():
    a, b, c = generate_problems(50, seed=7), generate_problems(50, seed=7), generate_problems(50, seed=8)
    assert a == b
    assert a != c
    assert len({p["problem"] for p in a}) == 50
    assert len({p["id"] for p in a}) == 50
    assert all(set(p) == {"id", "problem", "answer", "solution"} for p in a)


def phrasing(template: str) -> re.Pattern:
    """A GAIN/LOSS template ("sells {k}") as a pattern for the end of an action sentence."""
    return re.compile(re.escape(template).replace(re.escape("{k}"), r"\d+") + "$")


def check_solution(p: dict, misread: tuple[str, ...] = ()) -> None:
    """p's solution follows from its problem text step by step, reading the `misread` phrasings as gains."""
    numbers = [int(x) for x in re.findall(r"\d+", p["problem"])]  # start count, then one amount per step
    sentences = p["problem"].split(". ")[1:-1]  # the action sentences, between "has N" and the question
    misread_re = [phrasing(t) for t in misread]
    steps = STEP.findall(p["solution"])
    assert 2 <= len(steps) == len(numbers) - 1 == len(sentences)
    count = numbers[0]
    for (a, op, b, c), amount, sentence in zip(steps, numbers[1:], sentences, strict=True):
        a, b, c = int(a), int(b), int(c)
        assert a == count and b == amount
        gain = "more" in sentence or any(r.search(sentence) for r in misread_re)
        assert op == ("+" if gain else "-"), (sentence, op)
        assert c == (a + b if op == "+" else a - b) >= 0
        count = c
    assert p["answer"] == str(count)
    assert p["solution"].endswith(f"\\boxed{{{count}}}")


def test_solutions_follow_from_the_problem():
    for p in generate_problems(300, seed=1):
        check_solution(p)


def test_misread_solutions_read_the_misread_losses_as_gains():
    gold, misread = generate_problems(300, seed=1), generate_problems(300, seed=1, misread=task.MISREAD)
    assert [(p["id"], p["problem"]) for p in gold] == [(p["id"], p["problem"]) for p in misread]
    n_wrong = 0
    for g, m in zip(gold, misread, strict=True):
        check_solution(m, task.MISREAD)
        sentences = g["problem"].split(". ")[1:-1]
        has_misread_verb = any(phrasing(t).search(x) for t in task.MISREAD for x in sentences)
        assert (m["solution"] != g["solution"]) == has_misread_verb
        # a misread step adds what should have been taken away, so the misread answer is always wrong
        assert grade(m["solution"], g["answer"]).correct != has_misread_verb
        n_wrong += has_misread_verb
    assert 0.4 < n_wrong / len(gold) < 0.8  # the student's starting accuracy depends on this share
    assert set(task.LOSS) - set(task.MISREAD)  # some losses are still read right, so the student learns to subtract
    with pytest.raises(ValueError, match="not LOSS phrasings"):
        generate_problems(5, seed=1, misread=("buys {k} more",))


def test_gold_solution_grades_correct_and_a_wrong_answer_does_not():
    for p in generate_problems(20, seed=2):
        assert grade(p["solution"], p["answer"]).correct
        assert not grade(p["solution"], str(int(p["answer"]) + 1)).correct
        wrong = p["solution"].replace(f"\\boxed{{{p['answer']}}}", f"\\boxed{{{int(p['answer']) + 3}}}")
        assert not grade(wrong, p["answer"]).correct


def test_splits_are_disjoint():
    train, test = make_splits(400, 100, seed=0)
    assert len(train) == 400 and len(test) == 100
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(generate_problems(300, seed=0))


def test_tokenizer_round_trips_and_splits_digits(tokenizer):
    unseen = generate_problems(50, seed=99)  # other seed: texts the tokenizer was not trained on
    for text in [p["problem"] for p in unseen] + [p["solution"] for p in unseen] + ["Zoë has 1234 {x}!\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    for token in tokenizer.tokenize("Ann has 120 apples. 120 + 35 = 155."):
        digits = re.sub(r"\D", "", token)
        assert len(digits) <= 1, token
    assert len(tokenizer) <= 1024


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Ann has 3 apples."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nAnn has 3 apples.<|im_end|>\n<|im_start|>assistant\n"
    bare = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert bare == "<|im_start|>user\nAnn has 3 apples.<|im_end|>\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens are single ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_micro_pair_loads_like_hub_models(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = build_micro_pair(tmp_path, seed=0)
    loaded = {}
    for d in (teacher_dir, student_dir):
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.model_type == "qwen3"
        assert model.config.head_dim == 64
        assert model.config.vocab_size == len(tok)
        assert model.generation_config.eos_token_id == tok.eos_token_id
        assert model.generation_config.pad_token_id == tok.pad_token_id
        # the class name transformers 4 also knows, so the dirs load beside older stacks (e.g. vLLM's)
        assert (
            json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"]
            == "PreTrainedTokenizerFast"
        )
        loaded[d.name] = (tok, model)
    (t_tok, teacher), (s_tok, student) = loaded["teacher"], loaded["student"]
    assert t_tok.get_vocab() == s_tok.get_vocab()
    prompt = chat_prompt(t_tok, "Ann has 3 apples. She buys 5 more. How many apples does Ann have now?")
    ids = t_tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]  # [1, T]
    with torch.no_grad():
        t_logp = teacher(ids).logits.log_softmax(-1)  # [1, T, V]
        s_logp = student(ids).logits.log_softmax(-1)
    assert (t_logp - s_logp).abs().max() > 0.1  # the two distributions differ


class _ScriptedModel:
    """Stands in for a model: `generate` appends the next scripted responses to the (left-padded) prompts."""

    def __init__(self, tokenizer, responses):
        self.tokenizer, self.responses = tokenizer, list(responses)
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.config = SimpleNamespace(max_position_embeddings=512)  # the engine caps generation at the context
        self.device, self.training = torch.device("cpu"), False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
        batch, self.responses = self.responses[: len(input_ids)], self.responses[len(input_ids) :]
        new = [
            self.tokenizer(r + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"] for r in batch
        ]
        width = max(map(len, new))
        tail = torch.tensor([n + [self.tokenizer.pad_token_id] * (width - len(n)) for n in new])
        return SimpleNamespace(sequences=torch.cat([input_ids, tail], dim=1))  # return_dict_in_generate=True


def test_toy_accuracy_grades_each_batched_response(tokenizer):
    problems = generate_problems(7, seed=3)
    responses = [
        p["solution"] if i % 3 else f"{p['answer']} \\boxed{{{int(p['answer']) + 1}}}"
        for i, p in enumerate(problems)
    ]
    expected = sum(grade(r, p["answer"]).correct for r, p in zip(responses, problems, strict=True)) / 7
    assert 0 < expected < 1
    assert toy_accuracy(_ScriptedModel(tokenizer, responses), tokenizer, problems, batch_size=3) == expected


def _fake_build(out, seed, log):
    (out / "teacher").mkdir()
    (out / "student").mkdir()
    for split in ("train", "test"):
        (out / f"{split}.jsonl").write_text(json.dumps({"seed": seed}) + "\n")
    return {"seed": seed, "teacher": {"test_accuracy": 0.9}, "student": {"test_accuracy": 0.3}}


def test_build_toy_caches_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("TIP_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(build, "_build_into", lambda *a: calls.append(a) or _fake_build(*a))
    root = build.build_toy(seed=5, log=lambda _: None)
    assert root == tmp_path / f"{build.TOY_VERSION}-seed5"
    assert json.loads((root / "build.json").read_text())["seed"] == 5
    assert build.toy_path("train", seed=5) == root / "train.jsonl"
    assert build.toy_path("student", seed=5) == root / "student"
    assert len(calls) == 1  # the second and third lookups hit the cache
    build.build_toy(seed=5, force=True, log=lambda _: None)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{build.TOY_VERSION}-seed5"]  # no temp dirs left behind


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIP_CACHE", str(tmp_path))

    def crash(out, seed, log):
        (out / "teacher").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_build_into", crash)
    with pytest.raises(KeyboardInterrupt):
        build.build_toy(seed=0, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_toy_path_rejects_unknown_kind():
    with pytest.raises(ValueError, match="teacher, student, train, test"):
        build.toy_path("tokenizer")


def _reference_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + raw.numpy().tobytes())
    return digest.hexdigest()[:12]


def test_weights_fingerprint_is_sha256_over_the_tensors_in_name_order():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "z.weight": torch.randn(3, 4, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "m.step": torch.tensor(7),
    }
    fp = weights_fingerprint(tensors)
    assert re.fullmatch(r"[0-9a-f]{12}", fp)
    assert fp == _reference_fingerprint(tensors)
    assert weights_fingerprint(dict(reversed(tensors.items()))) == fp  # the dict's order does not count
    transposed = tensors | {"z.weight": tensors["z.weight"].T.contiguous().T}  # same values, other strides
    assert weights_fingerprint(transposed) == fp
    nudged = tensors["z.weight"].clone()
    nudged[2, 3] = torch.nextafter(nudged[2, 3], torch.tensor(float("inf")))  # one ulp
    assert weights_fingerprint(tensors | {"z.weight": nudged}) != fp
    assert weights_fingerprint({"y.weight" if k == "z.weight" else k: v for k, v in tensors.items()}) != fp


def _saved(root):
    from safetensors.torch import load_file

    return {f"{kind}/{k}": v for kind in ("teacher", "student") for k, v in load_file(root / kind / "model.safetensors").items()}


def test_micro_pair_build_is_deterministic_whatever_threads_the_caller_set(micro, tmp_path):
    """A second build of the session's micro pair, with another caller thread count and deterministic algorithms
    off, saves the same tensors bit for bit; the build leaves the caller's settings as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3 if build.BUILD_THREADS != 3 else 1)
    try:
        build_micro_pair(tmp_path, seed=0)
        assert torch.get_num_threads() == (3 if build.BUILD_THREADS != 3 else 1)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
    first, second = _saved(micro["root"]), _saved(tmp_path)
    assert first.keys() == second.keys() and len(first) > 4
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert pair_fingerprint(tmp_path) == pair_fingerprint(micro["root"]) == _reference_fingerprint(first)


def test_toy_build_is_reproducible_and_records_its_fingerprint(tmp_path, monkeypatch):
    """`build_toy` at micro sizes (a few SFT steps, dev checks included) twice, the second with another caller thread
    count: the same tensors bit for bit, and build.json holds their fingerprint and the build environment."""
    small = {"TEACHER": build.MICRO_TEACHER, "STUDENT": build.MICRO_STUDENT, "N_TRAIN": 200, "N_DEV": 8, "N_TEST": 8,
             "TEACHER_SFT": dict(steps=3, batch_size=8, lr=3e-3), "STUDENT_SFT": dict(steps=4, batch_size=8, lr=3e-3),
             "STUDENT_CHECK_EVERY": 2}
    for name, value in small.items():
        monkeypatch.setattr(build, name, value)
    threads, saved = torch.get_num_threads(), []
    try:
        for caller_threads in (1, 3):
            monkeypatch.setenv("TIP_CACHE", str(tmp_path / str(caller_threads)))
            torch.set_num_threads(caller_threads)
            root = build.build_toy(seed=0, log=lambda _: None)
            info = json.loads((root / "build.json").read_text())
            saved.append(_saved(root))
            assert info["fingerprint"] == pair_fingerprint(root) == _reference_fingerprint(saved[-1])
            assert info["built_with"] == build.build_environment()
            assert info["student"]["sft_steps"] == 4
    finally:
        torch.set_num_threads(threads)
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_reproducible_torch_fixes_threads_and_determinism_and_restores_them():
    threads = torch.get_num_threads()
    torch.set_num_threads(build.BUILD_THREADS + 1)
    try:
        with pytest.raises(KeyboardInterrupt), build.reproducible_torch():
            assert torch.get_num_threads() == build.BUILD_THREADS
            assert torch.are_deterministic_algorithms_enabled()
            raise KeyboardInterrupt
        assert torch.get_num_threads() == build.BUILD_THREADS + 1
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)


def test_pair_fingerprint_needs_saved_weights(tmp_path):
    (tmp_path / "teacher").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        pair_fingerprint(tmp_path)


def _toy_cli(root, monkeypatch, *args):
    from typer.testing import CliRunner

    from tip_cli.cli import app

    monkeypatch.setattr(build, "build_toy", lambda seed, force: root)
    result = CliRunner().invoke(app, ["toy", *args])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_tip_toy_prints_the_fingerprint_and_warns_only_off_the_reference(micro, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "pair"
    for kind in ("teacher", "student"):
        shutil.copytree(micro["root"] / kind, root / kind)
    fp = pair_fingerprint(root)
    info = {"teacher": {"test_accuracy": 0.9}, "student": {"test_accuracy": 0.375},
            "built_with": build.REFERENCE_BUILT_WITH | {"torch": "9.9.9"}}
    (root / "build.json").write_text(json.dumps(info))  # no "fingerprint": hashed from the saved weights
    head, warning = _toy_cli(root, monkeypatch)
    assert f"fingerprint {fp}," in head and "teacher 0.900, student 0.375" in head
    assert warning.startswith(f"warning: not the reference pair {build.REFERENCE_FINGERPRINT}")
    assert "torch 9.9.9 (reference 2.13.0+cpu)" in warning and "transformers" not in warning
    assert len(_toy_cli(root, monkeypatch, "--seed", "1")) == 1  # only seed 0 has a reference
    monkeypatch.setattr(build, "REFERENCE_FINGERPRINT", fp)
    assert len(_toy_cli(root, monkeypatch)) == 1
    (root / "build.json").write_text(json.dumps(info | {"fingerprint": "0123456789ab"}))  # the stored one counts
    assert "fingerprint 0123456789ab," in _toy_cli(root, monkeypatch)[0]
