#!/usr/bin/env bash
# On a GPU node without network: install carried wheels, build mp20p shards on its cores, then measure the
# loader with 16 workers and what one GPU consumes (PyG SchNet). Results land in ${OUT:-benchmarks/results}.
# Needs: .whl/ (wheels from ../shared/docs/GPU.md) and .gpu/data/ (mp_20 + the text corpora) carried along.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
WORKERS=${WORKERS:-16}
python3 benchmarks/data_build.py --root .gpu/data/mp_20 --out /tmp/shards/mp20p --workers "$WORKERS" --fresh \
    --result "$OUT/data_build_gpu_node.json" 2>&1 | tail -n 30
python3 benchmarks/loader.py --shards /tmp/shards/mp20p --workers "$WORKERS" --schnet --batches 100 \
    --result "$OUT/loader_gpu.json" 2>&1 | tail -n 30
