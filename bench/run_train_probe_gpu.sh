#!/usr/bin/env bash
# Train and report the KV probe of qwen2.5-coder-0.5b on a lent GPU (the probe that ships with kvagents).
#
# Prepare here (CPU), then run on the device in this order:
#   1. wheels the device lacks (Python 3.12):  pip download --only-binary=:all: --python-version 3.12 \
#        --platform manylinux2014_x86_64 -d .carry/wheels pydantic gguf   (keep pydantic*, annotated_types,
#        typing_*, gguf); the model GGUF split in 56 MiB chunks: .carry/q0 .. .carry/q8 (see
#        ../shared/docs/models.md); the source at HEAD: git archive --format=tar.gz HEAD -o .carry/src.tar.gz;
#        the data: cp ../shared/data/gsm8k.jsonl .carry/   (.carry/ is listed in .git/info/exclude)
#   2. one call per chunk carrying it: mkdir -p /tmp/m && cp .carry/qK /tmp/m/   (the first call also carries
#      .carry/src.tar.gz .carry/data, the last .carry/wheels; both run `bash bench/run_train_probe_gpu.sh setup`)
#   3. bash bench/run_train_probe_gpu.sh train     (under 9 min on an H100; resumable: run it again if cut)
#      the probe folder, its records and features come back in $OUT (see bench/pack_probe_work.py)
#   4. bash bench/run_train_probe_gpu.sh fetch-reasoning   (the reasoning work folder: cat rw.tgz.* | tar xz)
# More training samples (after setup, instead of 3-4): `more` samples GSM8K rows 0-999 again with seed 1 (8 more
# samples a row for training; the held-out split is the seed-0 one of `train`) and MATH500 rows 0-399 (n = 8,
# \boxed{} answers) side by side; it returns the GSM8K work folder, `fetch-math` the MATH500 one. bench/
# merge_probe_work.py joins work folders here. `poolings` samples the `train` rows again recording the KV of the
# last 16 tokens and the last token beside the mean (then `fetch-tag .w16`, `fetch-tag .last`). `load` runs bench/serve_load.py on the random Qwen3-8B shape.
# The data folder must hold gsm8k.jsonl, commonsenseqa.jsonl and math500.jsonl (.carry/data).
set -euo pipefail
export PYTHONPATH=/tmp/pylib:/tmp/src
case "${1:-train}" in
  setup)  # idempotent: unpacks what this call carries (the source and data, or the wheels)
    mkdir -p /tmp/m /tmp/src /tmp/pylib
    if [ -f .carry/src.tar.gz ]; then
      tar xzf .carry/src.tar.gz -C /tmp/src && cp -r .carry/data /tmp/src/data && cp .carry/data/gsm8k.jsonl /tmp/src/
    fi
    if [ -d .carry/wheels ]; then
      python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .carry/wheels/*.whl
      python3 -c "import torch, pydantic, gguf; print(torch.cuda.get_device_name())"
    fi
    ;;
  train)
    cat /tmp/m/q? > /tmp/m/model.gguf
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/m/model.gguf" | sha256sum -c
    cd /tmp/src
    export KVAGENTS_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    python3 -c "from kvagents.registry import resolve_model_source as r; print(r('/tmp/m/model.gguf'))"
    # (a) GSM8K shared rows 0-999, n = 8: a seeded half trains the probe, the other half (listed in artifact.json)
    # is the held-out report; every sample's pooled KV and probability scores come back for cross-fitted rules.
    timeout "${T_PROBE:-530}" python3 -m kvagents.cli train probe --model /tmp/m/model.gguf \
      --data gsm8k.jsonl --rows 0:1000 --question-field question --answer-field answer --grader gsm8k \
      --n 8 --holdout 0.5 --max-new-tokens 384 --batch-prompts 128 --dtype bfloat16 --out /tmp/probe \
      > /tmp/log_probe.txt 2>&1 &
    P1=$!
    # (b) fast/slow reasoning collection (greedy) on GSM8K rows 700-999, CommonsenseQA rows 700-999, MATH500
    # rows 100-399, with the KV features and every checkpoint's early-exit answer, for offline routing folds.
    timeout "${T_REASON:-530}" python3 -m kvagents.cli eval reasoning collect --model /tmp/m/model.gguf \
      --data-dir /tmp/src/data --train-per-dataset 300 --eval-per-dataset 100 --slow-tokens 512 \
      --fast-tokens 32 --answer-tokens 32 --every 32 --batch-prompts 300 --device cuda --dtype bfloat16 \
      --work /tmp/rw > /tmp/log_reason.txt 2>&1 &
    P2=$!
    R1=0; R2=0; wait $P1 || R1=$?; wait $P2 || R2=$?  # a timed-out job must not end the script (set -e) before its work is packed
    echo "probe rc=$R1 reasoning rc=$R2"
    tr '\r' '\n' < /tmp/log_probe.txt | grep -v "it/s\]$" | tail -n 25
    tr '\r' '\n' < /tmp/log_reason.txt | grep -v "it/s\]$" | tail -n 12
    python3 bench/pack_probe_work.py pack /tmp/probe.work /tmp/probe "$OUT"
    mkdir -p /tmp/rw_out && cp /tmp/log_*.txt /tmp/rw/ 2>/dev/null
    tar czf - -C /tmp/rw . | split -b 15M - /tmp/rw_out/rw.tgz.
    ls -la "$OUT" /tmp/rw_out
    ;;
  more)
    cat /tmp/m/q? > /tmp/m/model.gguf
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/m/model.gguf" | sha256sum -c
    cd /tmp/src
    export KVAGENTS_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    timeout "${T_PROBE:-420}" python3 -m kvagents.cli train probe --model /tmp/m/model.gguf \
      --data gsm8k.jsonl --rows 0:1000 --question-field question --answer-field answer --grader gsm8k \
      --n 8 --seed 1 --holdout 0.5 --max-new-tokens 384 --batch-prompts 128 --dtype bfloat16 --out /tmp/probe_s1 \
      > /tmp/log_probe_s1.txt 2>&1 &
    P1=$!
    timeout "${T_PROBE:-420}" python3 -m kvagents.cli train probe --model /tmp/m/model.gguf \
      --data data/math500.jsonl --rows 0:400 --question-field problem --answer-field answer --grader math \
      --instruction 'Solve the problem step by step, then put the final answer in \boxed{}.' \
      --n 8 --seed 0 --holdout 0.5 --max-new-tokens 384 --batch-prompts 100 --dtype bfloat16 --out /tmp/probe_math \
      > /tmp/log_probe_math.txt 2>&1 &
    P2=$!
    R1=0; R2=0; wait $P1 || R1=$?; wait $P2 || R2=$?  # a timed-out job must not end the script (set -e) before its work is packed
    echo "gsm8k seed 1 rc=$R1 math rc=$R2"
    tr '\r' '\n' < /tmp/log_probe_s1.txt | grep -v "it/s\]$" | tail -n 8
    tr '\r' '\n' < /tmp/log_probe_math.txt | grep -v "it/s\]$" | tail -n 8
    python3 bench/pack_probe_work.py pack /tmp/probe_s1.work /tmp/probe_s1 "$OUT"
    ;;
  poolings)  # GSM8K rows 0-999, n = 8, seed 0 (the `train` samples again), with the KV features of three poolings:
    # every generated token (the probe's), the last 16 (where the answer is written) and the last one; resumable.
    # Returns the records, the probe and the mean features; `fetch-tag .w16` / `fetch-tag .last` the others.
    [ -f /tmp/m/model.gguf ] || cat /tmp/m/q? > /tmp/m/model.gguf
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/m/model.gguf" | sha256sum -c
    cd /tmp/src
    export KVAGENTS_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    R=0; timeout "${T_PROBE:-540}" python3 -m kvagents.cli train probe --model /tmp/m/model.gguf \
      --data gsm8k.jsonl --rows 0:1000 --question-field question --answer-field answer --grader gsm8k \
      --n 8 --holdout 0.5 --max-new-tokens 384 --batch-prompts 128 --dtype bfloat16 --out /tmp/probe \
      --record window:16 last > /tmp/log_probe.txt 2>&1 || R=$?
    echo "probe rc=$R"; tr '\r' '\n' < /tmp/log_probe.txt | grep -v "it/s\]$" | tail -n 40
    if [ "$R" = 0 ]; then python3 bench/pack_probe_work.py pack /tmp/probe.work /tmp/probe "$OUT"; fi
    ;;
  fetch-tag)  # features of another pooling from the `poolings` work folder: fetch-tag .w16 | .last
    cd /tmp/src && python3 bench/pack_probe_work.py pack /tmp/probe.work /tmp/probe "$OUT" --tag "$2"
    ;;
  fetch-math)
    cd /tmp/src && python3 bench/pack_probe_work.py pack /tmp/probe_math.work /tmp/probe_math "$OUT"
    ;;
  load)  # continuous batching vs serial calls vs one static batch, random Qwen3-8B shape (no model files needed)
    cd /tmp/src
    export PYTHONUNBUFFERED=1
    python3 bench/serve_load.py --model random:qwen3-8b-shape --device cuda --dtype bfloat16 \
      --clients ${CLIENTS:-1 8 32} --requests ${REQUESTS:-64} --max-new-tokens 128 --data gsm8k.jsonl \
      ${LOAD_ARGS:-} --json "$OUT/serve_load.json"
    ;;
  fetch-reasoning)  # the next call: the reasoning work folder (tar split in 15 MiB parts)
    cp /tmp/rw_out/* "$OUT/"
    ;;
esac
