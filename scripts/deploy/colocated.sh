#!/usr/bin/env bash
# Colocated OPD on one node (tip's default shape): one torchrun rank per GPU, each holding its FSDP2 shard of the
# student, a replica of the teacher and an in-process vLLM engine of the student (rollout=vllm) that sleeps while the
# rank trains and gets the new weights in place after every update.
#
#   scripts/deploy/colocated.sh +experiment=qwen3_math500 out_dir=runs/q3
#   GPUS=0,1,2,3 scripts/deploy/colocated.sh +experiment=qwen3_math500 parallel.shard_teacher=true
#
# Every argument goes to `tip train` as a Hydra override, after the script's own (so it can override them).
# train.prompts_per_step must be a multiple of the number of GPUs.
# Variables:
#   STUDENT, TEACHER   the pair's models (Qwen/Qwen3-1.7B, Qwen/Qwen3-8B); PAIR: the pair config (qwen3)
#   GPUS               the GPUs, comma-separated (default: every GPU nvidia-smi lists), one rank each
#   ROLLOUT_SHARE      rollout.vllm.gpu_memory_utilization, the engine's share of each GPU while it is awake (0.3)
#   TORCHRUN           the torchrun of tip's environment (torchrun)
set -euo pipefail

STUDENT=${STUDENT:-Qwen/Qwen3-1.7B}
TEACHER=${TEACHER:-Qwen/Qwen3-8B}
PAIR=${PAIR:-qwen3}
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)}
ROLLOUT_SHARE=${ROLLOUT_SHARE:-0.3}

export CUDA_VISIBLE_DEVICES=$GPUS
nproc=$(tr , '\n' <<<"$GPUS" | grep -c .)
exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node "$nproc" -m tip_cli.cli train \
  pair="$PAIR" pair.student="$STUDENT" pair.teacher="$TEACHER" \
  rollout=vllm rollout.vllm.gpu_memory_utilization="$ROLLOUT_SHARE" "$@"
