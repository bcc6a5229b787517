"""KVIndex speed and recall: exact vs IVF on random vectors of the KV dimension; GPU torch path vs faiss-cpu.

    python bench/index_bench.py                          # CPU: exact vs IVF, 200k vectors, dim 128
    python bench/index_bench.py --device cuda            # also: exact torch search on the GPU vs faiss-cpu
    python bench/index_bench.py --write                  # append the table to bench/RESULTS.md

Two data sets: ``gaussian`` (i.i.d. N(0, 1), the worst case for IVF: no cluster structure) and ``clustered``
(1000 Gaussian centres + noise, closer to real embeddings). Queries come from the same distribution (not from the
index). Recall@10 is measured against the exact index's answers. Throughput: one batch of all queries
(``batch``) and queries one at a time (``single``), best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvagents.retrieval.index import KVIndex  # noqa: E402


def make_data(kind: str, n: int, nq: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal((n + nq, dim), dtype=np.float32)
    else:
        centers = rng.standard_normal((1000, dim), dtype=np.float32) * 3
        x = centers[rng.integers(0, 1000, n + nq)] + rng.standard_normal((n + nq, dim), dtype=np.float32)
    return x[:n], x[n:]


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:  # pragma: no cover
        pass


def recall_at(got: list[list], want: list[list], k: int = 10) -> float:
    return float(np.mean([len({h.id for h in g[:k]} & {h.id for h in w[:k]}) / k for g, w in zip(got, want)]))


def bench_index(name: str, index: KVIndex, x: np.ndarray, q: np.ndarray, ids: list[str], repeats: int,
                nsingle: int) -> tuple[dict, list]:
    t0 = time.perf_counter()
    if not index.is_trained:
        index.train(x[: min(len(x), 100_000)])
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(x, ids=ids)
    t_add = time.perf_counter() - t0
    index.search_batch(q[:8], 10)  # warm-up (GPU kernels, faiss threads)
    t_batch, hits = timed(lambda: index.search_batch(q, 10), repeats)
    t_single, _ = timed(lambda: [index.search(v, 10) for v in q[:nsingle]], repeats)
    row = {"index": name, "train_s": t_train, "add_s": t_add, "batch_qps": len(q) / t_batch,
           "single_ms": 1000 * t_single / nsingle}
    return row, hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--dim", type=int, default=128, help="KV dimension (qwen2.5-coder-0.5b default pooling: 128)")
    ap.add_argument("--ivf", default="IVF1024,Flat")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--data", nargs="+", default=["gaussian", "clustered"])
    ap.add_argument("--device", default="cpu", help="cuda: add the GPU torch path vs faiss-cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    args = ap.parse_args(argv)

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    device_name = f"CPU ({platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} faiss threads)"
    if args.device.startswith("cuda"):
        import torch

        device_name += f" + {torch.cuda.get_device_name(0)}"
    rows = []
    for kind in args.data:
        x, q = make_data(kind, args.n, args.queries, args.dim)
        ids = [str(i) for i in range(len(x))]
        exact = KVIndex(args.dim, "l2", backend="faiss")
        r, want = bench_index("faiss-cpu exact (Flat)", exact, x, q, ids, args.repeats, args.single)
        rows.append({**r, "data": kind, "recall@10": 1.0})
        base_batch, base_single = r["batch_qps"], r["single_ms"]
        ivf = KVIndex(args.dim, "l2", factory=args.ivf, backend="faiss")
        for nprobe in args.nprobe:
            ivf._backend.nprobe = nprobe
            if len(ivf):
                t_batch, got = timed(lambda ivf=ivf, q=q: ivf.search_batch(q, 10), args.repeats)
                t_single, _ = timed(lambda ivf=ivf, q=q: [ivf.search(v, 10) for v in q[: args.single]], args.repeats)
                r = {"index": f"faiss-cpu {args.ivf} nprobe={nprobe}", "train_s": float("nan"), "add_s": float("nan"),
                     "batch_qps": len(q) / t_batch, "single_ms": 1000 * t_single / args.single}
            else:
                r, got = bench_index(f"faiss-cpu {args.ivf} nprobe={nprobe}", ivf, x, q, ids, args.repeats,
                                     args.single)
            rows.append({**r, "data": kind, "recall@10": recall_at(got, want)})
        if args.device.startswith("cuda"):
            gpu = KVIndex(args.dim, "l2", backend="torch", device=args.device)
            r, got = bench_index(f"torch exact on {args.device}", gpu, x, q, ids, args.repeats, args.single)
            r["speedup_batch"] = r["batch_qps"] / base_batch
            r["speedup_single"] = base_single / r["single_ms"]
            rows.append({**r, "data": kind, "recall@10": recall_at(got, want)})
        for r in rows:
            if r["data"] == kind:
                print(f"{kind:9s} {r['index']:36s} recall@10 {r['recall@10']:.3f}  batch {r['batch_qps']:10.0f} q/s  "
                      f"single {r['single_ms']:8.3f} ms", flush=True)

    date = dt.date.today().isoformat()
    lines = [
        f"\n### KVIndex search, {args.n} x {args.dim} float32, {args.queries} queries, k=10, L2 — {device_name}, {date}\n",
        f"`python bench/index_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`. Recall@10 against "
        "the exact index; batch = all queries in one call; single = one query per call (best of "
        f"{args.repeats}).\n",
        "| data | index | recall@10 | batch q/s | single ms/query | train s | add s | GPU speed-up batch / single |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = f"{r['speedup_batch']:.1f}x / {r['speedup_single']:.1f}x" if "speedup_batch" in r else ""
        lines.append(f"| {r['data']} | {r['index']} | {r['recall@10']:.3f} | {r['batch_qps']:.0f} | "
                     f"{r['single_ms']:.3f} | {r['train_s']:.2f} | {r['add_s']:.2f} | {sp} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    if args.write:
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
