"""Where the in-loop components' cost goes on the fast path, per phase of a call: prefill (the components'
``on_prefill`` and state set-up included), decode steps, and the rest (results, ``on_finish``), from
``GenerationResult.stats`` of alternating calls with and without the components; plus the wall time of each
component's ``on_prefill`` / ``on_finish``. Random Qwen3-8B shape on CUDA (``--tiny`` for a CPU smoke run).

    python bench/component_cost.py --cases B=1 1x8 32
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_decode  # noqa: E402
from gpu_decode import NoTokenizer, bench_prompts, components, qwen3_8b_random, sync  # noqa: E402

from kvagents import KVModel, SamplingParams  # noqa: E402

HOOK_S: dict[str, list[float]] = collections.defaultdict(list)


def hook(cls, meth):
    fn = getattr(cls, meth)

    def timed(self, *a, **k):
        sync()
        t = time.perf_counter()
        out = fn(self, *a, **k)
        sync()
        HOOK_S[f"{type(self).__name__}.{meth}"].append(time.perf_counter() - t)
        return out

    setattr(cls, meth, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=["B=1", "1x8", "32"])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        gpu_decode.DEV = "cpu"
    model = qwen3_8b_random(dtype=torch.float32, tiny=True) if args.tiny else qwen3_8b_random()
    L = model.config.num_hidden_layers
    llm = KVModel(model, NoTokenizer())
    prompt, prompts32 = bench_prompts()
    for c in components(L):
        for meth in ("on_prefill", "on_finish"):
            if meth in type(c).__dict__:
                hook(type(c), meth)
    N = args.new_tokens
    for case in args.cases:
        ps, n, greedy = {"B=1": ([prompt], 1, True), "1x8": ([prompt], 8, False), "32": (prompts32, 1, True)}[case]
        p = SamplingParams(max_new_tokens=N, temperature=0 if greedy else 0.7, top_p=1.0 if greedy else 0.95, n=n,
                           seed=0, ignore_eos=True)
        for comps in (False, True):  # warm
            llm.generate(ps, p, components=components(L) if comps else (), fast=True)
        HOOK_S.clear()
        rec = {False: collections.defaultdict(list), True: collections.defaultdict(list)}
        for _ in range(args.repeats):
            for comps in (False, True):
                sync()
                t = time.perf_counter()
                cs = components(L) if comps else ()
                t_make = time.perf_counter() - t
                res = llm.generate(ps, p, components=cs, fast=True)
                sync()
                total = time.perf_counter() - t
                s = res.stats
                r = rec[comps]
                r["total"].append(total)
                r["make"].append(t_make)
                r["prefill"].append(s.prefill_s)
                r["decode"].append(s.decode_s)
                r["rest"].append(total - t_make - s.prefill_s - s.decode_s)
        med = {k: {f: statistics.median(v) * 1000 for f, v in r.items()} for k, r in rec.items()}
        off, on = med[False], med[True]
        print(f"case {case}: ms per call, off -> on (delta); {N} tokens", flush=True)
        for f in ("total", "make", "prefill", "decode", "rest"):
            print(f"   {f:8s} {off[f]:9.2f} -> {on[f]:9.2f}  ({on[f] - off[f]:+8.2f} ms, "
                  f"{100 * (on[f] - off[f]) / off['total']:+.2f} % of the call)", flush=True)
        print(f"   decode per step {off['decode'] / N:.4f} -> {on['decode'] / N:.4f} ms", flush=True)
        for k, v in sorted(HOOK_S.items()):
            print(f"   {k:32s} {1000 * statistics.median(v):8.2f} ms (median of {len(v)})", flush=True)


if __name__ == "__main__":
    main()
