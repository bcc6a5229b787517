"""What finished rows cost a decode step: the random Qwen3-8B shape, 32 rows at a long context, one CUDA-graphed
``StaticLM.step`` with a given fraction of rows still running, SDPA (a masked row still reads its columns) against
the per-row-range Triton attention (``KVAGENTS_ATTN=triton``: a finished row reads nothing, a row reads only its own
columns ``start[b] .. col``).

    python bench/finished_rows.py                       # B=32, context 2048, live 1 / 0.5 / 0.125
    python bench/finished_rows.py --tiny                # CPU smoke run (Triton interpreter), code paths only

The weights (GEMVs) cost the same whatever the rows do; the difference between the live fractions is the attention
work that finished rows no longer cost. The pieces run eagerly inside the captured graph (no ``torch.compile``: the
point is the attention difference, not the best step time).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048, help="cache columns in use (the step's col + 1)")
    ap.add_argument("--live", default="1,0.5,0.125", help="fractions of rows still running")
    ap.add_argument("--impls", default="sdpa,triton")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny shapes: code paths only")
    args = ap.parse_args()
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.batch, args.context, args.reps = 4, 40, 1
    import gpu_decode
    import torch
    from fused_gemv_bench import time_calls

    from kvagents.engine.static_cache import StaticLM

    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        gpu_decode.DEV = "cpu"
    model = gpu_decode.qwen3_8b_random(dtype=torch.float32 if args.tiny else torch.bfloat16, tiny=args.tiny)
    dev = model.device
    B, L = args.batch, args.context
    rows = []
    for impl in args.impls.split(","):
        os.environ["KVAGENTS_ATTN"] = impl
        lm = StaticLM(model)
        lm.rope_table(L + 1)
        K, V = lm.new_cache(B, L)
        K.normal_(0, 1)
        V.normal_(0, 1)
        ids = torch.randint(1000, 100000, (B,), device=dev)
        pos = torch.full((B,), L - 1, device=dev)
        col = torch.tensor([L - 1], device=dev)
        start = torch.zeros(B, dtype=torch.long, device=dev)
        cols = torch.arange(L, device=dev)
        live = torch.ones(B, dtype=torch.bool, device=dev)
        out = {}
        for frac in (float(x) for x in args.live.split(",")):
            live.fill_(False)
            live[: max(1, round(B * frac))] = True
            fn = functools.partial(lm.step, ids, pos, col, start, K, V, L, cols, live)
            out[frac] = time_calls([fn], reps=args.reps) / 1e3  # one graphed step (a wall-clock call on the CPU)
        rows.append((impl, out))
        fn = K = V = None  # free the cache before the next one
        if cuda:
            torch.cuda.empty_cache()
    fracs = [float(x) for x in args.live.split(",")]
    dev_name = torch.cuda.get_device_name() if cuda else "CPU (interpreter; not a timing)"
    print(f"\n{dev_name}, B={B}, context {L}, Qwen3-8B shape{' (tiny)' if args.tiny else ''}, {model.dtype}, graphed "
          f"step, median of {args.reps}: ms/step by fraction of rows still running\n")
    print("| attention | " + " | ".join(f"live {f:g}" for f in fracs) + " |")
    print("|---|" + "---|" * len(fracs))
    for impl, out in rows:
        print(f"| {impl} | " + " | ".join(f"{out[f]:.3f}" for f in fracs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
