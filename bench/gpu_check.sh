#!/usr/bin/env bash
# bash bench/gpu_check.sh OUT_DIR
# The checks a CPU cannot show, in one short run on one GPU (~6 minutes): bf16-mixed chosen by
# device and training the demo, 8-bit AdamW + gradient checkpointing on the lowmem config,
# FSDP on one GPU, and bench/gpu.py (250M T5: fp32 vs bf16 vs 8-bit vs checkpointing).
# Wheels missing on the GPU machine may be put in .whl/gpu/ (datasets, jsonargparse, bitsandbytes).
set -u
OUT=${1:-${OUT:-/tmp/gpu_check}}
RUNS=/tmp/gpu_check_runs
mkdir -p "$OUT" "$RUNS"
if ls .whl/gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gpu/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export CHATLM_CACHE_DIR=$RUNS/cache
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, transformers, lightning, datasets, jsonargparse
print("torch", torch.__version__, "transformers", transformers.__version__, "lightning", lightning.__version__,
      "datasets", datasets.__version__, "jsonargparse", jsonargparse.__version__)
print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)
PY
step() {  # step NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" python3 -m src fit "$@" --trainer.default_root_dir "$RUNS/$name" \
      --trainer.enable_progress_bar false > "$RUNS/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
  grep -E "precision|Using bf16|error|Error" "$RUNS/$name.log" | head -5 | tee -a "$OUT/steps.txt"
  [ -f "$RUNS/$name/summary.json" ] && cp "$RUNS/$name/summary.json" "$OUT/${name}_summary.json"
  [ $rc -ne 0 ] && tail -20 "$RUNS/$name.log" >> "$OUT/steps.txt"
  return 0
}
step demo 120 --config configs/demo.yaml --trainer.max_steps 1000
step lowmem 90 --config configs/lowmem.yaml --trainer.max_steps 30 --trainer.max_epochs 1 \
    --data.batch_size 16 --model.bleu_max_samples 8 --run.export_hf false
step fsdp 90 --config configs/fsdp.yaml --trainer.devices 1 --trainer.max_steps 20 \
    --trainer.max_epochs 1 --model.bleu_max_samples 8 --run.export_hf false
timeout 180 python3 bench/gpu.py --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1
echo "== gpu_bench: exit $?" | tee -a "$OUT/steps.txt"
tail -30 "$OUT/gpu_bench.log"
