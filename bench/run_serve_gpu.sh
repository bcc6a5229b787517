#!/usr/bin/env bash
# Concurrent callers on a lent GPU: the fast-path scheduler against serialised calls and one static batch, random
# Qwen3-8B and Qwen2.5-0.5B shapes (no model files needed), and FlashInfer's kernels against kvagents' own. Run
# from the repository root on the device, carrying .carry/data (GSM8K questions as prompts), .carry/wheels
# (pydantic, fastapi, uvicorn, httpx) and, for `kernels`, .carry/fi (flashinfer-python and what it imports).
# Each mode fits one call of at most 10 minutes; results land in $OUT/*.json.
#   bash bench/run_serve_gpu.sh load      # static 32 batch, scheduler 1/8/32 clients, open loop, 64 clients
#   bash bench/run_serve_gpu.sh http      # kvagents serve --fast vs in process at 1/8/32 clients; 0.5B shape
#   bash bench/run_serve_gpu.sh kernels   # bench/flashinfer_bench.py
#   bash bench/run_serve_gpu.sh hosted    # requests with components / processors in the fast scheduler; FlashInfer
#                                         # top-p sampling against the fast path's compiled sampling head
set -uo pipefail
MODE="${1:-load}"
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/pylib:$PWD:$PWD/bench PYTHONUNBUFFERED=1
D=.carry/data/gsm8k.jsonl
L="--device cuda --dtype bfloat16 --data $D --max-new-tokens 128 --prefill-chunk 16384"
run() { timeout "$1" python3 bench/serve_load.py "${@:2}" 2>&1 | grep -v "it/s\]$" | grep "^|\|^random\|^warm\|rror"; }
case "$MODE" in
load)
  # one static 32-prompt batch on the fast path (the reference the scheduler is held to), three calls, the last timed
  timeout 150 python3 - <<'PY'
import time, torch, serve_load as s
llm = s.build_model("random:qwen3-8b-shape", "cuda", "bfloat16")
from kvagents import SamplingParams
reqs = s.load_requests(".carry/data/gsm8k.jsonl", 32, 128)
p = SamplingParams(max_new_tokens=128, temperature=0.0)
for _ in range(3):
    torch.cuda.synchronize(); t = time.perf_counter()
    res = llm.generate([r.prompt for r in reqs], p, fast=True)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
n = sum(x.generated_tokens for g in res.samples for x in g)
print(f"| static-fast | batch=32 | 32 | 32 | 0 | {n / dt:.1f} | - | - | {dt * 1000:.0f} |")
PY
  run 200 --model random:qwen3-8b-shape $L --clients 1 8 32 --requests 128 --budget-s 10 --modes scheduler-fast \
    --max-rows 32 --json "$OUT/load_8b_c32.json"
  run 200 --model random:qwen3-8b-shape $L --clients 64 --rate 11 14 --requests 200 --budget-s 10 \
    --modes scheduler-fast --max-rows 64 --json "$OUT/load_8b_rate.json"
  ;;
http)
  run 400 --model random:qwen3-8b-shape $L --clients 1 8 32 --rate 16 --requests 160 --budget-s 10 \
    --modes serial scheduler-fast http-fast --max-rows 32 --json "$OUT/load_8b_http.json"
  run 180 --model random:qwen2.5-0.5b-shape $L --clients 1 32 --requests 128 --budget-s 6 \
    --modes serial scheduler-fast static --max-rows 32 --json "$OUT/load_05b.json"
  ;;
kernels)
  python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .carry/fi/*.whl || exit 1
  export MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST="9.0a" PATH=/tmp/pylib/bin:$PATH
  timeout 560 python3 bench/flashinfer_bench.py --rows 32 --lengths 256 1024 4096 --json "$OUT/flashinfer.json"
  ;;
hosted)
  timeout 300 python3 bench/fast_scheduler_hosted.py --model random:qwen3-8b-shape --device cuda --dtype bfloat16 \
    --data $D --requests 32 --max-new-tokens 128 --hosted 8 --json "$OUT/hosted_8b.json"
  # float32 (few near-ties): do requests equal their alone runs on CUDA graphs?
  timeout 200 python3 bench/fast_scheduler_hosted.py --model random:qwen2.5-0.5b-shape --device cuda --dtype float32 \
    --data $D --requests 32 --max-new-tokens 64 --hosted 8 --check 8 --repeats 1 --json "$OUT/hosted_05b_fp32.json"
  python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .carry/fi/*.whl || exit 1
  export MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST="9.0a" PATH=/tmp/pylib/bin:$PATH
  timeout 280 python3 bench/flashinfer_bench.py --only sampling --rows 32 --json "$OUT/flashinfer_sampling.json"
  ;;
*) echo "unknown mode $MODE (load | http | kernels | hosted)"; exit 2 ;;
esac
