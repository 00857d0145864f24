#!/usr/bin/env bash
# One `tip train` run over several GPUs and nodes on SLURM: one torchrun per node, one rank per GPU.
#
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm_train.sh pair=qwen3 budget=0.5 out_dir=/shared/runs/q3-b05
#
# Every argument goes to `tip train` as a Hydra override. Run it from the repo with tip's venv active (or set
# TORCHRUN=/path/to/venv/bin/torchrun). Give out_dir on a file system every node mounts: each rank writes its shards
# of the checkpoints there (checkpoints/step_N/dcp/), and rank 0 the metrics, the HF export and eval results.
# Submitting the same command again resumes from the last checkpoint, with the same --nodes and GPUs per node.
# train.prompts_per_step must be a multiple of the number of ranks (nodes x GPUs per node).
#
# (hydra/launcher=slurm, conf/hydra/launcher/slurm.yaml, runs each job of a sweep as one process; use this script
# for a run that needs more than one GPU.)
#SBATCH --job-name=tip
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# c10d rendezvous on the first node: the ranks of all nodes meet there, then NCCL carries the training traffic
srun --kill-on-bad-exit=1 "${TORCHRUN:-torchrun}" \
  --nnodes "$SLURM_NNODES" \
  --nproc_per_node "$gpus_per_node" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${nodes[0]}:29500" \
  --rdzv_id "$SLURM_JOB_ID" \
  -m tip_cli.cli train "$@"
