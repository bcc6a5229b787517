"""``kvagents.kernels.topk_values`` against ``torch.topk(...).values`` on the GPU: top-20 of float32 ``[B, 151936]`` rows
(random normal logits), µs per call from a CUDA graph of 100 calls, and whether the values are identical.

    python bench/topk_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fused_gemv_bench import time_calls  # noqa: E402

from kvagents.kernels.topk_values import topk_values  # noqa: E402


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=20, help="top-k (default 20, the probability scores' k)")
    ap.add_argument("--vocab", type=int, default=151936, help="row length (default: Qwen's vocabulary)")
    args = ap.parse_args()
    V, k = args.vocab, args.k
    print(f"{torch.cuda.get_device_name()}, top-{k} of float32 [B, {V}]")
    for B in (1, 8, 32, 64):
        x = torch.randn(B, V, device="cuda")
        same = torch.equal(topk_values(x, k), torch.topk(x, k, dim=-1).values)
        t_torch = time_calls([lambda: torch.topk(x, k, dim=-1).values] * 100)  # noqa: B023
        t_ours = time_calls([lambda: topk_values(x, k)] * 100)  # noqa: B023
        print(f"B={B:3d}: torch.topk {t_torch:7.1f} µs, topk_values {t_ours:7.1f} µs, identical {same}", flush=True)


if __name__ == "__main__":
    main()
