"""Warm-up of the fast path in a fresh process: the first call of each case (compile + CUDA-graph capture), then a
steady call, on the random Qwen3-8B shape. Run it twice in a row to see the effect of Inductor's and Triton's
on-disk caches (the second process reuses the compiled kernels of the first).

    python bench/warmup.py                      # prints one line per case
    python bench/warmup.py --cold B=1 1x8       # empty compile caches (fresh temp dirs), per-piece breakdown
    python bench/warmup.py --cold --env KVAGENTS_TOPP=sort   # a variant, same measurement
    python bench/warmup.py --cold --env KVAGENTS_PRECOMPILE=1 1x8   # Triton kernels compiled in worker processes

``--cold`` re-runs this script in a child process whose ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` are
new empty folders (what a first process on a fresh machine sees). ``--breakdown`` (implied by ``--cold``) times the
first calls of each compiled piece of the step (per-layer pieces, fused GEMVs, the compiled head) and prints
``torch._dynamo.utils.compile_times()``.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_decode import NoTokenizer, bench_prompts, components, qwen3_8b_random, sync  # noqa: E402

from kvagents import KVModel, SamplingParams  # noqa: E402

CASES = {
    "B=1": ("B=1 greedy", dict(max_new_tokens=256, temperature=0, ignore_eos=True)),
    "1x8": ("1x8 top-p", dict(max_new_tokens=256, temperature=0.7, top_p=0.95, n=8, seed=0, ignore_eos=True)),
    "32": ("32 prompts greedy", dict(max_new_tokens=256, temperature=0, ignore_eos=True)),
}


class FirstCalls:
    """Wall time (synchronised) of the calls of wrapped callables that take longer than ``slow`` seconds (the
    compiling ones), per name; calls made while a CUDA graph is being captured pass through untimed."""

    def __init__(self, slow: float = 0.05) -> None:
        self.slow = slow
        self.s: dict[str, float] = collections.defaultdict(float)
        self.n: dict[str, int] = collections.defaultdict(int)

    def wrap(self, name, fn):
        def timed(*a, **k):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return fn(*a, **k)
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            dt = time.perf_counter() - t
            if dt > self.slow:
                self.s[name] += dt
                self.n[name] += 1
            return out

        return timed

    def report(self) -> str:
        rows = sorted(self.s.items(), key=lambda kv: -kv[1])
        return "; ".join(f"{k} {v:.1f} s ({self.n[k]})" for k, v in rows) or "-"


def instrument(llm, first: FirstCalls) -> None:
    from kvagents.kernels import fused_gemv

    eng = llm.fast_engine
    lm = eng.lm
    for name in ("_prologue", "_pre", "_post", "_final"):
        setattr(lm, name, first.wrap(name, getattr(lm, name)))
    eng._head_graph = first.wrap("head (compiled)", eng._head_graph)
    eng.base.prefill = first.wrap("prefill (eager)", eng.base.prefill)
    gemv = fused_gemv.gemv
    fused_gemv.gemv = first.wrap("fused gemv (triton jit)", gemv)


def child(args) -> None:
    t0 = time.perf_counter()
    model = qwen3_8b_random()
    L = model.config.num_hidden_layers
    llm = KVModel(model, NoTokenizer())
    prompt, prompts32 = bench_prompts()
    sync()
    print(f"import {t0 - T_START:.1f} s, model built in {time.perf_counter() - t0:.1f} s", flush=True)
    first = FirstCalls()
    t = time.perf_counter()
    _ = llm.fast_engine
    print(f"engine built in {time.perf_counter() - t:.2f} s", flush=True)
    if args.breakdown:
        instrument(llm, first)
    for key in args.cases:
        name, kw = CASES[key]
        p = SamplingParams(**kw)
        ps = prompts32 if key == "32" else [prompt]
        times = []
        for _ in range(2):
            sync()
            t = time.perf_counter()
            llm.generate(ps, p, components=components(L), fast=True)
            sync()
            times.append(time.perf_counter() - t)
            if args.breakdown and len(times) == 1:
                eng = llm.fast_engine
                print(f"  {name} first call pieces: {first.report()}; graph captures {eng.captures} "
                      f"({eng.capture_s:.1f} s, compiles included)", flush=True)
                if eng.precompile_stats:  # KVAGENTS_PRECOMPILE=1: the recording pass and its workers
                    print(f"  recording pass: {eng.precompile_stats[-1]}", flush=True)
                first.s.clear()
                first.n.clear()
        print(f"{name} with components: first call {times[0]:.1f} s, second {times[1]:.2f} s", flush=True)
    if args.breakdown:
        from torch._dynamo.utils import compile_times

        print(compile_times(repr="str", aggregate=True), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", default=["B=1", "1x8"], help="of B=1, 1x8, 32")
    ap.add_argument("--cold", action="store_true", help="fresh empty compile caches, in a child process")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the child (with --cold)")
    args = ap.parse_args()
    args.cases = [c.split()[0] for c in args.cases]
    if args.cold:
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{d}/inductor", TRITON_CACHE_DIR=f"{d}/triton")
            env.update(kv.split("=", 1) for kv in args.env)
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--breakdown", *args.cases]
            rc = subprocess.call(cmd, env=env)
            print(f"cold process {' '.join(args.env) or '(defaults)'}: {time.perf_counter() - t:.1f} s in all, "
                  f"rc {rc}", flush=True)
        return
    child(args)


if __name__ == "__main__":
    main()
