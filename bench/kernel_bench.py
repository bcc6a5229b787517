"""Microbenchmarks of kvagents' Triton kernels against their torch references, on a CUDA device.

    .venv/bin/python bench/kernel_bench.py attention [options]   # decode attention over per-row columns vs SDPA
    .venv/bin/python bench/kernel_bench.py gemv [options]        # fused GEMVs (1-8 rows) vs cuBLAS + separate ops
    .venv/bin/python bench/kernel_bench.py top-p [options]       # sort-free top-p kernels vs the torch search
    .venv/bin/python bench/kernel_bench.py top-k [options]       # exact top-k values vs torch.topk
    .venv/bin/python bench/kernel_bench.py gemv --help           # each benchmark's own options

Each benchmark is its own script beside this one (``attention_bench.py``, ``fused_gemv_bench.py``,
``top_p_bench.py``, ``topk_bench.py``); this entry point runs the one named with the remaining arguments.
Results: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCHES = {
    "attention": "attention_bench.py",
    "gemv": "fused_gemv_bench.py",
    "top-p": "top_p_bench.py",
    "top-k": "topk_bench.py",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        return 0
    script = Path(__file__).resolve().parent / BENCHES[argv[0]]
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
