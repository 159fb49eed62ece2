#!/usr/bin/env bash
# Start train.py with torchrun on this node; run the same command on every node of the job.
#
#   bash configs/launch/torchrun_pretrain.sh                                   # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash configs/launch/torchrun_pretrain.sh   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash configs/launch/torchrun_pretrain.sh   # on node1
#   DRY_RUN=1 bash configs/launch/torchrun_pretrain.sh                         # print the command, start nothing
#
# Arguments after the script go to train.py, e.g.
#   --data.mode=stream --data.urls.train='pipe:aws s3 cp s3://bucket/mp/train/shard-{000000..000511}.tar -'
#
# Environment (default):
#   CONFIG          training config (configs/pretrain/mp20p_multinode.yaml)
#   NNODES          nodes in the job ($SLURM_NNODES, else 1)
#   NODE_RANK       this node's index, 0 .. NNODES-1 ($SLURM_NODEID, else 0)
#   NPROC_PER_NODE  processes = GPUs on this node (the GPUs nvidia-smi lists, else 1)
#   MASTER_ADDR     host of node 0 (first host of $SLURM_JOB_NODELIST, else 127.0.0.1)
#   MASTER_PORT     free TCP port on node 0 (29500)
#   PYTHON          interpreter with mmmat installed (python)
#   MMMAT_ROOT      the repository root (two folders above this script); relative paths start there
#
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and GROUP_RANK in every process; Lightning detects them
# (TorchElasticEnvironment) and checks trainer.num_nodes x trainer.devices == WORLD_SIZE, so the script
# passes --trainer.num_nodes=$NNODES --trainer.devices=$NPROC_PER_NODE. Inside a SLURM allocation
# (srun with one task per node running this script) Lightning would take the SLURM variables instead and
# find one task per node; the script marks the job interactive for Lightning (SLURM_JOB_NAME=interactive,
# Lightning's documented switch) so torchrun's variables are used.
set -euo pipefail

cd "${MMMAT_ROOT:-$(dirname "${BASH_SOURCE[0]}")/../..}"   # the repository root: paths are relative to it
CONFIG=${CONFIG:-configs/pretrain/mp20p_multinode.yaml}
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ ${NPROC_PER_NODE:-0} -gt 0 ]] || NPROC_PER_NODE=1
fi
if [[ -z ${MASTER_ADDR:-} ]]; then
  if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then   # no scontrol: first host of "gpu[017-018,020],cpu1" is gpu017
    nl=$SLURM_JOB_NODELIST
    if [[ ${nl%%,*} == *"["* ]]; then
      range=${nl#*[}
      range=${range%%]*}
      MASTER_ADDR=${nl%%[*}${range%%[,-]*}
    else
      MASTER_ADDR=${nl%%,*}
    fi
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -n ${SLURM_NTASKS:-} ]]; then
  export SLURM_JOB_NAME=interactive
fi

# NCCL between nodes (see README "Scaling out"): uncomment what your cluster needs.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                       # INFO prints the chosen transport (IB, sockets)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed rank ends the job
# export NCCL_SOCKET_IFNAME=ib0,eth0                        # interfaces between nodes (ip -br addr)
# export NCCL_IB_HCA=mlx5                                   # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                                  # no InfiniBand: TCP sockets only

if [[ $NNODES -eq 1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
fi
cmd=("$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node="$NPROC_PER_NODE"
     train.py fit --config "$CONFIG" --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
