"""kvagents' Triton kernels against FlashInfer's, in the continuous-batching scheduler's setting, on a CUDA device.

    python bench/flashinfer_bench.py [--rows 32] [--lengths 256 1024 4096] [--json out.json]

Three comparisons, each at the decode step of a Qwen3-8B shape (32 query heads, 8 kv heads, head size 128,
bfloat16, vocabulary 151936) with ``--rows`` rows:

* **decode attention**: :func:`kvagents.kernels.decode_attention.decode_attention` over a layer view ``K[i]`` of the
  static ``[L, B, H_kv, cap, d]`` cache, against ``flashinfer.BatchDecodeWithPagedKVCacheWrapper`` reading the same
  memory in place as an HND paged cache with one page of ``cap`` columns per row (FlashInfer takes the page
  strides as given). Every row starts at column 0 here: the static cache's left padding (a row's first column
  ``start[b] > 0``) has no counterpart in a paged layout whose pages start at their first column, so FlashInfer
  could only serve rows that start at 0 or a paged cache of its own;
* **top-p sampling** from logits ``[B, V]`` at temperature 0.7, top-p 0.9: kvagents' sort-free nucleus search
  (:func:`kvagents.kernels.top_p_search.top_p_keep_kernel`) with the counter-hash exponential noise of the fast
  path, against ``flashinfer.top_p_sampling_from_probs`` (rejection sampling, no sort);
* **q/k norm + RoPE + cache write**: :func:`kvagents.kernels.fused_rope.rope_write_kernel` (one kernel) against
  ``flashinfer.norm.rmsnorm`` on q and k, ``flashinfer.apply_rope_pos_ids_inplace`` and the two cache writes, and
  against the eager torch reference.

Times are the median of ``triton.testing.do_bench_cudagraph`` (the step is replayed as a CUDA graph, as on the fast
path) where a side can be captured, else ``triton.testing.do_bench``; the row says which. FlashInfer compiles its
kernels on first use with the device's nvcc (a few minutes, cached under ``~/.cache/flashinfer``).
Results: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _time(fn, graph: bool = True) -> tuple[float, str]:
    import torch
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            return float(tt.do_bench_cudagraph(fn, rep=200)), "graph"
        except Exception as exc:  # not capturable: time it eagerly and say so
            print(f"  (graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; eager timing)", file=sys.stderr)
            torch.cuda.synchronize()
    return float(tt.do_bench(fn, warmup=50, rep=200)), "eager"


def bench_attention(rows: int, lengths: list[int], layers: int = 2) -> list[dict]:
    import torch

    out = []
    for length in lengths:
        out.append(_attention_case(rows, length, layers))
        torch.cuda.empty_cache()
    return out


def _attention_case(rows: int, length: int, layers: int) -> dict:
    """One row of the attention table: ``rows`` rows of ``length`` columns, layer 1 of a ``layers``-layer cache."""
    import flashinfer
    import torch

    from kvagents.kernels.decode_attention import decode_attention

    hq, hkv, d, dev, dt = 32, 8, 128, "cuda", torch.bfloat16
    cap = length
    K = torch.randn(layers, rows, hkv, cap, d, device=dev, dtype=dt)
    V = torch.randn_like(K)
    q = torch.randn(rows, hq, d, device=dev, dtype=dt)
    start = torch.zeros(rows, dtype=torch.long, device=dev)
    col = torch.tensor([length - 1], device=dev)
    live = torch.ones(rows, dtype=torch.bool, device=dev)
    scale = d ** -0.5
    ours = decode_attention(q, K[1], V[1], start, col, live, scale, length)
    t_ours, how_ours = _time(lambda: decode_attention(q, K[1], V[1], start, col, live, scale, length))
    row = {"what": "decode attention", "rows": rows, "columns": length, "kvagents_us": t_ours * 1e3,
           "kvagents_timing": how_ours}
    bytes_read = 2 * rows * hkv * length * d * 2
    row["kvagents_TBps"] = bytes_read / (t_ours * 1e-3) / 1e12
    for tc in (False, True):
        ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
        indptr = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        indices = torch.arange(rows, dtype=torch.int32, device=dev)
        last = torch.full((rows,), length, dtype=torch.int32, device=dev)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "HND", use_cuda_graph=True, use_tensor_cores=tc, paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
        w.plan(indptr, indices, last, hq, hkv, d, cap, q_data_type=dt, kv_data_type=dt, sm_scale=scale)
        o = torch.empty(rows, hq, d, device=dev, dtype=dt)
        w.run(q, (K[1], V[1]), out=o)
        err = (o.reshape(rows, -1).float() - ours.float()).abs().max().item()
        t_fi, how_fi = _time(lambda w=w, o=o: w.run(q, (K[1], V[1]), out=o))
        key = "flashinfer_tc" if tc else "flashinfer"
        row[f"{key}_us"], row[f"{key}_timing"], row[f"{key}_max_abs_diff"] = t_fi * 1e3, how_fi, err
    print(f"| decode attention | B={rows} cols={length} | {row['kvagents_us']:.1f} ({how_ours}) | "
          f"{row['flashinfer_us']:.1f} / tc {row['flashinfer_tc_us']:.1f} | "
          f"{row['flashinfer_us'] / row['kvagents_us']:.2f} / {row['flashinfer_tc_us'] / row['kvagents_us']:.2f} | "
          f"diff {row['flashinfer_max_abs_diff']:.1e} |", flush=True)
    return row


def bench_sampling(rows: int, vocab: int = 151936) -> list[dict]:
    import flashinfer
    import torch

    from kvagents import SamplingParams
    from kvagents.engine.fast_sampling import hash_exponential, process_logits_search
    from kvagents.kernels.top_p_search import top_p_keep_kernel

    dev = "cuda"
    logits = torch.randn(rows, vocab, device=dev) * 4
    params = SamplingParams(temperature=0.7, top_p=0.9)
    seed, step = torch.tensor(7, device=dev), torch.tensor(0, device=dev)
    rws, voc = torch.arange(rows, device=dev), torch.arange(vocab, device=dev)
    probs0 = torch.softmax(logits / params.temperature, dim=-1)

    def head():  # the sampling step of FastDecodeEngine._head (the nucleus search is an opaque custom op)
        probs = process_logits_search(logits, params, kernel=True).softmax(dim=-1)
        return (probs / hash_exponential(seed, step, rws, voc)).argmax(dim=-1)

    def theirs():
        probs = torch.softmax(logits / params.temperature, dim=-1)
        return flashinfer.top_p_sampling_from_probs(probs, params.top_p)

    # FlashInfer must keep to the nucleus: every drawn token inside kvagents' kept set
    keep = top_p_keep_kernel(probs0, params.top_p)
    inside = bool(keep.gather(1, theirs().long()[:, None]).all())
    timed = {side: [(name, *_time(fn)) for name, fn in variants] for side, variants in (
        ("kvagents", [("eager ops", head), ("compiled head", torch.compile(head, dynamic=False)),
                      ("nucleus search alone", lambda: top_p_keep_kernel(probs0, params.top_p))]),
        ("flashinfer", [("top_p_sampling_from_probs", theirs),
                        ("top_p_renorm_probs alone", lambda: flashinfer.top_p_renorm_probs(probs0, params.top_p))]))}
    out = []
    for side, results in timed.items():
        for name, t, how in results:
            out.append({"what": f"top-p sampling: {side} {name}", "side": side, "rows": rows, "vocab": vocab,
                        "us": t * 1e3, "timing": how, "flashinfer_inside_nucleus": inside})
            print(f"| top-p sampling | B={rows} V={vocab} | {side}: {name} | {t * 1e3:.1f} ({how}) | "
                  f"in nucleus {inside} |", flush=True)
    return out


def bench_rope(rows: int, cap: int = 1024) -> list[dict]:
    import flashinfer
    import torch

    from kvagents.engine.static_cache import rope_write
    from kvagents.kernels.fused_rope import rope_write_kernel

    hq, hkv, d, dev, dt, eps = 32, 8, 128, "cuda", torch.bfloat16, 1e-6
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, device=dev, dtype=dt)
    qn, kn = torch.rand(d, device=dev, dtype=dt) + 0.5, torch.rand(d, device=dev, dtype=dt) + 0.5
    K = torch.zeros(rows, hkv, cap, d, device=dev, dtype=dt)
    V = torch.zeros_like(K)
    col = torch.tensor([cap // 2], device=dev)
    pos = torch.full((rows,), cap // 2, dtype=torch.int32, device=dev)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    ang = pos.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt)[:, None], emb.sin().to(dt)[:, None]

    def fi():
        q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        q = flashinfer.norm.rmsnorm(q.reshape(-1, d), qn, eps).view(rows, hq, d)
        k = flashinfer.norm.rmsnorm(k.reshape(-1, d), kn, eps).view(rows, hkv, d)
        flashinfer.apply_rope_pos_ids_inplace(q, k, pos, rope_theta=1e6)
        K.index_copy_(2, col, k[:, :, None])
        V.index_copy_(2, col, v.reshape(rows, hkv, d)[:, :, None])
        return q

    ref = rope_write(qkv, qn, kn, cos, sin, K, V, col, eps, hq, hkv, d)
    diff = (fi().float() - ref.float()).abs().max().item()
    t_ours, how_ours = _time(lambda: rope_write_kernel(qkv, qn, kn, cos, sin, K, V, col, eps, hq, hkv, d))
    t_eager, _ = _time(lambda: rope_write(qkv, qn, kn, cos, sin, K, V, col, eps, hq, hkv, d))
    t_fi, how_fi = _time(fi)
    row = {"what": "q/k norm + rope + cache write", "rows": rows, "kvagents_us": t_ours * 1e3,
           "kvagents_timing": how_ours, "torch_eager_us": t_eager * 1e3, "flashinfer_us": t_fi * 1e3,
           "flashinfer_timing": how_fi, "flashinfer_max_abs_diff_vs_torch": diff}
    print(f"| norm+rope+write | B={rows} | {row['kvagents_us']:.1f} ({how_ours}) | {row['flashinfer_us']:.1f} "
          f"({how_fi}); torch ops {row['torch_eager_us']:.1f} | {t_fi / t_ours:.2f} | diff {diff:.1e} |", flush=True)
    return [row]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="rows of the running batch (default 32)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="KV columns per row")
    ap.add_argument("--only", choices=["attention", "sampling", "rope"], nargs="+", default=None)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("flashinfer_bench needs a CUDA device", file=sys.stderr)
        return 2
    import flashinfer

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  flashinfer {flashinfer.__version__}  "
          f"{time.strftime('%Y-%m-%d')}")
    print("| kernel | shape | kvagents µs | flashinfer µs | flashinfer / kvagents | check |")
    print("|---|---|---|---|---|---|")
    rows: list[dict] = []
    only = set(a.only or ["attention", "sampling", "rope"])
    for name, fn in (("rope", lambda: bench_rope(a.rows)), ("sampling", lambda: bench_sampling(a.rows)),
                     ("attention", lambda: bench_attention(a.rows, a.lengths))):
        if name not in only:
            continue
        t = time.perf_counter()
        try:
            rows += fn()
        except Exception as exc:
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:300]} |", flush=True)
        print(f"  ({name}: {time.perf_counter() - t:.0f} s including compilation)", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
