"""Decode time of the reasoning controller (KV classifier re-predicting every k tokens) vs no controller.

Random weights of the qwen2.5-coder-0.5b shape (``--shape qwen3-8b``: the Qwen3-8B shape; decode cost does not
depend on the weights' values) unless ``--model`` names a real one. The controller's thresholds are set so that it
predicts but never switches, so both runs decode the same number of steps (EOS ignored); what is measured is the
per-step device work (token counts, the last-w KV ring buffer) plus the pooled features, the MLP and one host
read every k steps. ``--fast`` (the default on CUDA) decodes with the fast path, where the per-step work runs
inside the captured CUDA-graph step and the host part only at the check steps; ``--no-fast`` with the eager
engine. Prints a table; ``--write`` appends it to bench/RESULTS.md.

    python bench/reasoning_overhead.py --device cuda --new-tokens 256 --write
    python bench/reasoning_overhead.py --device cuda --shape qwen3-8b --batches 1 8 64 --write
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scorer_overhead import qwen05b_random  # same random 0.5B-shaped model (bench/ is on sys.path)

from kvagents import KVModel, SamplingParams
from kvagents.control.thinking import PLAIN_FORMAT, HardBudget, ReasoningController
from kvagents.signals.kv_classifier import KVClassifier, KVClassifierConfig


class StubTokenizer:
    """Enough of a tokenizer for the controller's cues (one id per character) and the engine."""

    pad_token_id = 0
    eos_token_id = 151645
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1000 + (ord(c) % 500) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return ""


def random_classifier(dim: int, window: int, layers: int = 4) -> KVClassifier:
    x = np.random.default_rng(0).normal(size=(64, dim)).astype(np.float32)
    y = 100.0 * (x[:, 0] > 0)
    clf, _ = KVClassifier.fit(x, y, KVClassifierConfig(window=window, layers=layers), max_epochs=2)
    return clf


def timed_all(llm, prompts, params, factories, repeats, fast=False):
    """Median seconds per case; repeats interleave the cases (a load change hits all of them alike)."""
    for f in factories:
        llm.generate(prompts, params, components=f(), fast=fast)  # warm-up (capture on the fast path)
    ts = [[] for _ in factories]
    for _ in range(repeats):
        for j, f in enumerate(factories):
            if llm.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(prompts, params, components=f(), fast=fast)
            if llm.device.type == "cuda":
                torch.cuda.synchronize()
            ts[j].append(time.perf_counter() - t)
    return [statistics.median(x) for x in ts]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default=None, help="a real model (registry name or path) instead of random weights")
    ap.add_argument("--shape", default="qwen0.5b", choices=["qwen0.5b", "qwen3-8b", "tiny"],
                    help="random-weight shape (tiny: a 3-layer Qwen3 for a CPU smoke run)")
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                    help="decode with the fast path (default: on CUDA)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--every", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.model:
        llm = KVModel.from_pretrained(args.model, dtype=args.dtype, device=args.device).load()
        tok = llm.tokenizer
        model_name = args.model
    elif args.shape == "qwen0.5b":
        tok = StubTokenizer()
        llm = KVModel(qwen05b_random(args.device, dtype), tok)
        model_name = "qwen2.5-0.5b shape, random weights"
    else:
        import gpu_decode

        gpu_decode.DEV = args.device
        tok = StubTokenizer()
        llm = KVModel(gpu_decode.qwen3_8b_random(dtype, tiny=args.shape == "tiny"), tok)
        model_name = f"{args.shape} shape, random weights"
    fast = args.fast if args.fast is not None else args.device == "cuda"
    engine = "fast path (CUDA graphs)" if fast and args.device == "cuda" else ("fast path" if fast else "eager engine")
    kv_heads = llm.model.config.num_key_value_heads
    head_dim = getattr(llm.model.config, "head_dim", None) or llm.model.config.hidden_size // llm.model.config.num_attention_heads
    layers = min(4, llm.model.config.num_hidden_layers)  # the paper's last 4 layers
    clf = random_classifier(2 * kv_heads * head_dim, 64, layers).to(args.device)
    prompt = list(range(1000, 1128))  # 128-token prompt
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{dev_name}, {model_name}, {args.dtype}, {args.new_tokens} new tokens, greedy, {engine}, "
          f"median of {args.repeats}")
    head = f"{'prompts':>8s} {'off ms/step':>11s} {'budget':>8s}" + "".join(f" {'ctl k=' + str(k):>10s}" for k in args.every)
    print(head + "  overhead (budget, " + ", ".join(f"k={k}" for k in args.every) + ")")
    rows = []
    for b in args.batches:
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        prompts = [prompt] * b
        factories = [lambda: [], lambda: [HardBudget(PLAIN_FORMAT, tok, 10**6, max_answer_tokens=None)]]
        for k in args.every:
            # classifier at prefill and every k tokens; thresholds that never switch (the run's length is fixed)
            factories.append(lambda k=k: [ReasoningController(PLAIN_FORMAT, tok, classifier=clf, start="auto",
                                                              threshold=-1e9, delta=0.0, every=k,
                                                              max_answer_tokens=None)])
        off, bud, *ctl = timed_all(llm, prompts, params, factories, args.repeats, fast)
        ms = lambda t: 1000 * t / args.new_tokens  # noqa: E731
        rows.append((b, ms(off), ms(bud), [ms(c) for c in ctl], bud / off - 1, [c / off - 1 for c in ctl]))
        print(f"{b:8d} {ms(off):11.2f} {ms(bud):8.2f}" + "".join(f" {ms(c):10.2f}" for c in ctl) +
              f"  {100 * (bud / off - 1):.1f} %, " + ", ".join(f"{100 * (c / off - 1):.1f} %" for c in ctl))
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        with open(path, "a") as f:
            f.write(f"\n### Reasoning controller overhead ({time.strftime('%Y-%m-%d')}, {dev_name}, {model_name}, "
                    f"{args.dtype}, {args.new_tokens} new tokens, greedy, {engine}, median of {args.repeats})\n\n")
            f.write("| prompts | off ms/step | hard budget ms/step | " +
                    " | ".join(f"controller k={k} ms/step" for k in args.every) + " | budget overhead | " +
                    " | ".join(f"controller k={k} overhead" for k in args.every) + " |\n")
            f.write("|---" * (3 + 2 * len(args.every) + 1) + "|\n")
            for b, o, bu, cs, bo, co in rows:
                f.write(f"| {b} | {o:.2f} | {bu:.2f} | " + " | ".join(f"{c:.2f}" for c in cs) +
                        f" | {100 * bo:.1f} % | " + " | ".join(f"{100 * c:.1f} %" for c in co) + " |\n")


if __name__ == "__main__":
    main()
