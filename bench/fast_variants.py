"""Dev tool: time variants of the fast decode step (attention kernel, Inductor tuning) on the random Qwen3-8B shape,
B = 1 greedy with components, and profile one. Variants are picked by env vars read when the engine is built
(KVAGENTS_ATTN = sdpa | reduce, KVAGENTS_CDT = 0 | 1).

    python bench/fast_variants.py --variants sdpa:0,reduce:0,reduce:1 --profile reduce:0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_decode import NoTokenizer, components, profile_fast, qwen3_8b_random, sync  # noqa: E402

from kvagents import KVModel, SamplingParams  # noqa: E402
from kvagents.fast_decode import FastDecodeEngine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="sdpa:0,reduce:0,reduce:1")
    ap.add_argument("--profile", default="")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sampled-check", action="store_true", help="also one 1x8 top-p call (compile check)")
    args = ap.parse_args()
    model = qwen3_8b_random()
    L = model.config.num_hidden_layers
    prompt = torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    report = dict(profile={})
    for var in args.variants.split(","):
        attn, cdt = var.split(":")
        os.environ["KVAGENTS_ATTN"], os.environ["KVAGENTS_CDT"] = attn, cdt
        torch._dynamo.reset()
        llm = KVModel(model, NoTokenizer())
        llm._fast_engine = FastDecodeEngine(model, NoTokenizer())
        p = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        res = {}
        for comps in (False, True):
            sync()
            t0 = time.perf_counter()
            llm.generate([prompt], p, components=components(L) if comps else (), fast=True)
            sync()
            first = time.perf_counter() - t0
            ts = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                out = llm.generate([prompt], p, components=components(L) if comps else (), fast=True)
                sync()
                ts.append(time.perf_counter() - t0)
            res[comps] = (first, 1000 * statistics.median(ts) / args.new_tokens, out.flat[0].token_ids[:8])
        print(f"variant attn={attn} cdt={cdt}: off {res[False][1]:.3f} ms/step (first {res[False][0]:.1f} s), "
              f"components {res[True][1]:.3f} ms/step (first {res[True][0]:.1f} s) "
              f"-> {1000 / res[True][1]:.1f} tok/s; tokens {res[True][2]}", flush=True)
        if args.sampled_check and var == args.variants.split(",")[0]:
            ps = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.95, n=8, seed=0, ignore_eos=True)
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                llm.generate([prompt], ps, components=components(L), fast=True)
                sync()
            print(f"1x8 top-p with components: {8 * 64 / (time.perf_counter() - t0):.0f} tok/s", flush=True)
        if var == args.profile:
            profile_fast(llm, prompt, args, L, report, var)
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
