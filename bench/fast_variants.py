"""Dev tool: time variants of the fast decode step (attention kernel, Inductor tuning) on the random Qwen3-8B shape,
B = 1 greedy with components, and profile one. Variants are picked by env vars read when the engine is built
(KVAGENTS_ATTN = auto | sdpa | reduce | triton, KVAGENTS_CDT = 0 | 1, KVAGENTS_TOPP = auto | kernel | search | sort,
KVAGENTS_GEMV = auto | fused | torch, KVAGENTS_GEMV_ROWS = rows up to which "auto" fuses, KVAGENTS_COMPILE_HEAD = 1 | 0):
``attn:cdt:topp:gemv:rows:head`` (missing fields: auto, 0, auto, auto, static_cache.FUSED_ROWS, 1).

    python bench/fast_variants.py --variants sdpa:0:search:torch,auto:0:search:torch,auto --profile auto
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

from gpu_decode import NoTokenizer, bench_prompts, components, profile_fast, qwen3_8b_random, sync  # noqa: E402

from kvagents import KVModel, SamplingParams  # noqa: E402
from kvagents.engine.fast_decode import FastDecodeEngine  # noqa: E402
from kvagents.engine.static_cache import FUSED_ROWS  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="sdpa:0:search:torch,auto:0:search:torch,auto")
    ap.add_argument("--cases", default="B=1,1x8")
    ap.add_argument("--profile-cases", default="B=1,1x8", help="of B=1, 1x8, 32")
    ap.add_argument("--profile", default="")
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    model = qwen3_8b_random()
    L = model.config.num_hidden_layers
    prompt, prompts32 = bench_prompts()
    report = dict(profile={})
    for var in args.variants.split(","):
        fields = var.split(":")
        attn, cdt, topp, gemv, rows, head = (fields + ["auto", "0", "auto", "auto", str(FUSED_ROWS), "1"][len(fields):])[:6]
        os.environ.update(KVAGENTS_ATTN=attn, KVAGENTS_CDT=cdt, KVAGENTS_TOPP=topp, KVAGENTS_GEMV=gemv,
                          KVAGENTS_GEMV_ROWS=rows, KVAGENTS_COMPILE_HEAD=head)
        torch._dynamo.reset()
        llm = KVModel(model, NoTokenizer())
        llm._fast_engine = FastDecodeEngine(model, NoTokenizer())
        cases = [("B=1 greedy", 1, SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)),
                 ("1x8 top-p", 8, SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95, n=8,
                                                 seed=0, ignore_eos=True)),
                 ("32 prompts", 32, SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True))]
        for case, n, p in cases:
            if case.split()[0] not in args.cases.split(",") and case != args.cases:
                continue
            res = {}
            ps = prompts32 if n == 32 else [prompt]
            for comps in (False, True):
                sync()
                t0 = time.perf_counter()
                llm.generate(ps, p, components=components(L) if comps else (), fast=True)
                sync()
                first = time.perf_counter() - t0
                ts = []
                for _ in range(3):
                    sync()
                    t0 = time.perf_counter()
                    llm.generate(ps, p, components=components(L) if comps else (), fast=True)
                    sync()
                    ts.append(time.perf_counter() - t0)
                res[comps] = (first, 1000 * statistics.median(ts) / args.new_tokens)
            print(f"variant {var} {case}: off {res[False][1]:.3f} ms/step (first {res[False][0]:.1f} s), "
                  f"components {res[True][1]:.3f} ms/step (first {res[True][0]:.1f} s) "
                  f"-> {n * 1000 / res[True][1]:.1f} tok/s", flush=True)
        if var == args.profile:
            for case in args.profile_cases.split(","):
                if case == "B=1":
                    profile_fast(llm, prompt, args, L, report, var)
                elif case == "1x8":
                    profile_fast(llm, prompt, args, L, report, var + " 1x8", n=8)
                elif case == "32":  # 32 prompts greedy, with and without components (their cost by kernel)
                    ps = prompts32
                    profile_fast(llm, ps, args, L, report, var + " 32 prompts")
                    profile_fast(llm, ps, args, L, report, var + " 32 prompts, no components", comps=False)
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
