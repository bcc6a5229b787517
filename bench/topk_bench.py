"""``kvagents.topk_values`` against ``torch.topk(...).values`` on the GPU: top-20 of float32 ``[B, 151936]`` rows
(random normal logits), µs per call from a CUDA graph of 100 calls, and whether the values are identical.

    python bench/topk_bench.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvagents.topk_values import topk_values  # noqa: E402


def per_call_us(fn, calls: int = 100, reps: int = 10) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)


def main() -> None:
    V, k = 151936, 20
    print(f"{torch.cuda.get_device_name()}, top-{k} of float32 [B, {V}]")
    for B in (1, 8, 32, 64):
        x = torch.randn(B, V, device="cuda")
        same = torch.equal(topk_values(x, k), torch.topk(x, k, dim=-1).values)
        t_torch = per_call_us(lambda: torch.topk(x, k, dim=-1).values)  # noqa: B023
        t_ours = per_call_us(lambda: topk_values(x, k))  # noqa: B023
        print(f"B={B:3d}: torch.topk {t_torch:7.1f} µs, topk_values {t_ours:7.1f} µs, identical {same}", flush=True)


if __name__ == "__main__":
    main()
