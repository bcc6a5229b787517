"""GPU decode speed in one run: HF generate (eager, static+compile), kvagents eager, the fast path with and without
in-loop components; the copy-bandwidth limit; a profile of the fast step; greedy equality with HF generate.

Model: a random-weight Qwen3-8B-shaped model in bf16 (built from a config, weights initialised on the GPU; decode
cost does not depend on the weights' values), and optionally ``--model`` (a registry name, folder or .gguf file).

Cases: ``B=1`` (one prompt, greedy), ``1x8`` (one prompt, n = 8, T = 0.7, top-p 0.95), ``32 prompts`` (greedy,
prompt lengths from 64 to the prompt length, left-padded). All methods generate exactly ``--new-tokens`` per
sequence (EOS ignored). tok/s = generated tokens / wall time of the whole call (prefill included); ms/step = wall
/ new tokens; peak = ``torch.cuda.max_memory_allocated`` during the call. Warm-up = the first call's wall time
(compilation and graph capture included). Components (e): layer- and token-axis KV-CoE, probability scores, and a
classifier-like pooled-KV feature component (per-layer mean of the generated K/V, the KV probe's input).

    python bench/gpu_decode.py --mem-tokens 0                   # 8B shape (about 6 min on the H100)
    python bench/gpu_decode.py --skip-8b --model /tmp/m/model.gguf   # the real model, its 20-prompt equality
                                                                # and the 4k-token memory row (about 5 min)

Both together exceed one 10-minute device call: run them as two calls.

Writes ``$OUT/gpu_decode.md`` (markdown for bench/RESULTS.md) and ``$OUT/gpu_decode.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvagents import KVEmbedding, KVModel, SamplingParams  # noqa: E402
from kvagents.signals.probe import probe_pooling  # noqa: E402
from kvagents.signals.scoring import LayerCoE, ProbabilityScores, TokenCoE  # noqa: E402

QUESTIONS = [
    "What is 17 * 23?", "Write a Python function that reverses a string.", "Explain what a hash map is.",
    "Name three prime numbers greater than 50.", "What does HTTP stand for?", "Sort [5, 2, 9, 1] in Python.",
    "What is the capital of Australia?", "Write a haiku about compilers.", "How do I read a file line by line in C?",
    "What is the derivative of x^3?", "Give an example of a SQL JOIN.", "What is a closure in JavaScript?",
    "Convert 100 Fahrenheit to Celsius.", "What is big-O of binary search?", "Write a bash loop from 1 to 5.",
    "What is the difference between a list and a tuple?", "Explain recursion in one sentence.",
    "What is 2 to the power of 10?", "Write a regex that matches an email address.", "What is a mutex?",
]


class NoTokenizer:
    pad_token_id = 0
    eos_token_id = 151645
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


DEV = "cuda"


def qwen3_8b_random(dtype=torch.bfloat16, tiny=False):
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128)
    if tiny:  # CPU smoke test of this script
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    cfg = Qwen3Config(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, eos_token_id=151645, pad_token_id=0, **shape)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def bench_prompts() -> tuple[list[int], list[list[int]]]:
    """The dev benches' inputs (warmup.py, fast_variants.py, component_cost.py): one 128-token prompt, and 32
    prompts of 64..128 tokens (random ids, fixed seeds)."""
    prompt = torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    lens = torch.randint(64, 129, (32,), generator=torch.Generator().manual_seed(1))
    prompts32 = [torch.randint(1000, 100000, (int(k),), generator=torch.Generator().manual_seed(i)).tolist()
                 for i, k in enumerate(lens)]
    return prompt, prompts32


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes():
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def copy_bandwidth(gb: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20 copies."""
    n = int(gb * 1e9 / 2)
    a = torch.empty(n, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(20):
        sync()
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        ts.append(time.perf_counter() - t0)
    del a, b
    empty_cache()
    return 2 * n * 2 / statistics.median(ts)


def timed(fn, repeats: int):
    """(first call s, median of ``repeats`` later calls s, peak bytes of the last call, last output)."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        reset_peak()
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts) if ts else first, peak_bytes(), out


def components(n_layers: int):
    return [LayerCoE(), TokenCoE(), ProbabilityScores(), KVEmbedding(probe_pooling(n_layers), name="features")]


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def run_model(label, llm, prompts, args, report, do_hf_compile: bool):
    """All methods x cases for one model; appends rows to ``report``."""
    from transformers import GenerationConfig

    model = llm.model
    N, NE = args.new_tokens, args.eager_tokens
    pad = 0
    n_layers = model.config.num_hidden_layers
    cases = [("B=1", prompts[:1], 1, True), ("1x8", prompts[:1], 8, False), ("32 prompts", prompts[:32], 1, True)]
    cases = [c for c in cases if c[0] in args.cases]
    rows = []

    def hf_inputs(ps):
        T = max(len(p) for p in ps)
        ids = torch.full((len(ps), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(ps):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        return ids.to(DEV), mask.to(DEV)

    def hf_fn(ps, n, greedy, new, static):
        ids, mask = hf_inputs(ps)
        kw = dict(max_new_tokens=new, eos_token_id=[], pad_token_id=pad)
        if greedy:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=0.7, top_p=0.95, top_k=0, num_return_sequences=n)
        if static:
            kw.update(cache_implementation="static")
        gc = GenerationConfig(**kw)
        return lambda: model.generate(ids, attention_mask=mask, generation_config=gc)

    def kv_fn(ps, n, greedy, new, fast, comps):
        p = SamplingParams(max_new_tokens=new, temperature=0 if greedy else 0.7, top_p=1.0 if greedy else 0.95,
                           n=n, seed=0, ignore_eos=True)
        return lambda: llm.generate(ps, p, components=comps() if comps else (), fast=fast)

    for case, ps, n, greedy in cases:
        B = len(ps) * n
        methods = [("(a) HF generate eager", hf_fn(ps, n, greedy, NE, False), NE, 1)]
        if do_hf_compile and (case == "B=1" or args.hf_compile_all):
            methods.append(("(b) HF generate static+compile", hf_fn(ps, n, greedy, N, True), N, 2))
        methods += [
            ("(c) kvagents eager", kv_fn(ps, n, greedy, NE, False, None), NE, 1),
            ("(d) fast path", kv_fn(ps, n, greedy, N, True, None), N, args.repeats),
            ("(e) fast path + components", kv_fn(ps, n, greedy, N, True, lambda: components(n_layers)), N,
             args.repeats),
        ]
        methods = [m for m in methods if m[0][1] in args.methods]
        for name, fn, new, reps in methods:
            try:
                first, med, peak, _ = timed(fn, reps)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{label} {case} {name}: FAILED {exc!r}", flush=True)
                rows.append(dict(model=label, case=case, method=name, error=repr(exc)[:200]))
                continue
            r = dict(model=label, case=case, method=name, batch=B, new_tokens=new, first_s=first, call_s=med,
                     tok_s=B * new / med, ms_step=1000 * med / new, peak_gb=peak / 1e9)
            rows.append(r)
            print(f"{label:10s} {case:10s} {name:32s} {r['tok_s']:9.1f} tok/s {r['ms_step']:8.2f} ms/step "
                  f"peak {r['peak_gb']:6.2f} GB  first call {first:6.1f} s", flush=True)
        empty_cache()
    report["rows"] += rows


def comp_overhead(llm, prompts, args, n_layers, report, label):
    """Components' cost: alternating timed calls with and without them (same shapes, graphs warm)."""
    out = {}
    for case, ps, n, greedy in [("B=1", prompts[:1], 1, True), ("1x8", prompts[:1], 8, False),
                                ("32 prompts", prompts[:32], 1, True)]:
        p = SamplingParams(max_new_tokens=args.new_tokens, temperature=0 if greedy else 0.7,
                           top_p=1.0 if greedy else 0.95, n=n, seed=0, ignore_eos=True)
        off, on = [], []
        for _ in range(args.repeats):
            for comps, acc in ((False, off), (True, on)):
                sync()
                t0 = time.perf_counter()
                llm.generate(ps, p, components=components(n_layers) if comps else (), fast=True)
                sync()
                acc.append(time.perf_counter() - t0)
        o, c = statistics.median(off), statistics.median(on)
        out[case] = dict(off_ms=1000 * o / args.new_tokens, on_ms=1000 * c / args.new_tokens, overhead=c / o - 1)
        print(f"{label} components overhead {case}: {100 * (c / o - 1):+.2f} % "
              f"({1000 * o / args.new_tokens:.3f} -> {1000 * c / args.new_tokens:.3f} ms/step)", flush=True)
    report["overhead"][label] = out


def profile_fast(llm, prompt, args, n_layers, report, label, n=1, comps=True):
    """torch.profiler over one fast-path call with components (B=1 greedy, or one prompt x ``n`` sampled with
    T=0.7, top-p 0.95; ``prompt`` may also be a list of prompts, greedy): device time by kernel class per step,
    and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    steps = 64
    if n == 1:
        p = SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)
    else:
        p = SamplingParams(max_new_tokens=steps, temperature=0.7, top_p=0.95, n=n, seed=0, ignore_eos=True)
    ps = prompt if isinstance(prompt[0], list) else [prompt]
    comp = (lambda: components(n_layers)) if comps else (lambda: ())  # noqa: E731
    llm.generate(ps, p, components=comp(), fast=True)  # warm (same shapes)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(ps, p, components=comp(), fast=True)
        sync()
        wall = time.perf_counter() - t0
    classes: dict[str, float] = {}
    top = []
    from torch.autograd import DeviceType

    for ev in prof.key_averages():
        if ev.device_type != DeviceType.CUDA:
            continue
        dt_us = getattr(ev, "self_device_time_total", None)
        if dt_us is None:
            dt_us = getattr(ev, "self_cuda_time_total", 0)
        if not dt_us:
            continue
        name = ev.key
        low = name.lower()
        if any(s in low for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "sm90")):
            cls = "matmul (cuBLAS)"
        elif any(s in low for s in ("fmha", "flash", "attention", "efficient")):
            cls = "attention"
        elif low.startswith("triton"):
            cls = "fused (inductor/Triton)"
        elif "memcpy" in low or "memset" in low:
            cls = "copies"
        else:
            cls = "other ATen kernels (sampling, components, glue)"
        classes[cls] = classes.get(cls, 0.0) + dt_us
        top.append((dt_us, name))
    top.sort(reverse=True)
    per_step = {k: v / 1000 / steps for k, v in classes.items()}
    report["profile"][label] = dict(wall_ms_step=1000 * wall / steps, kernel_ms_step=per_step,
                                    top=[(round(t / 1000 / steps, 4), n[:90]) for t, n in top[:15]])
    print(f"{label} profile: wall {1000 * wall / steps:.3f} ms/step; device time per step by class:")
    for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"   {k:45s} {v:8.3f} ms")
    for t, n in top[:15]:
        print(f"   {t / 1000 / steps:8.4f} ms  {n[:100]}")


def equality(llm, tok, args, report, label):
    """Greedy fast path vs HF generate (eager, DynamicCache) on 20 chat prompts; first divergence with HF's
    top-2 logit margin there (a bf16 near-tie if tiny)."""
    from transformers import GenerationConfig

    model = llm.model
    new = args.eq_tokens
    res, all_ids, all_hf = [], [], []
    for q in QUESTIONS:
        enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        if hasattr(enc, "keys"):
            enc = enc["input_ids"]
        ids = [int(x) for x in enc]
        all_ids.append(ids)
        fast = llm.generate([ids], SamplingParams(max_new_tokens=new, temperature=0), fast=True).flat[0].token_ids
        gc = GenerationConfig(max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        out = model.generate(torch.tensor([ids], device=DEV), generation_config=gc)
        hf = out.sequences[0, len(ids):].tolist()
        eos = llm.fast_engine.eos_token_ids
        cut = next((k + 1 for k, t in enumerate(hf) if t in eos), len(hf))
        hf = hf[:cut]
        all_hf.append(hf)
        if fast == hf:
            res.append(dict(prompt=q, equal=True, tokens=len(hf)))
            continue
        k = next((i for i, (a, b) in enumerate(zip(fast, hf)) if a != b), min(len(fast), len(hf)))
        margin = None
        if k < len(out.scores):
            top2 = out.scores[k][0].float().topk(2).values
            margin = float(top2[0] - top2[1])
        res.append(dict(prompt=q, equal=False, tokens=len(hf), first_divergence=k, hf_top2_margin=margin,
                        fast_tok=fast[k:k + 3], hf_tok=hf[k:k + 3]))
    n_eq = sum(r["equal"] for r in res)
    print(f"{label} greedy equality fast vs HF generate: {n_eq}/{len(res)} prompts identical "
          f"({new} new tokens max)")
    for r in res:
        if not r["equal"]:
            print(f"   differs at token {r['first_divergence']} (HF top-2 logit margin {r['hf_top2_margin']}): "
                  f"{r['prompt'][:40]!r}")
    report["equality"][label] = res
    # the same prompts as ONE left-padded batch on the fast path (mixed lengths; rows finish at their own EOS and
    # then cost no attention), each row against HF's one-prompt output
    batch = llm.generate(all_ids, SamplingParams(max_new_tokens=new, temperature=0), fast=True).flat
    same = [b.token_ids == h for b, h in zip(batch, all_hf)]
    print(f"{label} greedy equality, the {len(all_ids)} prompts as one fast batch vs HF one prompt at a time: "
          f"{sum(same)}/{len(same)} identical")
    report["equality_batch"] = report.get("equality_batch", {})
    report["equality_batch"][label] = same


def memory_long(llm, prompt, args, n_layers, report, label, hidden, layers_p1):
    """Peak memory of the fast path with components at ``--mem-tokens`` generated tokens (B=1), next to what
    HF generate with output_hidden_states keeps (measured at 256 tokens, and its linear size at mem-tokens)."""
    N = args.mem_tokens
    p = SamplingParams(max_new_tokens=N, temperature=0, ignore_eos=True)
    empty_cache()
    reset_peak()
    base = torch.cuda.memory_allocated() if DEV == "cuda" else 0
    llm.generate([prompt], p, components=components(n_layers), fast=True)
    sync()
    fast_peak = peak_bytes() - base
    hs_bytes = N * layers_p1 * hidden * 2  # bf16 hidden states of every generated token and layer
    report["memory"][label] = dict(tokens=N, fast_peak_over_weights_gb=fast_peak / 1e9,
                                   hf_hidden_states_gb_at_tokens=hs_bytes / 1e9)
    print(f"{label} memory at {N} generated tokens: fast path + components peak {fast_peak / 1e9:.3f} GB over the "
          f"weights; HF output_hidden_states would hold {hs_bytes / 1e9:.3f} GB of hidden states alone")


def markdown(report) -> str:
    d = report["meta"]
    lines = [f"### GPU decode: fast path vs HF generate ({d['date']}, {d['device']}, torch {d['torch']}, "
             f"transformers {d['transformers']})\n",
             f"Written by `bench/gpu_decode.py`. Copy bandwidth {d['bw_tbs']:.2f} TB/s (read + write). "
             f"tok/s = generated tokens / wall time of the whole call (prefill of a {d['prompt_tokens']}-token "
             "prompt included); ms/step = call time / new tokens; first call = warm-up (compile + capture).\n"]
    for label, lim in d["limits"].items():
        lines.append(f"- {label}: {lim['params_b']:.2f} B params, {lim['weight_gb']:.2f} GB of weights -> "
                     f"bandwidth limit {lim['ms']:.2f} ms/step = {lim['tok_s']:.0f} tok/s at B=1\n")
    lines.append("\n| model | case | method | new tokens | tok/s | ms/step | peak GB | first call s |\n"
                 "|---|---|---|---|---|---|---|---|\n")
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['case']} | {r['method']} | failed: {r['error']} | | | | |\n")
            continue
        lines.append(f"| {r['model']} | {r['case']} | {r['method']} | {r['new_tokens']} | {r['tok_s']:.1f} | "
                     f"{r['ms_step']:.2f} | {r['peak_gb']:.2f} | {r['first_s']:.1f} |\n")
    if report["overhead"]:
        lines.append("\nComponents' cost on the fast path (alternating calls, median):\n\n"
                     "| model | case | off ms/step | on ms/step | overhead |\n|---|---|---|---|---|\n")
        for label, cs in report["overhead"].items():
            for case, o in cs.items():
                lines.append(f"| {label} | {case} | {o['off_ms']:.3f} | {o['on_ms']:.3f} | "
                             f"{100 * o['overhead']:+.2f} % |\n")
    for label, pr in report["profile"].items():
        lines.append(f"\nProfile, {label} (B=1 unless 1x8), fast path + components, under the profiler: wall "
                     f"{pr['wall_ms_step']:.3f} ms/step; "
                     "device time per step: " + ", ".join(
                         f"{k} {v:.3f} ms" for k, v in sorted(pr["kernel_ms_step"].items(), key=lambda kv: -kv[1]))
                     + "\n")
    for label, res in report["equality"].items():
        n_eq = sum(r["equal"] for r in res)
        lines.append(f"\nGreedy equality, {label}: {n_eq}/{len(res)} prompts identical to HF generate.")
        for r in res:
            if not r["equal"]:
                lines.append(f" First divergence at token {r['first_divergence']} of {r['prompt'][:30]!r}: HF "
                             f"top-2 logit margin {r['hf_top2_margin']}.")
        same = report.get("equality_batch", {}).get(label)
        if same is not None:
            lines.append(f" The same prompts as one fast-path batch (left-padded, range attention): {sum(same)}/"
                         f"{len(same)} identical to HF's one-prompt outputs.")
        lines.append("\n")
    for label, m in report["memory"].items():
        lines.append(f"\nMemory, {label}, {m['tokens']} generated tokens: fast path + components peak "
                     f"{m['fast_peak_over_weights_gb']:.3f} GB over the weights; HF `output_hidden_states` holds "
                     f"{m['hf_hidden_states_gb_at_tokens']:.3f} GB of hidden states alone.\n")
    return "".join(lines)


def limit(model, bw):
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    ms = 1000 * nbytes / bw
    return dict(params_b=params / 1e9, weight_gb=nbytes / 1e9, ms=ms, tok_s=1000 / ms)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a real model too (registry name, folder or .gguf)")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--eager-tokens", type=int, default=32, help="new tokens for the (slow) eager methods")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eq-tokens", type=int, default=64)
    ap.add_argument("--mem-tokens", type=int, default=4096, help="0 skips the long-generation memory run")
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--hf-compile-all", action="store_true", help="HF static+compile for every case, not B=1 only")
    ap.add_argument("--methods", default="abcde", help="subset of the methods a-e to run")
    ap.add_argument("--cases", default="B=1,1x8,32 prompts", help="comma-separated subset of the cases")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny Qwen3 config instead of 8B")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",")]
    import warnings

    warnings.filterwarnings("ignore", message=".*[Oo]nline softmax.*")  # Inductor's note on split reductions
    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bw = copy_bandwidth(2.0 if DEV == "cuda" else 0.1)
    dname = torch.cuda.get_device_name() if DEV == "cuda" else "CPU"
    report = dict(meta=dict(date=dt.date.today().isoformat(), device=dname,
                            torch=torch.__version__, transformers=transformers.__version__, bw_tbs=bw / 1e12,
                            prompt_tokens=args.prompt_tokens, limits={}),
                  rows=[], overhead={}, profile={}, equality={}, memory={})
    print(f"{report['meta']['device']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    g = torch.Generator().manual_seed(0)
    T = args.prompt_tokens

    def prompts_for(vocab):
        lens = [T] + torch.randint(64, T + 1, (31,), generator=g).tolist()
        return [torch.randint(1000, min(vocab, 100000), (n,), generator=g).tolist() for n in lens]

    def save():
        (out_dir / "gpu_decode.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / "gpu_decode.md").write_text(markdown(report))

    if not args.skip_8b:
        t0 = time.perf_counter()
        model = qwen3_8b_random(tiny=args.tiny)
        sync()
        print(f"built the random Qwen3-8B shape in {time.perf_counter() - t0:.1f} s", flush=True)
        report["meta"]["limits"]["qwen3-8b shape"] = lim = limit(model, bw)
        print(f"limit: {lim}", flush=True)
        ps = prompts_for(model.config.vocab_size)
        llm = KVModel(model, NoTokenizer())
        run_model("qwen3-8b shape", llm, ps, args, report, not args.no_hf_compile and DEV == "cuda")
        save()
        if not args.no_overhead:
            comp_overhead(llm, ps, args, model.config.num_hidden_layers, report, "qwen3-8b shape")
        if not args.no_profile and DEV == "cuda":
            profile_fast(llm, ps[0], args, model.config.num_hidden_layers, report, "qwen3-8b shape")
            profile_fast(llm, ps[0], args, model.config.num_hidden_layers, report, "qwen3-8b shape, 1x8", n=8)
        save()
        del llm, model
        empty_cache()
        torch._dynamo.reset()
    if args.model:
        t0 = time.perf_counter()
        real = KVModel.from_pretrained(args.model, dtype="bfloat16", device=DEV, progress=False).load()
        model, tok = real.model, real.tokenizer
        label = Path(args.model).name if Path(args.model).exists() else args.model
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
        report["meta"]["limits"][label] = limit(model, bw)
        ps = prompts_for(model.config.vocab_size)
        llm = real
        run_model(label, llm, ps, args, report, not args.no_hf_compile and DEV == "cuda")
        save()
        if not args.no_overhead:
            comp_overhead(llm, ps, args, model.config.num_hidden_layers, report, label)
        if not args.no_profile and DEV == "cuda":
            profile_fast(llm, ps[0], args, model.config.num_hidden_layers, report, label)
        equality(llm, tok, args, report, label)
        save()
        if args.mem_tokens:
            memory_long(llm, ps[0], args, model.config.num_hidden_layers, report, label, model.config.hidden_size,
                        model.config.num_hidden_layers + 1)
    report["meta"]["total_s"] = time.perf_counter() - t_start
    save()
    print()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
