#!/usr/bin/env bash
# On a GPU node without network: install carried wheels, build mp20p shards once (kept while the machine
# stays warm), then run benchmarks/pretrain.py with the arguments given to this script.
# Needs .whl/ and .gpu/data/ (mp_20, text corpora, xrd_measured) carried along.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ ! -d /tmp/site/pymatgen ] || [ ! -d /tmp/site/jsonargparse ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ ! -f /tmp/shards/mp20p/manifest.json ]; then
  python3 benchmarks/data_build.py --root .gpu/data/mp_20 --out /tmp/shards/mp20p --workers 16 \
      --result "$OUT/data_build_gpu_node.json" > "$OUT/build.log" 2>&1
fi
python3 benchmarks/pretrain.py --shards /tmp/shards/mp20p \
    --measured .gpu/data/xrd_measured/iucr_rietveld_cifs_cdvae_xrd/cif_files.tar.xz "$@"
