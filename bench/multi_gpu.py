"""Multi-GPU check and speed: one GPU vs accelerate device_map vs tensor parallel (torchrun), and a sharded index.

On a machine with 2 GPUs (the lent ``nvidia-h200-x2``), in one call: ``bash bench/run_multi_gpu.sh`` which runs

    python bench/multi_gpu.py prepare --out /tmp/q14                  # random Qwen3-14B-shaped bf16 checkpoint
    python bench/multi_gpu.py run --model /tmp/q14 --mode single      # cuda:0 only
    python bench/multi_gpu.py run --model /tmp/q14 --mode device_map  # layers split over both GPUs
    torchrun --nproc-per-node 2 bench/multi_gpu.py run --model /tmp/q14 --mode tp   # heads split over 2 ranks
    python bench/multi_gpu.py index                                   # KVIndex on cuda:0 vs over cuda:0 + cuda:1
    python bench/multi_gpu.py report                                  # markdown for bench/RESULTS.md

Each ``run`` greedily decodes the same prompts (token ids; a random model has no tokenizer) with a KVEmbedding
component, and records tokens, KV embeddings (in the loop and from ``embed``), tokens/s, and the top-2 logit
margin of every greedy step (to tell bf16 near-ties from real divergences). ``--tiny`` builds a tiny model
instead, for a CPU dry run (``--device cpu``; tp under ``torchrun`` then uses gloo).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc., as the lent machines require).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v  # never multicast on shared hosts

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_14B = dict(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                 num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)


class IdTokenizer:
    """Stands in for a tokenizer: prompts are token ids, text is the ids joined."""

    pad_token_id = 0
    eos_token_id = None
    bos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def prepare(out: str, tiny: bool, device: str, init_range: float) -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**(TINY if tiny else QWEN3_14B), initializer_range=init_range, eos_token_id=None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"prepared {n / 1e9:.2f} B params in {time.perf_counter() - t0:.0f} s -> {out}")


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, min(vocab, 30000), (length + 7 * i,), generator=g).tolist() for i in range(n)]


class Margins:
    """Records the top-2 logit gap of every step (a Component; host work once at the end)."""

    name = "margins"

    def __init__(self):
        self.gaps = []

    def on_prefill(self, view):
        return None

    def on_step(self, view):
        top = view.logits.topk(2, dim=-1).values
        self.gaps.append(top[:, 0] - top[:, 1])
        return None

    def on_finish(self, view):
        g = torch.stack(self.gaps, 1).float().cpu()
        return [g[i].tolist() for i in range(g.shape[0])]


def run(model_dir: str, mode: str, out: str, device: str, n_prompts: int, new_tokens: int, prompt_len: int) -> None:
    from kvagents import KVEmbedding, KVModel, KVPooling, SamplingParams

    rank = int(os.environ.get("RANK", "0"))
    kw = {}
    if mode == "device_map":
        ngpu = torch.cuda.device_count()
        kw["device_map"] = "auto" if ngpu else "cpu"
        if ngpu >= 2:  # balance the layers over the GPUs (auto would fill the first 141 GB GPU alone)
            kw["device_map"] = "balanced"
    elif mode == "tp":
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kw["tp_plan"] = "auto"
    t0 = time.perf_counter()
    llm = KVModel(source=model_dir, dtype="bfloat16" if device.startswith("cuda") else "float32",
                  device=device if mode == "single" else "auto", **kw)
    llm._tokenizer = IdTokenizer()
    llm.load = _loader(llm)
    llm.load()
    load_s = time.perf_counter() - t0
    cfg = llm.model.config
    ps = prompts(n_prompts, prompt_len, cfg.vocab_size)
    texts = [" ".join(map(str, p)) for p in ps]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    pooling = KVPooling(layers=4, heads="flatten", segment="all")
    llm.generate(texts[:1], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    rows = {}
    for batch in (1, n_prompts):
        comps = [KVEmbedding(pooling), Margins()]
        _sync()
        t0 = time.perf_counter()
        res = llm.generate(texts[:batch], params, components=comps)
        _sync()
        dt = time.perf_counter() - t0
        rows[batch] = {"seconds": dt, "tokens_per_s": batch * new_tokens / dt,
                       "tokens": [g[0].token_ids for g in res.samples],
                       "emb": [g[0].outputs["kv_embedding"].float().tolist() for g in res.samples],
                       "margins": [g[0].outputs["margins"] for g in res.samples]}
    emb = llm.embed(texts, pooling.model_copy(update={"segment": "prompt"})).float().tolist()
    devices = sorted({str(p.device) for p in llm.model.parameters()})
    result = {"mode": mode, "devices": devices, "load_s": load_s, "rows": rows, "embed": emb,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "peak_gb": [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
        print(f"{mode}: load {load_s:.0f} s, B=1 {rows[1]['tokens_per_s']:.1f} tok/s, B={n_prompts} "
              f"{rows[n_prompts]['tokens_per_s']:.1f} tok/s, devices {devices}")


def _loader(llm):
    """KVModel.load without AutoTokenizer (the random checkpoint has none)."""
    original = type(llm).load

    def load():
        import transformers

        real = transformers.AutoTokenizer.from_pretrained
        transformers.AutoTokenizer.from_pretrained = lambda *a, **k: llm._tokenizer
        try:
            return original(llm)
        finally:
            transformers.AutoTokenizer.from_pretrained = real

    return load


def _sync():
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def index_check(out: str, n: int, dim: int) -> None:
    import numpy as np

    from kvagents import KVIndex

    ndev = torch.cuda.device_count()
    devs = [f"cuda:{i}" for i in range(ndev)] if ndev else ["cpu", "cpu"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    q = rng.standard_normal((1000, dim), dtype=np.float32)
    ids = [str(i) for i in range(n)]
    res = {}
    for name, dev in (("one", devs[0]), ("sharded", devs)):
        idx = KVIndex(dim, "l2", device=dev, backend="torch")
        idx.add(x, ids=ids)
        idx.delete(ids[::10])
        idx.search_batch(q[:8], 10)
        _sync()
        t0 = time.perf_counter()
        hits = idx.search_batch(q, 10)
        _sync()
        res[name] = {"qps": len(q) / (time.perf_counter() - t0), "ids": [[h.id for h in r] for r in hits],
                     "devices": dev if isinstance(dev, list) else [dev]}
    same = res["one"]["ids"] == res["sharded"]["ids"]
    Path(out).write_text(json.dumps({"same": same, "n": n, "dim": dim,
                                     **{k: {"qps": v["qps"], "devices": v["devices"]} for k, v in res.items()}}))
    print(f"index: sharded == one device: {same}; qps one {res['one']['qps']:.0f}, sharded {res['sharded']['qps']:.0f}")


def report(folder: str) -> None:
    f = Path(folder)
    runs = {m: json.loads((f / f"{m}.json").read_text()) for m in ("single", "device_map", "tp")
            if (f / f"{m}.json").exists()}
    base = runs["single"]
    lines = [f"### Multi-GPU: {base['gpu']}, random Qwen3-14B-shaped bf16 — "
             f"{time.strftime('%Y-%m-%d')}\n",
             "| mode | devices | load s | B=1 tok/s | B=N tok/s | greedy tokens equal to 1 GPU | first divergence "
             "(step, top-2 margin there) | max rel. diff of KV embedding (loop / embed) |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for mode, r in runs.items():
        nb = max(int(k) for k in r["rows"])
        eq, div = [], []
        for b in ("1", str(nb)):
            for i, (t1, t2) in enumerate(zip(base["rows"][b]["tokens"], r["rows"][b]["tokens"])):
                eq.append(t1 == t2)
                if t1 != t2:
                    s = next(j for j, (a, c) in enumerate(zip(t1, t2)) if a != c)
                    div.append(f"{s} ({base['rows'][b]['margins'][i][s]:.3f})")
        e1 = torch.tensor(base["rows"][str(nb)]["emb"])
        e2 = torch.tensor(r["rows"][str(nb)]["emb"])
        d_loop = float(((e1 - e2).norm(dim=-1) / e1.norm(dim=-1)).max())
        d_emb = float(((torch.tensor(base["embed"]) - torch.tensor(r["embed"])).norm(dim=-1)
                       / torch.tensor(base["embed"]).norm(dim=-1)).max())
        lines.append(f"| {mode} | {', '.join(r['devices'])} | {r['load_s']:.0f} | {r['rows']['1']['tokens_per_s']:.1f} "
                     f"| {r['rows'][str(nb)]['tokens_per_s']:.1f} (N={nb}) | {sum(eq)}/{len(eq)} | "
                     f"{', '.join(div[:4]) or '-'} | {d_loop:.2e} / {d_emb:.2e} |")
    if (f / "index.json").exists():
        ix = json.loads((f / "index.json").read_text())
        lines.append(f"\nKVIndex {ix['n']} x {ix['dim']}, 10% deleted, 1000 queries: sharded over "
                     f"{ix['sharded']['devices']} equals one device: **{ix['same']}**; "
                     f"{ix['one']['qps']:.0f} vs {ix['sharded']['qps']:.0f} queries/s.")
    text = "\n".join(lines) + "\n"
    (f / "report.md").write_text(text)
    print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["prepare", "run", "index", "report"])
    ap.add_argument("--model", default="/tmp/q14")
    ap.add_argument("--out", default=None)
    ap.add_argument("--mode", default="single", choices=["single", "device_map", "tp"])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--init-range", type=float, default=0.02)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--index-n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--folder", default="out/multi_gpu")
    a = ap.parse_args(argv)
    Path(a.folder).mkdir(parents=True, exist_ok=True)
    if a.what == "prepare":
        prepare(a.out or a.model, a.tiny, a.device, a.init_range)
    elif a.what == "run":
        run(a.model, a.mode, a.out or str(Path(a.folder) / f"{a.mode}.json"), a.device, a.prompts, a.new_tokens,
            a.prompt_len)
    elif a.what == "index":
        index_check(a.out or str(Path(a.folder) / "index.json"), a.index_n, a.dim)
    else:
        report(a.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
