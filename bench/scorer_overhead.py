"""Decode time with the in-loop scorers (layer/token KV-CoE, probability scores, KV probe features) on vs off.

Random weights of the qwen2.5-coder-0.5b shape (decode cost does not depend on the weights' values) unless
--model names a real one. Prints a table; --write appends rows to bench/RESULTS.md.

    python bench/scorer_overhead.py --device cuda --new-tokens 256 --write
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kvagents import KVEmbedding, KVModel, SamplingParams
from kvagents.signals.probe import probe_pooling
from kvagents.signals.scoring import LayerCoE, ProbabilityScores, TokenCoE


def qwen05b_random(device, dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True, eos_token_id=151645)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


class NoTokenizer:
    pad_token_id = 0
    eos_token_id = 151645

    def decode(self, ids, skip_special_tokens=True):
        return ""


def timed(llm, prompts, params, comps_factory, repeats):
    llm.generate(prompts, params, components=comps_factory())  # warm-up
    ts = []
    for _ in range(repeats):
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, params, components=comps_factory())
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    llm = KVModel(qwen05b_random(args.device, dtype), NoTokenizer())
    prompt = list(range(1000, 1128))  # 128-token prompt
    cases = [("1 prompt x n=1", [prompt], 1), ("1 prompt x n=8", [prompt], 8), ("32 prompts x n=1", [prompt] * 32, 1)]
    scorers = lambda: [LayerCoE(), TokenCoE(), ProbabilityScores()]  # noqa: E731
    with_probe = lambda: scorers() + [KVEmbedding(probe_pooling(24), name="features")]  # noqa: E731
    rows = []
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (2 cores)"
    print(f"{dev_name}, {args.dtype}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'case':18s} {'off ms/step':>11s} {'scorers':>9s} {'+probe':>9s} {'overhead':>9s} {'+probe':>8s}")
    for name, prompts, n in cases:
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95, n=n, seed=0,
                                ignore_eos=True)
        off = timed(llm, prompts, params, lambda: [], args.repeats)
        on = timed(llm, prompts, params, scorers, args.repeats)
        pr = timed(llm, prompts, params, with_probe, args.repeats)
        ms = lambda t: 1000 * t / args.new_tokens  # noqa: E731
        rows.append((name, ms(off), ms(on), ms(pr), on / off - 1, pr / off - 1))
        print(f"{name:18s} {ms(off):11.2f} {ms(on):9.2f} {ms(pr):9.2f} {100 * (on / off - 1):8.1f}% "
              f"{100 * (pr / off - 1):7.1f}%")
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        with open(path, "a") as f:
            f.write(f"\n### Scorer overhead ({time.strftime('%Y-%m-%d')}, {dev_name}, qwen2.5-0.5b shape random "
                    f"weights, {args.dtype}, {args.new_tokens} new tokens, sampled T=0.7 top-p 0.95)\n\n")
            f.write("| case | off ms/step | CoE+prob scorers ms/step | + probe features ms/step | overhead | + probe |\n")
            f.write("|---|---|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {100 * r[4]:.1f} % | {100 * r[5]:.1f} % |\n")


if __name__ == "__main__":
    main()
