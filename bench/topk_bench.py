"""GPU time of the probability scores' top-k over a vocabulary: torch.topk vs the two-stage topk_values
(kvagents.scoring), float32 [B, 151936], k = 20, CUDA graph of 100 calls.

    python3 bench/topk_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvagents.scoring import topk_values  # noqa: E402


def graph_us(fn, reps: int = 100) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (5 * reps)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: top-20 of float32 [B, 151936]")
    for b in (1, 8, 32):
        x = torch.randn(b, 151936, device="cuda").log_softmax(-1)
        assert torch.equal(topk_values(x, 20), x.topk(20, dim=-1).values)
        t_torch = graph_us(lambda: x.topk(20, dim=-1).values)
        t_two = graph_us(lambda: topk_values(x, 20))
        print(f"B={b:3d}: torch.topk {t_torch:7.1f} us, two-stage {t_two:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
