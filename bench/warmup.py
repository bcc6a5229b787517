"""Warm-up of the fast path in a fresh process: the first call of each case (compile + CUDA-graph capture), then a
steady call, on the random Qwen3-8B shape. Run it twice in a row to see the effect of Inductor's and Triton's
on-disk caches (the second process reuses the compiled kernels of the first).

    python bench/warmup.py            # prints one line per case
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_decode import NoTokenizer, components, qwen3_8b_random, sync  # noqa: E402

from kvagents import KVModel, SamplingParams  # noqa: E402


def main() -> None:
    t0 = time.perf_counter()
    model = qwen3_8b_random()
    L = model.config.num_hidden_layers
    llm = KVModel(model, NoTokenizer())
    prompt = torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    cases = [("B=1 greedy", SamplingParams(max_new_tokens=256, temperature=0, ignore_eos=True)),
             ("1x8 top-p", SamplingParams(max_new_tokens=256, temperature=0.7, top_p=0.95, n=8, seed=0,
                                          ignore_eos=True))]
    for name, p in sys.argv[1:] and [c for c in cases if c[0].split()[0] in sys.argv[1:]] or cases:
        times = []
        for _ in range(2):
            sync()
            t = time.perf_counter()
            llm.generate([prompt], p, components=components(L), fast=True)
            sync()
            times.append(time.perf_counter() - t)
        print(f"{name} with components: first call {times[0]:.1f} s, second {times[1]:.2f} s", flush=True)


if __name__ == "__main__":
    main()
