#!/usr/bin/env bash
# The issue-8 selection evaluation on a lent GPU, split into shards run in parallel (the eager decode loop leaves
# the GPU mostly idle at these batch sizes, so several processes share it well). Shards already done are skipped,
# so the script can be re-run until every shard exists, then it combines them.
#   bench/run_selection_gpu.sh MODEL DATA WORKDIR OUTDIR
set -uo pipefail
MODEL=$1; DATA=$2; WORK=$3; OUT=$4
EVAL_END=${EVAL_END:-500}; TRAIN_START=${TRAIN_START:-500}; TRAIN_END=${TRAIN_END:-800}; STEP=${STEP:-50}
PAR=${PAR:-8}; BUDGET=${BUDGET:-540}
jobs=()
for ((s=0; s<EVAL_END; s+=STEP)); do
  e=$((s+STEP<EVAL_END ? s+STEP : EVAL_END))
  jobs+=("eval $s $e")
done
for ((s=0; s<${ES_END:-200}; s+=STEP)); do
  jobs+=("es $s $((s+STEP))")
done
for ((s=TRAIN_START; s<TRAIN_END; s+=STEP)); do
  e=$((s+STEP<TRAIN_END ? s+STEP : TRAIN_END))
  jobs+=("train $s $e")
done
run_one() {
  kind=$1; s=$2; e=$3; d="$WORK/$kind-$s-$e"
  [ -f "$d/meta.json" ] && exit 0
  case "$kind" in
    eval) extra="--features" ;;
    train) extra="--features --no-greedy --no-hidden-coe" ;;
    es) extra="--early-stop-only" ;;
  esac
  OMP_NUM_THREADS=2 python3 -m kvagents.cli eval selection --shard $extra --data "$DATA" --model "$MODEL" --n 8 \
    --rows "$s:$e" --batch-prompts "$STEP" --max-new-tokens 384 --out "$d.tmp" > "$WORK/log-$kind-$s.txt" 2>&1 \
    && mv "$d.tmp" "$d"
}
export -f run_one; export MODEL DATA WORK STEP
mkdir -p "$WORK"
printf '%s\n' "${jobs[@]}" | timeout "$BUDGET" xargs -P "$PAR" -L 1 bash -c 'run_one $0 $1 $2'
done_eval=$(ls -d "$WORK"/eval-*[0-9] 2>/dev/null | wc -l); done_train=$(ls -d "$WORK"/train-*[0-9] 2>/dev/null | wc -l)
echo "done: eval shards $done_eval, train shards $done_train"
tail -n 2 "$WORK"/log-*.txt | grep -v "it/s" | head -40
if [ "$done_eval" -eq $(( (EVAL_END + STEP - 1) / STEP )) ]; then
  python3 -m kvagents.cli eval selection --combine "$WORK"/eval-*[0-9] --train-shards $(ls -d "$WORK"/train-*[0-9] 2>/dev/null) \
    --num-attention-layers 24 --out "$OUT"
fi
