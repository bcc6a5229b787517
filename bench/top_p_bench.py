"""``kvagents.kernels.top_p_search.top_p_keep_kernel`` (the nucleus search as Triton launches) against the torch search
``kvagents.engine.fast_sampling._top_p_keep_impl`` (its passes torch.compile'd, as the fast engine runs them) and the eager
sort-and-cumsum nucleus: float32 ``[B, 151936]`` rows (softmax of ``randn * 2``), top_p 0.95, B = 1, 8, 32. Checks
that the masks are equal first, then times each as µs per call from a CUDA graph of ``--calls`` back-to-back calls
(``fused_gemv_bench.time_calls``); prints a markdown table.

    python bench/top_p_bench.py
    python bench/top_p_bench.py --ways 8,16 --blocks 1024,2048,4096,8192   # the block / ways sweep
    TRITON_INTERPRET=1 python bench/top_p_bench.py --tiny                  # CPU, interpreter, small rows: code paths
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--tiny" in sys.argv:  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fused_gemv_bench import time_calls  # noqa: E402

from kvagents.engine import fast_sampling  # noqa: E402
from kvagents.kernels.top_p_search import plan, top_p_keep_kernel  # noqa: E402


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sp, order = probs.sort(-1, descending=True)
    keep_sorted = (sp.cumsum(-1) - sp) <= top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, small rows: code paths only")
    ap.add_argument("--ways", default="8", help="comma-separated ways for the kernel (the torch search uses 8)")
    ap.add_argument("--blocks", default="", help="comma-separated kernel blocks (default: the module's choice)")
    ap.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--top-p", type=float, default=0.95)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    if args.tiny:
        sizes, v, calls = (1, 3), 2000, 2
    else:
        if not cuda:
            sys.exit("needs a CUDA device (or --tiny with TRITON_INTERPRET=1)")
        sizes, v, calls = (1, 8, 32), 151936, args.calls
        fast_sampling._compile_search_pass()  # the torch passes as the fast engine runs them
    ways_list = [int(w) for w in args.ways.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else [None]
    top_p = args.top_p
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, eager torch passes)"
    print(f"{name}: top-p {top_p} nucleus of float32 [B, {v}] (softmax of randn * 2), µs per call\n")
    print("| B | ways | block | chunks | launches | torch search (8 ways) | sort + cumsum | kernel | speedup | equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for bsz in sizes:
        probs = (torch.randn(bsz, v, device=device, generator=g) * 2).softmax(-1)
        want = fast_sampling._top_p_keep_impl(probs, top_p, 8)
        same_sort = torch.equal(want, sorted_nucleus(probs, top_p))
        t_torch = time_calls([lambda: fast_sampling._top_p_keep_impl(probs, top_p, 8)] * calls)  # noqa: B023
        t_sort = time_calls([lambda: sorted_nucleus(probs, top_p)] * calls)  # noqa: B023
        for ways in ways_list:
            for block in blocks:
                blk, chunks, passes = plan(bsz, v, ways, block)
                got = top_p_keep_kernel(probs, top_p, ways, block=blk)
                same = torch.equal(got, want)
                t_ours = time_calls([lambda: top_p_keep_kernel(probs, top_p, ways, block=blk)] * calls)  # noqa: B023
                eq = "yes" if same and same_sort else f"kernel {same}, sort {same_sort}"
                print(f"| {bsz} | {ways} | {blk} | {chunks} | {passes + 2} | {t_torch:.1f} | {t_sort:.1f} | "
                      f"{t_ours:.1f} | {t_torch / t_ours:.2f}x | {eq} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
