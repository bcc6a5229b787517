#!/usr/bin/env bash
# The fast path on a lent GPU, in phases that each have a time limit (whatever finished is in $OUT):
#   tests:    the fast path's CUDA tests (graphs + compile + Triton kernels against the eager engine; logits processors
#             between the forward and sampling graphs; the reasoning controller in the graph; the recording pass's
#             worker compiles), about 2-4 minutes on an H100;
#   warm:     cold first calls (empty Inductor / Triton caches, engine build counted), each case in its own process:
#             defaults for one prompt x n=8 and for B=1, then both with KVAGENTS_PRECOMPILE=1 (kvagents' Triton
#             kernels compiled in worker processes during the head's compile);
#   variants: decode side by side in one process (ms/step, components off / on): the default top-p ("auto": the
#             Triton kernels on CUDA) against the compiled torch search (KVAGENTS_TOPP=search);
#   decode:   bench/gpu_decode.py's fast-path rows (d, e) and HF static + compile (b) with the bandwidth limit, 8B shape.
# Device tool, carrying the wheels the device image lacks (pydantic and pytest, for Python 3.12):
#   python3 -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pydantic==2.12.5 pydantic-core==2.41.5 \
#     annotated-types typing-inspection typing-extensions pytest pluggy iniconfig packaging
#   run(command="bash bench/run_fast_gpu.sh tests warm", carry=[".whl"], kind="nvidia-h100-x1")   (~7 min)
#   run(command="bash bench/run_fast_gpu.sh variants decode", carry=[".whl"])                     (~8 min)
# (arguments: the phases to run, of tests, warm, variants, decode; default all four, more than one call's 10 minutes)
set -uo pipefail
OUT=${OUT:-out/fast_gpu}; PY=${PY:-python3}
PHASES=" ${*:-tests warm variants decode} "
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
stamp "tests: CUDA tests"
timeout 330 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_decode.py tests/test_reasoning.py \
  tests/test_logits_processors.py tests/test_kernel_precompile.py -k "cuda or fast_path" > "$OUT/cuda_tests.txt" 2>&1
stamp "   rc $? ($(tail -n 1 "$OUT/cuda_tests.txt"))"

fi

if [[ $PHASES == *" variants "* ]]; then
stamp "variants: decode side by side (ms/step, components off / on)"
timeout 170 "$PY" bench/fast_variants.py --cases B=1,1x8 --variants auto,auto:0:search > "$OUT/variants.txt" 2>&1
stamp "   rc $? ($(grep -h 'tok/s' "$OUT/variants.txt" | tr '\n' ';'))"

fi

if [[ $PHASES == *" warm "* ]]; then
stamp "warm: cold first calls"
i=0
for run in "1x8" "B=1" "--env KVAGENTS_PRECOMPILE=1 1x8" "--env KVAGENTS_PRECOMPILE=1 B=1"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout 80 "$PY" bench/warmup.py --cold $run > "$OUT/warm_$i.txt" 2>&1
  stamp "   [$i] $run: rc $? ($(grep -h -E 'engine built|first call [0-9]|recording pass' "$OUT/warm_$i.txt" | tr '\n' ';'))"
done
fi

if [[ $PHASES == *" decode "* ]]; then
stamp "decode: gpu_decode.py --methods bde"
timeout 330 "$PY" bench/gpu_decode.py --methods bde --no-overhead --no-profile --mem-tokens 0 --out "$OUT" \
  > "$OUT/decode.txt" 2>&1
stamp "   rc $?"
fi
stamp "done"
