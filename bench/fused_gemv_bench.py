"""Microbenchmark of kvagents/kernels/fused_gemv.py (the fused Triton GEMV, M = 1, or the tensor-core kernel for
``--rows M``) against the unfused eager sequence.

For the decode-step projections of Qwen3-8B and Qwen2.5-0.5B at batch 1 in bfloat16, times

- ``unfused``: the eager ops of kvagents/engine/static_cache.py (RMSNorm / SiLU * up / residual add as separate kernels,
  ``F.linear`` through cuBLAS),
- ``cublas``: ``F.linear`` alone (the GEMV without the small ops: the bar the Triton GEMV has to clear),
- ``fused``: :func:`gemv` over a pruned grid of launch configurations (coordinate descent over the tile
  ``(BLOCK_N, BLOCK_K)``, ``num_warps``, ``num_stages``; tiles keep 8..64 float32 accumulators per thread, which
  compiled without spills for sm_90), within a time budget (``--budget``, seconds for the whole search),

each as a CUDA graph of 50 back-to-back calls (weights rotate over copies totalling >= 256 MB so they stream from
HBM as in a real step, not from L2). Prints one row per shape (bytes moved, best config, µs, GB/s and % of the
measured device-to-device copy bandwidth, max abs diff of fused vs unfused), the per-step totals, and a
``CONFIGS`` dict literal to paste into kvagents/kernels/fused_gemv.py.

Needs torch, triton and the kvagents package importable (the module is loaded from its file; it imports
``kvagents.kernels.triton_support``, hence the package's ``__init__``):

    python3 bench/fused_gemv_bench.py                   # ~2-3 minutes on an H100
    python3 bench/fused_gemv_bench.py --shapes 8b --budget 400 --verbose
    python3 bench/fused_gemv_bench.py --smoke           # CPU, Triton interpreter, tiny shapes: code paths only
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the module imports kvagents.kernels.triton_support
_spec = importlib.util.spec_from_file_location("fused_gemv", ROOT / "kvagents" / "kernels" / "fused_gemv.py")
fg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fg)

EPS = 1e-6
CALLS = 50  # calls per CUDA graph
ROTATE_BYTES = 256 << 20  # weight copies per shape, so that 50 calls stream from HBM (L2 is 50 MB)
GRID = dict(BLOCK_N=(4, 8, 16, 32), BLOCK_K=(128, 256, 512, 1024), num_warps=(2, 4, 8), num_stages=(1, 2, 3, 4))
# the several-row (tensor-core) kernel, --rows M > 1
GRID_ROWS = dict(BLOCK_N=(16, 32, 64, 128), BLOCK_K=(64, 128, 256, 512), num_warps=(2, 4, 8),
                 num_stages=(2, 3, 4, 5, 6))
ROWS = 1

# name, N, K, prologue (None | "rms" | "swiglu"), bias, residual, float32 out; layers per model for the totals
SHAPES = [
    ("8b.qkv", 6144, 4096, "rms", False, False, False),
    ("8b.o_proj", 4096, 4096, None, False, True, False),
    ("8b.gate_up", 24576, 4096, "rms", False, False, False),
    ("8b.down", 4096, 12288, "swiglu", False, True, False),
    ("8b.lm_head", 151936, 4096, "rms", False, False, True),
    ("0.5b.qkv", 1152, 896, "rms", True, False, False),
    ("0.5b.o_proj", 896, 896, None, False, True, False),
    ("0.5b.gate_up", 9728, 896, "rms", False, False, False),
    ("0.5b.down", 896, 4864, "swiglu", False, True, False),
    ("0.5b.lm_head", 151936, 896, "rms", False, False, True),
]
LAYERS = {"8b": 36, "0.5b": 24}


def rms(x, w, eps):
    """kvagents.engine.static_cache._rms (Hugging Face's RMSNorm, op for op), copied to keep this script standalone."""
    dt = x.dtype
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(dt)


class Case:
    """The tensors of one shape: weight copies, input, norm weight, bias, residual."""

    def __init__(self, name, n, k, prologue, bias, residual, fp32_out, device, dtype=torch.bfloat16):
        self.name, self.n, self.k, self.prologue, self.fp32_out = name, n, k, prologue, fp32_out
        g = torch.Generator(device=device).manual_seed(0)

        def r(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=g, device=device) * scale + shift).to(dtype)

        wbytes = n * k * 2
        copies = 1 if device == "cpu" else max(1, min(CALLS, math.ceil(ROTATE_BYTES / wbytes)))
        self.ws = [r(n, k, scale=k**-0.5) for _ in range(copies)]
        self.x = r(ROWS, 2 * k if prologue == "swiglu" else k)
        self.g = r(k, scale=0.1, shift=1.0) if prologue == "rms" else None
        self.b = r(n, scale=0.1) if bias else None
        self.res = r(ROWS, n) if residual else None
        vec = self.x.numel() + n * (ROWS + (bias is True) + ROWS * (residual is True)) + (k if prologue == "rms" else 0)
        self.bytes = wbytes + 2 * vec + (2 * n * ROWS if fp32_out else 0)

    def unfused(self, w):
        x = self.x
        if self.prologue == "rms":
            x = rms(x, self.g, EPS)
        elif self.prologue == "swiglu":
            gate, up = x.split((self.k, self.k), dim=-1)
            x = F.silu(gate) * up
        y = F.linear(x, w, self.b)
        if self.res is not None:
            y = self.res + y
        return y.float() if self.fp32_out else y

    def cublas(self, w):
        x = self.x[:, : self.k]
        return F.linear(x, w, self.b)

    def fused(self, w, cfg):
        return fg.gemv(self.x, w, bias=self.b, rms_weight=self.g, eps=EPS, swiglu=self.prologue == "swiglu",
                       residual=self.res, out_dtype=torch.float32 if self.fp32_out else None, config=cfg)  # fmt: skip


def time_calls(fns, reps=10):
    """µs per call of ``fns`` (zero-argument callables) run back to back: one CUDA graph of them all, replayed
    ``reps`` times (median). On CPU (--smoke) a plain wall-clock loop."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) * 1e6 / len(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (Triton compiles here), outside the capture
        for f in fns[:2]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    del graph
    return statistics.median(ts) * 1e3 / len(fns)


def copy_bandwidth(nbytes=1 << 30):
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)] * 10, reps=10)
    return 2 * nbytes / us / 1e3


def valid(cfg, n, k):
    if ROWS > 1:  # weight tiles of the pipeline in shared memory; 16..128 weight elements per thread and stage
        per_thread = cfg["BLOCK_N"] * cfg["BLOCK_K"] // (32 * cfg["num_warps"])
        smem = cfg["BLOCK_N"] * cfg["BLOCK_K"] * 2 * cfg["num_stages"]
        return (16 <= per_thread <= 128 and smem <= 160 * 1024 and cfg["BLOCK_K"] <= max(16, fg._next_pow2(k))
                and cfg["BLOCK_N"] <= max(16, fg._next_pow2(n)))  # fmt: skip
    per_thread = cfg["BLOCK_N"] * cfg["BLOCK_K"] // (32 * cfg["num_warps"])
    return (8 <= per_thread <= 64 and cfg["BLOCK_K"] <= max(16, fg._next_pow2(k))
            and cfg["BLOCK_N"] <= fg._next_pow2(n))  # fmt: skip


class OutOfTime(Exception):
    pass


def search(case, n_calls, deadline, verbose):
    """Coordinate descent over GRID (the tile (BLOCK_N, BLOCK_K) as one coordinate) from the module's default;
    returns (best config, {config tuple: µs})."""
    results: dict[tuple, float] = {}
    fns_w = [case.ws[i % len(case.ws)] for i in range(n_calls)]

    def ev(cfg, force=False):
        key = tuple(cfg[k] for k in GRID)
        if key in results or not (force or valid(cfg, case.n, case.k)):
            return
        if results and time.perf_counter() > deadline:  # the first config always runs
            raise OutOfTime
        try:
            us = time_calls([functools.partial(case.fused, w, cfg) for w in fns_w])
        except Exception as e:  # noqa: BLE001 - out of shared memory / registers: skip the config
            us = float("inf")
            if verbose:
                print(f"    {key}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        results[key] = us
        if verbose:
            print(f"    {dict(zip(GRID, key))}: {us:.1f} µs", flush=True)

    def best():
        return dict(zip(GRID, min(results, key=results.get)))

    start = fg.resolve_config(case.n, case.k, rows=ROWS)  # the module's choice (CONFIGS or default), clamped to the shape
    tiles = [dict(start, BLOCK_N=bn, BLOCK_K=bk) for bn in GRID["BLOCK_N"] for bk in GRID["BLOCK_K"]]
    if not valid(start, case.n, case.k):
        start = next((c for c in tiles if valid(c, case.n, case.k)), start)
    try:
        ev(start, force=True)
        cur = None
        while cur != best():
            cur = best()
            for bn in GRID["BLOCK_N"]:
                for bk in GRID["BLOCK_K"]:
                    ev(dict(best(), BLOCK_N=bn, BLOCK_K=bk))
            for dim in ("num_warps", "num_stages"):
                for v in GRID[dim]:
                    ev(dict(best(), **{dim: v}))
    except OutOfTime:
        pass
    return best(), results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="", help="comma-separated name prefixes (e.g. 8b, 0.5b.down); default all")
    ap.add_argument("--budget", type=float, default=140.0, help="seconds for the config search over all shapes")
    ap.add_argument("--verbose", action="store_true", help="print every config's time")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes: code paths only")
    ap.add_argument("--rows", type=int, default=1, help="activation rows M (> 1: the tensor-core kernel)")
    ap.add_argument("--write-configs", default="", help="also write the best configs as JSON here (read by "
                    "kvagents.kernels.fused_gemv when KVAGENTS_GEMV_CONFIGS names the file)")
    args = ap.parse_args()
    global ROWS, GRID
    ROWS = args.rows
    if ROWS > 1:
        GRID = GRID_ROWS
    t_start = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --smoke for a CPU code-path check)")
    shapes = [s for s in SHAPES if not args.shapes or any(s[0].startswith(p) for p in args.shapes.split(","))]
    if args.smoke:  # tiny shapes, a couple of configs each
        shapes = [(name, max(16, n // 2048) + 3, max(32, k // 64) + 16, *rest) for name, n, k, *rest in shapes]
    n_calls = 2 if args.smoke else CALLS
    if args.smoke:
        print("SMOKE RUN (CPU, Triton interpreter): code paths only, the numbers mean nothing")
    else:
        p = torch.cuda.get_device_properties(0)
        print(f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, triton "
              f"{fg._triton()[0].__version__}")  # fmt: skip
    bw = float("nan") if args.smoke else copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)\n", flush=True)

    rows, best_cfgs = [], {}
    deadline_all = time.perf_counter() + (2.0 if args.smoke else args.budget)
    for i, spec in enumerate(shapes):
        case = Case(*spec, device=device)
        ws = [case.ws[j % len(case.ws)] for j in range(n_calls)]
        unfused_us = time_calls([functools.partial(case.unfused, w) for w in ws])
        cublas_us = time_calls([functools.partial(case.cublas, w) for w in ws])
        left = deadline_all - time.perf_counter()
        deadline = time.perf_counter() + max(left / (len(shapes) - i), 0.0)
        t0 = time.perf_counter()
        cfg, results = search(case, n_calls, deadline, args.verbose)
        fused_us = results[tuple(cfg[k] for k in GRID)]
        diff = (case.fused(case.ws[0], cfg).float() - case.unfused(case.ws[0]).float()).abs().max().item()
        best_cfgs[(case.n, case.k)] = cfg
        gbs = case.bytes / fused_us / 1e3
        rows.append((case.name, f"{case.n}x{case.k}", case.prologue or "-", "res" if case.res is not None else "-",
                     f"{case.bytes / 1e6:.1f}", "{BLOCK_N}/{BLOCK_K}/{num_warps}/{num_stages}".format(**cfg),
                     f"{fused_us:.1f}", f"{unfused_us:.1f}", f"{cublas_us:.1f}", f"{unfused_us / fused_us:.2f}",
                     f"{gbs:.0f}", f"{100 * gbs / bw:.0f}", f"{diff:.3g}", str(len(results))))  # fmt: skip
        print(f"{case.name}: fused {fused_us:.1f} µs ({cfg}), unfused {unfused_us:.1f} µs, cublas {cublas_us:.1f} µs; "
              f"{len(results)} configs in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        del case

    head = ("shape", "N x K", "prologue", "epilogue", "MB", "BN/BK/warps/stages", "fused µs", "unfused µs",
            "cublas µs", "speedup", "fused GB/s", "% copy", "max|diff|", "configs")  # fmt: skip
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for model, layers in LAYERS.items():
        per = {r[0].rsplit(".", 1)[1]: (float(r[6]), float(r[7])) for r in rows if r[0].startswith(model + ".")}
        if len(per) == 5:
            lay = [v for k, v in per.items() if k != "lm_head"]
            fused = layers * sum(v[0] for v in lay) + per["lm_head"][0]
            unf = layers * sum(v[1] for v in lay) + per["lm_head"][1]
            print(f"\n{model}: {layers} layers + head, projections and their small ops: fused {fused / 1e3:.2f} ms, "
                  f"unfused {unf / 1e3:.2f} ms per step")  # fmt: skip
    print("\n# paste into kvagents/kernels/fused_gemv.py")
    print(("ROW_CONFIGS" if ROWS > 1 else "CONFIGS") + ": dict[tuple[int, int], dict[str, int]] = {")
    for (n, k), cfg in best_cfgs.items():
        print(f"    ({n}, {k}): {cfg!r},")
    print("}")
    if args.write_configs:
        import json

        with open(args.write_configs, "w") as f:
            json.dump([[n, k, cfg] + (["rows"] if ROWS > 1 else []) for (n, k), cfg in best_cfgs.items()], f)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
