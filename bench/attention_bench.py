"""``kvagents.kernels.decode_attention`` against the decode step's SDPA attention (``kvagents.engine.static_cache.attend`` with
the additive ``attention_mask``), Qwen3-8B's attention shape (H_q = 32, H_kv = 8, d = 128, bfloat16).

For B = 1, 8, 32 rows, ``length`` = 384, 1024, 4096 columns (``cap = length``), live fractions 1, 1/2, 1/8 (every
``1/f``-th row live; the others finished) and a mixed-start case (every row live, every other row starting at
``length / 2``), times µs per call from a CUDA graph of back-to-back calls (``fused_gemv_bench.time_calls``):

- ``sdpa``: ``attend(q, K[i][:, :, :L], V[i][:, :, :L], mask, scale, 8)``, the mask built once outside (the step
  builds it once for all layers; its cost is the ``mask`` column);
- ``ours``: ``decode_attention(q, K[i], V[i], start, col, live, scale, L)``.

The calls rotate over the layers ``i`` of a ``[layers, B, 8, cap, 128]`` cache big enough (>= 256 MB, or one layer
when that is already more) that K/V stream from HBM as in a real step, not from L2 (``--layers`` overrides). Each
case first checks the outputs: max abs difference from SDPA on the live rows, and the dead rows exactly zero.

    python bench/attention_bench.py                 # the full grid (not run on a GPU yet)
    python bench/attention_bench.py --quick         # fewer cases
    TRITON_INTERPRET=1 python bench/attention_bench.py --quick --tiny   # CPU smoke test: tiny shapes, code paths only
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fused_gemv_bench import time_calls  # noqa: E402

from kvagents.engine.static_cache import attend, attention_mask  # noqa: E402
from kvagents.kernels.decode_attention import decode_attention, plan, resolve_config  # noqa: E402

ROTATE_BYTES = 256 << 20


def cases(quick: bool, tiny: bool):
    """``(B, length, live fraction, mixed starts)`` tuples; B = 1 keeps its one live row (fraction 1, no mixed
    starts)."""
    if tiny:
        bs, lengths = ((1, 3) if quick else (1, 3, 5)), ((40, 160) if quick else (40, 160, 300))
    else:
        bs, lengths = ((1, 32) if quick else (1, 8, 32)), ((1024, 4096) if quick else (384, 1024, 4096))
    fracs = (1.0, 0.125) if quick else (1.0, 0.5, 0.125)
    for b in bs:
        for n in lengths:
            for f in fracs:
                if b > 1 or f == 1.0:
                    yield b, n, f, False
            if b > 1:
                yield b, n, 1.0, True


def run_case(b, n, frac, mixed, hq, hkv, d, dtype, device, layers, calls, config):
    g = torch.Generator(device=device).manual_seed(b * 7919 + n)
    cap = n
    per_layer = 2 * b * hkv * cap * d * torch.finfo(dtype).bits // 8
    nl = layers or (1 if device == "cpu" else max(1, min(calls, math.ceil(ROTATE_BYTES / per_layer))))
    K = torch.randn(nl, b, hkv, cap, d, generator=g, device=device).to(dtype)
    V = torch.randn(nl, b, hkv, cap, d, generator=g, device=device).to(dtype)
    q = torch.randn(b, hq, d, generator=g, device=device).to(dtype)
    scale = d**-0.5
    step = round(1 / frac)
    live = torch.arange(b, device=device) % step == 0
    start = torch.zeros(b, dtype=torch.long, device=device)
    if mixed:
        start[1::2] = n // 2
    col = torch.tensor([n - 1], device=device)
    cols = torch.arange(cap, device=device)
    mask = attention_mask(col, start, cols[:n], dtype)

    def sdpa(i):
        return attend(q, K[i][:, :, :n], V[i][:, :, :n], mask, scale, hkv)

    def ours(i):
        return decode_attention(q, K[i], V[i], start, col, live, scale, n, config=config)

    want, got = sdpa(0), ours(0)
    diff = (got.float() - want.float())[live].abs().max().item()
    dead_zero = bool((got[~live] == 0).all())
    layer_ids = [c % nl for c in range(calls)]
    t_sdpa = time_calls([lambda i=i: sdpa(i) for i in layer_ids])
    t_ours = time_calls([lambda i=i: ours(i) for i in layer_ids])
    t_mask = time_calls([lambda: attention_mask(col, start, cols[:n], dtype)] * calls)
    cfg = resolve_config(b, hkv, n, d, config)
    splits = -(-n // cfg["CHUNK"])
    return dict(t_sdpa=t_sdpa, t_ours=t_ours, t_mask=t_mask, diff=diff, dead_zero=dead_zero, layers=nl,
                chunk=cfg["CHUNK"], splits=splits, live=int(live.sum()))  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test under TRITON_INTERPRET=1)")
    ap.add_argument("--layers", type=int, default=0, help="cache layers to rotate over (default: >= 256 MB)")
    ap.add_argument("--calls", type=int, default=0, help="calls per CUDA graph (default 50; 2 on CPU)")
    ap.add_argument("--block-n", type=int, default=0, help="config BLOCK_N override")
    ap.add_argument("--chunk", type=int, default=0, help="config CHUNK override")
    ap.add_argument("--num-warps", type=int, default=0, help="config num_warps override")
    ap.add_argument("--num-stages", type=int, default=0, help="config num_stages override")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hq, hkv, d = (4, 2, 16) if args.tiny else (32, 8, 128)
    dtype = torch.bfloat16
    calls = args.calls or (50 if device == "cuda" else 2)
    config = {k: v for k, v in (("BLOCK_N", args.block_n), ("CHUNK", args.chunk), ("num_warps", args.num_warps),
                                ("num_stages", args.num_stages)) if v} or None  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}: decode attention, H_q={hq} H_kv={hkv} d={d} {str(dtype)[6:]}, {calls} calls per graph, "
          f"config {config or 'default'}; µs per call (sdpa excludes the mask, built once per step)\n")  # fmt: skip
    print("| B | length | live rows | starts | splits x chunk | layers | sdpa µs | mask µs | ours µs | sdpa/ours "
          "| max abs diff | dead rows 0 |")  # fmt: skip
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    bad = []
    for b, n, frac, mixed in cases(args.quick, args.tiny):
        r = run_case(b, n, frac, mixed, hq, hkv, d, dtype, device, args.layers, calls, config)
        starts = "half at L/2" if mixed else "0"
        print(f"| {b} | {n} | {r['live']}/{b} | {starts} | {r['splits']} x {r['chunk']} | {r['layers']} "
              f"| {r['t_sdpa']:.1f} | {r['t_mask']:.1f} | {r['t_ours']:.1f} | {r['t_sdpa'] / r['t_ours']:.2f} "
              f"| {r['diff']:.2e} | {r['dead_zero']} |", flush=True)  # fmt: skip
        if r["diff"] > 2e-2 or not r["dead_zero"]:
            bad.append((b, n, frac, mixed))
    print(f"\ndefault split plan at B=1, 8, 32 (length 4096): {[plan(b, hkv, 4096) for b in (1, 8, 32)]}")
    if bad:
        print(f"MISMATCH in {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
