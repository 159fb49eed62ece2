#!/usr/bin/env bash
# One call on a 2-GPU node without network: the pretraining step speed with engine.cuda_graphs (batch 256 and
# 1024 side by side, one per GPU), the crystal encoder alone against PyG SchNet, and the DDP step on both GPUs.
# Figures of the shipped config without cuda_graphs come from benchmarks/results/pretrain_speed.json (--merge).
# Needs .whl/ and .gpu/data/mp_20 carried along. Results (and logs) in $OUT.
set -u
OUT=${OUT:-/tmp/speed_out}
LIMIT=${LIMIT:-570}
T0=$(date +%s)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
if [ ! -f /tmp/shards/mp20p/manifest.json ]; then
  python3 benchmarks/data_build.py --root .gpu/data/mp_20 --out /tmp/shards/mp20p --workers 16 > "$OUT/build.log" 2>&1
fi
echo "shards at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"
timeout $(( LIMIT - ($(date +%s) - T0) )) python3 benchmarks/pretrain_speed.py --shards /tmp/shards/mp20p \
    --cuda-graphs --graphs-only --parallel --ddp --warmup 30 --steps 30 \
    --merge benchmarks/results/pretrain_speed.json --workdir /tmp/ps \
    --result "$OUT/pretrain_speed.json" --ddp-result "$OUT/pretrain_2gpu_speed.json" > "$OUT/speed.log" 2>&1
echo "speed rc $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"
for d in /tmp/ps/*/; do [ -f "$d/train.log" ] && tail -c 6000 "$d/train.log" > "$OUT/$(basename "$d")_train_tail.log"; done
cp /tmp/ps/*_profile.txt "$OUT/" 2>/dev/null
cat "$OUT/timeline.txt"; tail -5 "$OUT/speed.log"
