"""The deployment scripts and page: every script parses (`bash -n`), and every `tip train` override they and
docs/deployment.md pass names a schema key, or a config group and one of its options."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tip_cli.cli import compose_config
from tip_cli.config.compose import CONF_DIR, schema_keys

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts" / "deploy").iterdir())
PAGE = ROOT / "docs" / "deployment.md"

# where `tip train` overrides start on a (continuation-joined) line: the CLI, torchrun's module, a deploy script's
# command line (it passes its arguments on; `$here/` is how one script calls another), or the train_args array
TRAIN_START = re.compile(r"(?:\btip\s+train|tip_cli\.cli\s+train|(?:scripts/deploy|\$here)/[\w.]+\"?)\s|"
                         r"\btrain_args\+?=\(")
SHELL = ";&|<>()"  # a token of these alone (a pipe, a redirection, the array's end) ends the command


def train_overrides(text: str) -> list[str]:
    """The `key=value` tokens that reach `tip train` in a shell or markdown text: each line (backslash-continued
    lines joined, a leading `#` dropped) from where the train command starts up to the end of the shell command."""
    found = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip().removeprefix("#")
        for start in TRAIN_START.finditer(line):
            lexer = shlex.shlex(line[start.end():], posix=True, punctuation_chars=SHELL)
            lexer.whitespace_split, lexer.commenters = True, "#"
            try:
                tokens = list(lexer)
            except ValueError:  # an unclosed quote in prose
                continue
            for tok in tokens:
                if set(tok) <= set(SHELL):
                    break
                if "=" in tok and re.match(r"[+~]{0,2}[a-z_][\w./]*=", tok):
                    found.append(tok)
    return found


GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"hydra/launcher"}
KEYS = set(schema_keys())


def invalid(override: str) -> str | None:
    """Why `override` is no valid `tip train` argument, or None."""
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    if key in KEYS:
        return None
    if key in GROUPS:
        if "$" in value or (CONF_DIR / key / f"{value}.yaml").exists():
            return None
        return f"{override}: conf/{key}/ has no {value}.yaml"
    return f"{override}: {key} is no schema key nor config group"


def test_the_checker_finds_overrides_and_rejects_bad_ones():
    text = ("torchrun -m tip_cli.cli train \\\n  rollout=vllm_server 'rollout.url=[http://a:1,http://b:2]' \"$@\"\n"
            "# scripts/deploy/x.sh +experiment=qwen3_math500 rollout.weight_transfers=nccl | tee log\n"
            "train_args+=(teacher.topk=\"$TOPK\" x=1) CUDA_VISIBLE_DEVICES=0 plain=1\n"
            "tip train pair=nope budget=0.5 > out.txt seed=1\n")
    assert train_overrides(text) == ["rollout=vllm_server", "rollout.url=[http://a:1,http://b:2]",
                                     "+experiment=qwen3_math500", "rollout.weight_transfers=nccl",
                                     "teacher.topk=$TOPK", "x=1", "pair=nope", "budget=0.5"]
    bad = {o for o in train_overrides(text) if invalid(o)}
    assert bad == {"rollout.weight_transfers=nccl", "x=1", "pair=nope"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(path):
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", [*SCRIPTS, PAGE], ids=lambda p: p.name)
def test_every_train_override_is_a_schema_key(path):
    overrides = train_overrides(path.read_text())
    if path.name != "lib.sh":  # sourced helpers, no trainer
        assert overrides, f"no `tip train` overrides found in {path.name}"
    assert [why for o in overrides if (why := invalid(o))] == []


# a stand-in for `vllm serve` and tip's launcher: answers GET /v1/models on --port, after recording its argv, pid
# and environment in $STUB_DIR/<port>.json; `--exit` makes it fail at once instead
STUB = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
argv = sys.argv[1:]
if "--exit" in argv:
    sys.exit("stub: failing as asked")
port = int(argv[argv.index("--port") + 1])
record = {"argv": argv, "pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "dev_mode": os.environ.get("VLLM_SERVER_DEV_MODE")}
open(os.path.join(os.environ["STUB_DIR"], f"{port}.json"), "w").write(json.dumps(record))
class Models(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(b'{"data": []}')
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", port), Models).serve_forever()
"""


def free_ports(n: int) -> int:
    """The first of n consecutive free local ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n < 65536 and all(_free(first + i) for i in range(n)):
            return first
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def reap(tmp_path):
    """Kills any stub a failing script left running."""
    yield
    for record in (tmp_path / "stubs").glob("*.json"):
        pid = json.loads(record.read_text())["pid"]
        if _alive(pid):
            os.kill(pid, 9)


def run_node_script(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    """disaggregated_node.sh with stub servers and a torchrun that writes its argv and fails with 3: (the run,
    torchrun's argv or [], the stubs' records by port)."""
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    fake_python = tmp_path / "python"  # `$PYTHON -m tip_cli.rollout.serve ...`: the stub, which ignores -m
    fake_python.write_text(f"#!/bin/sh\nexec {sys.executable} {stub} \"$@\"\n")
    torchrun = tmp_path / "torchrun"
    torchrun.write_text(f"#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done > {tmp_path / 'argv'}\nexit 3\n")
    for f in (fake_python, torchrun):
        f.chmod(0o755)
    (tmp_path / "stubs").mkdir()
    first = free_ports(4)
    env = {**os.environ, "STUB_DIR": str(tmp_path / "stubs"), "PYTHON": str(fake_python), "TORCHRUN": str(torchrun),
           "VLLM_SERVE": f"{sys.executable} {stub}", "STUDENT_PORT": str(first), "TEACHER_PORT": str(first + 2),
           "LOG_DIR": str(tmp_path / "logs"), "READY_TIMEOUT": "20", **env}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "deploy" / "disaggregated_node.sh"), "train.steps=2"],
                          env=env, capture_output=True, text=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines() if (tmp_path / "argv").exists() else []
    stubs = {int(p.stem): json.loads(p.read_text()) for p in (tmp_path / "stubs").glob("*.json")}
    return done, argv, stubs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_node_script_serves_waits_trains_against_the_urls_and_stops_the_servers(tmp_path, reap):
    done, argv, stubs = run_node_script(tmp_path)
    assert done.returncode == 3, done.stderr  # the trainer's exit status, through the trap that stops the servers
    assert argv[:4] == ["--standalone", "--nproc_per_node", "4", "-m"]  # TRAIN_GPUS 4,5,6,7: one rank each
    overrides = argv[argv.index("train") + 1:]
    assert overrides[-1] == "train.steps=2"  # the caller's arguments come last, so they win
    cfg = compose_config(overrides)
    ports = sorted(stubs)
    assert cfg.rollout.engine == "vllm_server" and cfg.teacher.backend == "vllm_server"
    assert cfg.rollout.url == [f"http://127.0.0.1:{p}" for p in ports[:2]]
    assert cfg.teacher.url == [f"http://127.0.0.1:{p}" for p in ports[2:]]
    assert (cfg.rollout.weight_transfer, cfg.rollout.max_staleness, cfg.teacher.topk) == ("filesystem", 1, 20)
    assert (cfg.pair.student, cfg.pair.teacher, cfg.train.steps) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", 2)
    # one replica per GPU; the students with the weight-transfer routes (dev mode, tip's file backend)
    assert [stubs[p]["cuda"] for p in ports] == ["0", "1", "2", "3"]
    assert [stubs[p]["dev_mode"] for p in ports] == ["1", "1", None, None]
    for p in ports[:2]:
        args = stubs[p]["argv"]
        assert args[:2] == ["-m", "tip_cli.rollout.serve"]
        assert json.loads(args[args.index("--weight-transfer-config") + 1]) == {"backend": "tip_file"}
    for p in ports[2:]:
        args = stubs[p]["argv"]
        assert args[0] == "Qwen/Qwen3-8B" and args[args.index("--max-logprobs") + 1] == "20"
    assert [p for p in ports if _alive(stubs[p]["pid"])] == []  # the EXIT trap stopped them


def test_node_script_stops_before_training_when_a_server_dies(tmp_path, reap):
    done, argv, stubs = run_node_script(tmp_path, STUDENT_GPUS="0", TEACHER_GPUS="1", TEACHER_SERVE_ARGS="--exit")
    assert done.returncode != 0 and argv == []
    assert "teacher0 exited before answering" in done.stderr and "stub: failing as asked" in done.stderr
    assert [p for p, s in stubs.items() if _alive(s["pid"])] == []
