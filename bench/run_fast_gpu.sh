#!/usr/bin/env bash
# Issue 5's open questions on a lent GPU in ONE call (about 8-9 minutes on an H100; each phase has a time limit so
# whatever finished is in $OUT):
#   1. the fast path's CUDA tests (graphs + compile + Triton kernels against the eager engine; logits processors
#      between the forward and sampling graphs; the reasoning controller in the graph);
#   2. decode, side by side in one process: the top-p search as compiled torch passes (the default) vs the Triton
#      kernels (KVAGENTS_TOPP=kernel, 6x faster alone, one inconclusive end-to-end run);
#   3. cold first calls (empty Inductor / Triton caches, engine build counted) of one prompt x n=8 in its own
#      process, the case furthest from the 20 s bar: defaults; kvagents' Triton kernels compiled in worker processes
#      during the head's compile (KVAGENTS_PRECOMPILE=1); that with the top-p kernels; that with one launch config
#      per Inductor pointwise kernel (KVAGENTS_AUTOTUNE_POINTWISE=0, less to compile and benchmark); B=1 with all.
# Device tool, carrying the wheels the device image lacks (pydantic and pytest, for Python 3.12):
#   python3 -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pydantic==2.12.5 pydantic-core==2.41.5 \
#     annotated-types typing-inspection typing-extensions pytest pluggy iniconfig packaging
#   run(command="bash bench/run_fast_gpu.sh tests variants", carry=[".whl"], kind="nvidia-h100-x1")   (~5 min)
#   run(command="bash bench/run_fast_gpu.sh warm", carry=[".whl"])                                    (~6 min)
# (arguments: the phases to run, of tests, variants, warm; default all three, more than one call's 10 minutes)
set -uo pipefail
OUT=${OUT:-out/fast_gpu}; PY=${PY:-python3}
PHASES=" ${*:-tests variants warm} "
mkdir -p "$OUT"
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/phases.txt"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
  > "$OUT/device.txt" 2>&1

if [[ $PHASES == *" tests "* ]]; then
stamp "1. CUDA tests"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_decode.py tests/test_reasoning.py \
  tests/test_logits_processors.py tests/test_kernel_precompile.py -k "cuda or fast_path" > "$OUT/cuda_tests.txt" 2>&1
stamp "   rc $? ($(tail -n 1 "$OUT/cuda_tests.txt"))"

fi

if [[ $PHASES == *" variants "* ]]; then
stamp "2. decode side by side (ms/step, components off / on)"
timeout 170 "$PY" bench/fast_variants.py --cases B=1,1x8 --variants auto,auto:0:kernel > "$OUT/variants.txt" 2>&1
stamp "   rc $? ($(grep -h 'tok/s' "$OUT/variants.txt" | tr '\n' ';'))"

fi

if [[ $PHASES == *" warm "* ]]; then
stamp "3. cold first calls"
i=0
ALL="--env KVAGENTS_PRECOMPILE=1 --env KVAGENTS_TOPP=kernel --env KVAGENTS_AUTOTUNE_POINTWISE=0"
for run in "1x8" "--env KVAGENTS_PRECOMPILE=1 1x8" "--env KVAGENTS_PRECOMPILE=1 --env KVAGENTS_TOPP=kernel 1x8" \
           "$ALL 1x8" "$ALL B=1"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout 70 "$PY" bench/warmup.py --cold $run > "$OUT/warm_$i.txt" 2>&1
  stamp "   [$i] $run: rc $? ($(grep -h -E 'engine built|first call [0-9]|recording pass' "$OUT/warm_$i.txt" | tr '\n' ';'))"
done
fi
stamp "done"
