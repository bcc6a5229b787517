#!/usr/bin/env bash
# Fast/slow reasoning evaluation on a lent GPU in ONE call (expected 4-6 minutes on an H100, at most ~9.5 by the phase limits): end to end.
#   bench/run_reasoning_gpu.sh [MODEL] [DATA_DIR]        (results in $OUT)
# e.g. (device tool, carrying .carry/*.jsonl and the model already at /tmp/m/model.gguf):
#   bench/run_reasoning_gpu.sh /tmp/m/model.gguf .carry
# Phases (stages share $WORK; each phase has a time limit so a report is written with whatever finished):
#   0. convert the GGUF once (later loads take seconds)  ||  controller-overhead bench (random weights)
#   1. collect on the training slice (fast + slow with KV features + early-exit labels)
#      || eval always-fast/always-slow || eval budget-only (3 budgets)
#   2. train the paper / gain / step classifiers, calibrate thresholds on out-of-fold predictions
#   3. online controller (paper classifier) || online controller (ours) || the paper's post-hoc switching
#   4. report: results.md / results.json / pareto.png in $OUT, records + classifiers + logs in $OUT/reasoning.tgz
# Back here: mkdir -p /tmp/rw && tar xzf FILES/reasoning.tgz -C /tmp/rw && .venv/bin/kvagents eval reasoning report \
#   --work /tmp/rw --out /tmp/rw/report --append-results docs/results.md   (settings come from /tmp/rw/config.json)
# CPU dry run (a few rows; a tiny random model folder with a real tokenizer, or smollm2-135m, much slower):
#   OMP_NUM_THREADS=1 DEVICE=cpu DTYPE=float32 TRAIN=4 EVAL=3 SLOW=40 FAST=8 ANSWER=8 EVERY=16 BUDGETS="16 24 32" \
#     BATCH=16 BENCH=0 T1=600 T2=300 T3=600 PY=.venv/bin/python OUT=/tmp/rdry bench/run_reasoning_gpu.sh MODEL ../shared/data
set -uo pipefail
MODEL=${1:-/tmp/m/model.gguf}; DATA=${2:-.carry}
OUT=${OUT:-out/reasoning_gpu}; WORK=${WORK:-/tmp/reasoning_work}; PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}
TRAIN=${TRAIN:-200}; EVAL=${EVAL:-200}; SLOW=${SLOW:-512}; FAST=${FAST:-32}; ANSWER=${ANSWER:-32}
EVERY=${EVERY:-32}; BUDGETS=${BUDGETS:-"64 128 256"}; BATCH=${BATCH:-300}; BENCH=${BENCH:-1}; TOL=${TOL:-0}
T1=${T1:-220}; T2=${T2:-75}; T3=${T3:-110}  # worst case with phase 0 (120 s) and the report (40 s): 565 s
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }
log() { tr '\r' '\n' < "$1" | grep -v "it/s\]$" | grep -v "^\s*$" | tail -n "${2:-12}" || true; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
COMMON=(--model "$MODEL" --data-dir "$DATA" --train-per-dataset "$TRAIN" --eval-per-dataset "$EVAL"
        --slow-tokens "$SLOW" --fast-tokens "$FAST" --answer-tokens "$ANSWER" --every "$EVERY" --budgets $BUDGETS
        --batch-prompts "$BATCH" --tolerance "$TOL" --device "$DEVICE" --dtype "$DTYPE" --work "$WORK")
ER=("$PY" -m kvagents.cli eval reasoning)

# ---- 0. one-time GGUF conversion || overhead bench ----------------------------------------------------------
if [ "$BENCH" = 1 ] && [ "$DEVICE" = cuda ]; then
  timeout 110 "$PY" -u bench/reasoning_overhead.py --device cuda --new-tokens 128 --repeats 3 --batches 1 256 \
    --every 16 32 > "$OUT/overhead.txt" 2>&1 &
  BENCH_PID=$!
fi
case "$MODEL" in
  *.gguf) timeout 120 "$PY" -c "import sys; from kvagents.registry import resolve_model_source as r; print(r(sys.argv[1]))" "$MODEL" \
            > "$WORK/log_convert.txt" 2>&1 || { log "$WORK/log_convert.txt" 30; exit 1; } ;;
esac
[ -n "${BENCH_PID:-}" ] && wait "$BENCH_PID"
stamp "converted"; [ -f "$OUT/overhead.txt" ] && cat "$OUT/overhead.txt"

# ---- 1. collect || eval fast+slow || eval budgets ------------------------------------------------------------
timeout "$T1" "${ER[@]}" collect "${COMMON[@]}" > "$WORK/log_collect.txt" 2>&1 &
P1=$!
timeout "$T1" "${ER[@]}" eval-base "${COMMON[@]}" --parts fast slow > "$WORK/log_base.txt" 2>&1 &
P2=$!
timeout "$T1" "${ER[@]}" eval-base "${COMMON[@]}" --parts budgets > "$WORK/log_budgets.txt" 2>&1 &
P3=$!
wait $P1; R1=$?; wait $P2; R2=$?; wait $P3; R3=$?
stamp "phase 1 done (collect rc=$R1, base rc=$R2, budgets rc=$R3)"
for f in collect base budgets; do echo "== $f"; log "$WORK/log_$f.txt" 8; done

# ---- 2. train ---------------------------------------------------------------------------------------------------
if [ "$R1" = 0 ]; then
  timeout "$T2" "${ER[@]}" train "${COMMON[@]}" > "$WORK/log_train.txt" 2>&1; R4=$?
  stamp "trained (rc=$R4)"; log "$WORK/log_train.txt" 40
else
  R4=1
fi

# ---- 3. online controllers || post-hoc switching ------------------------------------------------------------------
if [ "$R4" = 0 ] && [ "$R2" = 0 ]; then
  timeout "$T3" "${ER[@]}" eval-online "${COMMON[@]}" --controllers online_paper > "$WORK/log_online_paper.txt" 2>&1 &
  P4=$!
  timeout "$T3" "${ER[@]}" eval-online "${COMMON[@]}" --controllers online_ours > "$WORK/log_online_ours.txt" 2>&1 &
  P5=$!
  timeout "$T3" "${ER[@]}" eval-posthoc "${COMMON[@]}" > "$WORK/log_posthoc.txt" 2>&1 &
  P6=$!
  wait $P4; wait $P5; wait $P6
  stamp "phase 3 done"
  for f in online_paper online_ours posthoc; do echo "== $f"; log "$WORK/log_$f.txt" 6; done
fi

# ---- 4. report ----------------------------------------------------------------------------------------------------
if [ "$R2" = 0 ]; then
  timeout 40 "${ER[@]}" report "${COMMON[@]}" --out "$OUT" > "$WORK/log_report.txt" 2>&1
  cat "$WORK/log_report.txt" | grep -v "it/s\]$" | tail -n 60
fi
tar czf "$OUT/reasoning.tgz" -C "$WORK" --exclude='train_features.npz' --exclude='*.tokens.json' . 2>/dev/null
stamp "done"; ls -la "$OUT"
