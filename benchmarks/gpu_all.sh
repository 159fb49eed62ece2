#!/usr/bin/env bash
# GPU benchmarks on a node without network, one phase per call (files under /tmp persist while the machine
# stays warm, so later phases reuse the shards, the pretrained model and the fine-tuned predictor):
#   OUT=DIR bash benchmarks/gpu_all.sh pretrain SECONDS      1 GPU: pretrain_1gpu.json, model in /tmp/run1/model
#                                                            (RESULT=name, EXTRA="train.py overrides")
#   OUT=DIR bash benchmarks/gpu_all.sh pretrain_fit SECONDS  the same, training only (no retrieval evaluation)
#   OUT=DIR bash benchmarks/gpu_all.sh pretrain_eval         then its evaluation: pretrain_1gpu.json
#   OUT=DIR bash benchmarks/gpu_all.sh finetune SECONDS      finetune.json (12 runs of SECONDS each)
#   OUT=DIR bash benchmarks/gpu_all.sh generate SECONDS      generator training + generate.json + de novo samples
#                                                            (GEN_TRAIN_ARGS="train.py overrides", e.g.
#                                                            --model.init_args.template_k=4; GEN_ARGS="generate.py
#                                                            options", e.g. --rank learned --k 10)
#   OUT=DIR bash benchmarks/gpu_all.sh generate_fit STEPS    the same training over several calls (CALL_SECONDS each),
#                                                            resumed from /tmp/gen/sitting.ckpt; then generate_eval
#   OUT=DIR bash benchmarks/gpu_all.sh finetune_start SET..  detached fine-tuning runs of those settings, JOBS at a
#                                                            time, STEPS (and STEPS_1K) steps each; then `wait`
#   OUT=DIR bash benchmarks/gpu_all.sh generate_start SECONDS detached generator training; then `wait`, generate_eval
#   OUT=DIR bash benchmarks/gpu_all.sh wait SECONDS          until the detached jobs end (or SECONDS pass), then
#                                                            copies finetune.json and the generator's metrics
#   OUT=DIR bash benchmarks/gpu_all.sh ddp SAMPLES           2 GPUs: 1-GPU throughput on the same card, then DDP
#   OUT=DIR bash benchmarks/gpu_all.sh profile [OVERRIDES]    step profiles, 1 GPU then DDP: $OUT/p1, $OUT/p2
# Needs .whl/ (CPython 3.12 wheels, see ../shared/docs/GPU.md) and .gpu/data/ (mp_20, text corpora, xrd_measured).
set -euo pipefail
PHASE=$1
ARG=${2:-}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ ! -d /tmp/site/pymatgen ] || [ ! -d /tmp/site/chgnet ] || [ ! -d /tmp/site/jsonargparse ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SHARDS=/tmp/shards/mp20p
if [ ! -f $SHARDS/manifest.json ]; then
  python3 benchmarks/data_build.py --root .gpu/data/mp_20 --out $SHARDS --workers 16 \
      --result "$OUT/data_build_gpu_node.json" > "$OUT/build.log" 2>&1
fi
MEASURED=.gpu/data/xrd_measured/iucr_rietveld_cifs_cdvae_xrd/cif_files.tar.xz
case $PHASE in
  pretrain)
    python3 benchmarks/pretrain.py --shards $SHARDS --measured $MEASURED --queries /tmp/queries.pt \
        --config configs/pretrain/mp20p.yaml --workdir /tmp/run1 --seconds "${ARG:-240}" \
        --result "$OUT/${RESULT:-pretrain_1gpu}.json" ${EXTRA:-} 2>&1 | grep -v Warning | tail -n 40
    ;;
  pretrain_fit)
    # training only (the retrieval evaluation is the next call's pretrain_eval); the test query profiles are
    # built meanwhile by a detached process, so they outlive this call
    [ -f /tmp/queries.pt ] || setsid nohup python3 benchmarks/pretrain.py --shards $SHARDS \
        --build-queries /tmp/queries.pt > /tmp/queries.log 2>&1 < /dev/null &
    python3 benchmarks/pretrain.py --shards $SHARDS --config configs/pretrain/mp20p.yaml --workdir /tmp/run1 \
        --seconds "${ARG:-240}" --no-eval --result "$OUT/pretrain_1gpu.json" 2>&1 | grep -v Warning | tail -n 12
    cp "$OUT/pretrain_1gpu.json" /tmp/pretrain_1gpu_fit.json
    ;;
  pretrain_eval)
    cp /tmp/pretrain_1gpu_fit.json "$OUT/pretrain_1gpu.json"
    python3 benchmarks/pretrain.py --shards $SHARDS --measured $MEASURED --queries /tmp/queries.pt \
        --wait-queries 300 --workdir /tmp/run1 --eval-only --result "$OUT/pretrain_1gpu.json" 2>&1 \
        | grep -E "R@1_|crystal_R@|median" | tail -n 30
    ;;
  finetune)
    # TARGETS="formation_energy_per_atom" ... runs those only; a later call with the others merges them in
    [ -f /tmp/finetune.json ] && cp /tmp/finetune.json "$OUT/finetune.json"
    [ -f /tmp/denovo_eval.log ] && { echo "== de novo evaluation"; grep -v -E "Warning|DLASCL" /tmp/denovo_eval.log | tail -n 3; }
    [ -f /tmp/denovo_eval/report.json ] && mkdir -p "$OUT/denovo_eval" && cp /tmp/denovo_eval/* "$OUT/denovo_eval/"
    python3 benchmarks/finetune.py --pretrained /tmp/run1/model --shards $SHARDS --seconds "${ARG:-20}" \
        ${TARGETS:+--targets $TARGETS} --merge --workdir /tmp/ft --baselines --result "$OUT/finetune.json" 2>&1 \
        | grep -E "MAE|Error|error|gain" | tail -n 40
    cp "$OUT/finetune.json" /tmp/finetune.json
    ;;
  generate)
    cat > /tmp/gen_overlay.yaml <<EOF
trainer:
  callbacks:
    - class_path: mmmat.tasks.callbacks.TimeBudget
      init_args: {seconds: ${ARG:-240}, calibrate_steps: 200}
    - class_path: mmmat.tasks.callbacks.Throughput
EOF
    python3 train.py fit --config configs/generate/mp20p.yaml --config /tmp/gen_overlay.yaml \
        --data.shards=$SHARDS --model.init_args.pretrained=/tmp/run1/model --data.tokenizer=/tmp/run1/model/tokenizer \
        --model.init_args.save_dir=/tmp/gen/model --trainer.default_root_dir=/tmp/gen \
        --trainer.logger.init_args.save_dir=/tmp/gen ${GEN_TRAIN_ARGS:-} 2>&1 | grep -v Warning | tail -n 5
    cp "$(ls -d /tmp/gen/generate/version_* | tail -n 1)/metrics.csv" "$OUT/generate_train_metrics.csv"
    PRED=${PRED:-/tmp/ft/formation_energy_per_atom_finetuned_all/model}
    python3 benchmarks/generate.py --model /tmp/gen/model --shards $SHARDS --workers 16 \
        $( [ -d $PRED ] && echo --predictor $PRED ) --denovo-out "$OUT/denovo" ${GEN_ARGS:-} \
        --result "$OUT/generate.json" 2>&1 | grep -v -E "Warning|DLASCL" | tail -n 30
    ;;
  generate_fit)
    # a fixed schedule of ARG steps over several calls: each call trains CALL_SECONDS (default 480) and stops at
    # an epoch end with a checkpoint; the next call resumes from it. The model folder is rewritten each call.
    STEPS=${ARG:?total steps}
    printf '%s\n' "trainer:" "  max_steps: $STEPS" "  callbacks:" \
        "    - class_path: mmmat.tasks.callbacks.StopAfter" \
        "      init_args: {seconds: ${CALL_SECONDS:-480}, checkpoint: /tmp/gen/sitting.ckpt}" \
        "    - class_path: mmmat.tasks.callbacks.Throughput" \
        "model:" "  init_args: {max_steps: $STEPS}" > /tmp/gen_fit.yaml
    RESUME=$( [ -f /tmp/gen/sitting.ckpt ] && echo --ckpt_path=/tmp/gen/sitting.ckpt || true )
    python3 train.py fit --config configs/generate/mp20p.yaml --config /tmp/gen_fit.yaml \
        --data.shards=$SHARDS --model.init_args.pretrained=/tmp/run1/model --data.tokenizer=/tmp/run1/model/tokenizer \
        --model.init_args.save_dir=/tmp/gen/model --trainer.default_root_dir=/tmp/gen \
        --trainer.logger.init_args.save_dir=/tmp/gen ${GEN_TRAIN_ARGS:-} $RESUME 2>&1 | grep -v Warning | tail -n 5
    python3 -c "import torch; print('step', torch.load('/tmp/gen/sitting.ckpt', weights_only=False)['global_step'])"
    ;;
  generate_eval)
    cat /tmp/gen/generate/version_*/metrics.csv > "$OUT/generate_train_metrics.csv"
    PRED=${PRED:-/tmp/ft/formation_energy_per_atom_finetuned_all/model}
    python3 benchmarks/generate.py --model /tmp/gen/model --shards $SHARDS --workers 16 \
        $( [ -d $PRED ] && echo --predictor $PRED ) --denovo-out /tmp/denovo ${GEN_ARGS:-} \
        --result "$OUT/generate.json" 2>&1 | grep -v -E "Warning|DLASCL" | tail -n 30
    if [ -d .gpu/data/eval ]; then
      # the staged report of the de novo samples on this card (what `mmmat evaluate` runs), detached (collect it
      # with `wait`), with the CHGNet hull of the train split and the test split's coverage fingerprints computed
      # beforehand (.gpu/data/eval); CHGNet relaxations in RELAX_WORKERS processes
      mkdir -p /tmp/evalcache /tmp/denovo_eval && cp -n .gpu/data/eval/coverage_fps_test.npz /tmp/evalcache/
      setsid nohup python3 -c "import sys; from mmmat.evaluation.report import evaluate_folder as ev; \
r = ev('/tmp/denovo', '$SHARDS', '/tmp/denovo_eval/report.json', hull='.gpu/data/eval/hull_mp20p_train.json', \
relax_steps=int(sys.argv[1]), workers=int(sys.argv[2]), device='cuda', cache_dir='/tmp/evalcache'); \
print({k: v for k, v in r['metrics'].items() if 'rate' in k or 'valid' in k})" \
          "${RELAX_STEPS:-500}" "${RELAX_WORKERS:-12}" > /tmp/denovo_eval.log 2>&1 < /dev/null &
      echo $! >> /tmp/detached.pids
      echo "de novo evaluation started"
    fi
    ;;
  finetune_start)
    # detached: outlives this call while the machine stays warm; results merge into /tmp/finetune.json
    shift
    PRE=$( [ "$*" = scratch ] || echo --pretrained /tmp/run1/model )  # scratch alone needs no pretrained model
    setsid nohup python3 benchmarks/finetune.py $PRE --shards $SHARDS --settings "$@" \
        --seconds 0 --max-steps "${STEPS:-4000}" --max-steps-small "${STEPS_1K:-2000}" --jobs "${JOBS:-3}" \
        ${TARGETS:+--targets $TARGETS} --merge --workdir /tmp/ft --baselines --result /tmp/finetune.json \
        > "/tmp/ft_$1.log" 2>&1 < /dev/null &
    echo $! >> /tmp/detached.pids
    echo "fine-tuning $* started"
    ;;
  generate_start)
    printf '%s\n' "trainer:" "  callbacks:" "    - class_path: mmmat.tasks.callbacks.TimeBudget" \
        "      init_args: {seconds: ${ARG:-1200}, calibrate_steps: 200}" \
        "    - class_path: mmmat.tasks.callbacks.Throughput" > /tmp/gen_overlay.yaml
    setsid nohup python3 train.py fit --config configs/generate/mp20p.yaml --config /tmp/gen_overlay.yaml \
        --data.shards=$SHARDS --model.init_args.pretrained=/tmp/run1/model --data.tokenizer=/tmp/run1/model/tokenizer \
        --model.init_args.save_dir=/tmp/gen/model --trainer.default_root_dir=/tmp/gen \
        --trainer.logger.init_args.save_dir=/tmp/gen ${GEN_TRAIN_ARGS:-} > /tmp/gen_train.log 2>&1 < /dev/null &
    echo $! >> /tmp/detached.pids
    echo "generator training started"
    ;;
  wait)
    END=$((SECONDS + ${ARG:-570}))
    while [ $SECONDS -lt $END ]; do
      alive=0
      for p in $(cat /tmp/detached.pids 2>/dev/null); do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 5
    done
    for p in $(cat /tmp/detached.pids 2>/dev/null); do kill -0 "$p" 2>/dev/null && echo "still running: $p"; done
    for f in /tmp/ft_*.log; do [ -f "$f" ] && { echo "== $f"; grep -E "MAE|rror" "$f" | tail -n 12; }; done
    [ -f /tmp/gen_train.log ] && { echo "== generator"; grep -v Warning /tmp/gen_train.log | tail -n 4; }
    ls -d /tmp/gen/generate/version_* > /dev/null 2>&1 && \
        tail -n 2 "$(ls -d /tmp/gen/generate/version_* | tail -n 1)/metrics.csv"
    [ -f /tmp/finetune.json ] && cp /tmp/finetune.json "$OUT/finetune.json"
    [ -f /tmp/denovo_eval.log ] && { echo "== de novo evaluation"; grep -v -E "Warning|DLASCL" /tmp/denovo_eval.log | tail -n 3; }
    [ -f /tmp/denovo_eval/report.json ] && mkdir -p "$OUT/denovo_eval" && cp /tmp/denovo_eval/* "$OUT/denovo_eval/"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
  ddp)
    python3 benchmarks/pretrain.py --shards $SHARDS --config configs/pretrain/mp20p.yaml --devices 1 \
        --seconds 60 --no-eval --no-val --workdir /tmp/d1 --result "$OUT/pretrain_1gpu_same_card.json" 2>&1 | tail -n 3
    python3 benchmarks/pretrain.py --shards $SHARDS --measured $MEASURED --queries /tmp/queries.pt \
        --config configs/pretrain/mp20p_ddp.yaml --samples "$ARG" --workdir /tmp/d2 \
        --result "$OUT/pretrain_2gpu.json" 2>&1 | grep -v Warning | tail -n 20
    python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
one = json.load(open(f"{out}/pretrain_1gpu_same_card.json"))
two = json.load(open(f"{out}/pretrain_2gpu.json"))
two["metrics"]["ddp_speedup"] = two["metrics"]["crystals_per_s"] / one["metrics"]["crystals_per_s"]
two["metrics"]["one_gpu_crystals_per_s_same_card"] = one["metrics"]["crystals_per_s"]
json.dump(two, open(f"{out}/pretrain_2gpu.json", "w"), indent=1)
print("ddp_speedup", two["metrics"]["ddp_speedup"])
EOF
    ;;
  profile)
    # step profile and host-sync count, one GPU then DDP over every GPU of the host: $OUT/p1, $OUT/p2
    python3 benchmarks/pretrain.py --shards $SHARDS --config configs/pretrain/mp20p.yaml --devices 1 --samples 100000000 \
        --no-eval --no-val --workdir /tmp/p1 --profile "$OUT/p1" $ARG 2>&1 | grep -v Warning | tail -n 3
    python3 benchmarks/pretrain.py --shards $SHARDS --config configs/pretrain/mp20p_ddp.yaml --samples 100000000 \
        --no-eval --no-val --workdir /tmp/p2 --profile "$OUT/p2" $ARG 2>&1 | grep -v Warning | tail -n 3
    head -n 4 "$OUT"/p*/profile_rank*.txt
    ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
