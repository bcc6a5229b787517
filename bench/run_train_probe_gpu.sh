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
#      .carry/wheels .carry/src.tar.gz .carry/gsm8k.jsonl and runs `bash bench/run_train_probe_gpu.sh setup`)
#   3. bash bench/run_train_probe_gpu.sh train     (about 5-10 min on an H100; resumable: run it again if cut)
# The probe folder comes back in $OUT/probe (weights.safetensors + artifact.json with the held-out report).
set -euo pipefail
export PYTHONPATH=/tmp/pylib:/tmp/src
case "${1:-train}" in
  setup)
    mkdir -p /tmp/m /tmp/src /tmp/pylib
    tar xzf .carry/src.tar.gz -C /tmp/src
    cp .carry/gsm8k.jsonl /tmp/src/
    python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .carry/wheels/*.whl
    python3 -c "import torch, pydantic, gguf; print(torch.cuda.get_device_name())"
    ;;
  train)
    cat /tmp/m/q? > /tmp/m/model.gguf
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/m/model.gguf" | sha256sum -c
    cd /tmp/src
    # GSM8K shared rows 0-999: a seeded half trains the probe, the other half (500 rows, listed in
    # artifact.json) is the held-out report: probe vote vs majority vs logprob vote
    KVAGENTS_CACHE=/tmp/kvcache python3 -m kvagents.cli train probe --model /tmp/m/model.gguf \
      --data gsm8k.jsonl --rows 0:1000 --question-field question --answer-field answer --grader gsm8k \
      --n 8 --holdout 0.5 --max-new-tokens 384 --batch-prompts 128 --dtype bfloat16 --out /tmp/probe
    mkdir -p "$OUT/probe" && cp /tmp/probe/* "$OUT/probe/"
    ;;
esac
