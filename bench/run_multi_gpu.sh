#!/usr/bin/env bash
# Multi-GPU checks on a lent 2-GPU machine (nvidia-h200-x2), in one call; carry .whl (pydantic, gguf wheels for Python 3.12):
#   bash bench/run_multi_gpu.sh            -> $OUT/report.md (+ the JSON of every run)
# A CPU dry run of the same steps: DRY=1 bash bench/run_multi_gpu.sh
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never multicast
OUT=${OUT:-out/multi_gpu}; mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}; TORCHRUN=${TORCHRUN:-torchrun}
if [ -n "${DRY:-}" ]; then
  M=/tmp/mg_tiny; EXTRA="--device cpu --prompts 3 --new-tokens 8 --prompt-len 6"
  "$PY" bench/multi_gpu.py prepare --tiny --out $M --device cpu --init-range 0.2 --folder "$OUT"
  IX="--index-n 5000 --dim 32"
else
  M=/tmp/q14; EXTRA=""; IX=""
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  [ -f $M/config.json ] || "$PY" bench/multi_gpu.py prepare --out $M --device cuda:0 --folder "$OUT"
fi
"$PY" bench/multi_gpu.py run --model $M --mode single $EXTRA --folder "$OUT"
"$PY" bench/multi_gpu.py run --model $M --mode device_map $EXTRA --folder "$OUT"
"$TORCHRUN" --nproc-per-node 2 bench/multi_gpu.py run --model $M --mode tp $EXTRA --folder "$OUT"
"$PY" bench/multi_gpu.py index $IX --folder "$OUT"
"$PY" bench/multi_gpu.py report --folder "$OUT"
