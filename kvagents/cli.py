"""``kvagents`` command line: ``demo``, ``embed``, ``models``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def _read_texts(path: str, field: str | None) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: input file {path!r} does not exist")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        rows = [json.loads(line) for line in lines]
        if field is None:
            field = next((k for k in ("text", "question", "problem", "en") if k in rows[0]), None)
            if field is None:
                raise SystemExit(f"error: {path!r}: no text field found; pass --field (keys: {sorted(rows[0])})")
        return [str(r[field]) for r in rows]
    return lines


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(model=args.model, n=args.n, max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
             seed=args.seed, temperature=args.temperature)
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    from . import KVModel, KVPooling

    texts = _read_texts(args.input, args.field)
    if args.limit:
        texts = texts[: args.limit]
    layers = [int(x) for x in args.layers.split(",")] if "," in args.layers or args.layers.startswith("-") else int(
        args.layers
    )
    pooling = KVPooling(layers=layers, part=args.part, positions=args.positions, heads=args.heads,
                        layer_agg=args.layer_agg, normalize=not args.no_normalize)
    llm = KVModel.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    vecs = llm.embed(texts, pooling, batch_size=args.batch_size, show_progress_bar=True).numpy()
    np.save(args.output, vecs)
    print(f"wrote {vecs.shape[0]} x {vecs.shape[1:]} float32 to {args.output}")
    return 0


def cmd_models(args) -> int:
    from .registry import REGISTRY, cache_dir, fetch_model

    if args.action == "list":
        for name, spec in REGISTRY.items():
            ready = (cache_dir() / "models" / name).exists()
            print(f"{name:22s} {'cached' if ready else 'not fetched':12s} {spec.description}")
        return 0
    if not args.name:
        raise SystemExit("error: `kvagents models fetch NAME` needs a NAME; see `kvagents models list`")
    path = fetch_model(args.name, force=args.force)
    print(path)
    return 0


def _rows(spec: str) -> tuple[int, int]:
    a, _, b = spec.partition(":")
    try:
        return int(a or 0), int(b)
    except ValueError:
        raise SystemExit(f"error: rows {spec!r} must look like START:END (e.g. 0:500)") from None


def cmd_eval_selection(args) -> int:
    from .eval_selection import combine, run, run_shard

    if args.combine:
        combine([Path(p) for p in args.combine], [Path(p) for p in args.train_shards], Path(args.out),
                args.num_attention_layers)
        return 0
    if args.shard:
        run_shard(args.data, args.model, args.n, _rows(args.rows), Path(args.out), greedy=not args.no_greedy,
                  hidden=not args.no_hidden_coe, features=args.features, device=args.device, dtype=args.dtype,
                  temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                  batch_prompts=args.batch_prompts, seed=args.seed, early_stop_only=args.early_stop_only)
        return 0

    rows = _rows(args.rows) if args.rows else (0, args.limit)
    run(args.data, args.model, args.n, rows, _rows(args.probe_train) if args.probe_train else None, Path(args.out),
        device=args.device, dtype=args.dtype, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, batch_prompts=args.batch_prompts, hidden=not args.no_hidden_coe,
        seed=args.seed)
    return 0


def cmd_eval_embeddings(args) -> int:
    from .eval_embeddings import run

    paths = {}
    for spec in args.model_path:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise SystemExit(f"error: --model-path {spec!r} must look like NAME=PATH (e.g. qwen2.5-coder-0.5b=/tmp/m/model.gguf)")
        paths[name] = path
    try:
        run(data_dir=args.data_dir, encoders=args.encoders, model_paths=paths, poolings=args.poolings,
            device=args.device, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length,
            limit=args.limit or None, cache_dir=args.cache_dir, out=args.out, encode_only=args.encode_only,
            cache_only=args.cache_only, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvagents", description="Use the KV cache an LLM builds anyway: KV embeddings, "
                                 "chain-of-embedding best-of-N, KV-classifier reasoning control.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="sample answers to built-in questions on the embedded model and show KV stats")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, hub id or path (default {DEFAULT_MODEL})")
    d.add_argument("--n", type=int, default=4, help="samples per question (default 4)")
    d.add_argument("--max-new-tokens", type=int, default=192)
    d.add_argument("--temperature", type=float, default=0.7)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA and on CPUs with bf16 instructions, else float32), float32, bfloat16")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("embed", help="texts (.txt lines or .jsonl) -> KV embeddings (.npy)")
    e.add_argument("input")
    e.add_argument("output")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--field", default=None, help="JSONL field holding the text (default: text/question/problem/en)")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--layers", default="4", help="last-n count (4) or comma list of indices (write --layers=-1,-2 for negatives)")
    e.add_argument("--part", default="kv", choices=["k", "v", "kv"])
    e.add_argument("--positions", default="mean", choices=["mean", "sum", "last", "first", "window"])
    e.add_argument("--heads", default="mean", choices=["mean", "flatten"])
    e.add_argument("--layer-agg", default="mean", choices=["mean", "sum", "flatten", "last", "stack"])
    e.add_argument("--no-normalize", action="store_true")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--dtype", default="auto")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_embed)

    ev = sub.add_parser("eval", help="evaluations (selection, embeddings)")
    evs = ev.add_subparsers(dest="what", required=True)
    s = evs.add_parser("selection", help="best-of-N selection and correctness prediction of every score")
    s.add_argument("--data", default="../shared/data/gsm8k.jsonl")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--limit", type=int, default=500, help="evaluate rows 0..limit-1 (or use --rows)")
    s.add_argument("--rows", default=None, help="START:END evaluation rows")
    s.add_argument("--probe-train", default=None, help="START:END rows to train the KV probe on (disjoint)")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--max-new-tokens", type=int, default=384)
    s.add_argument("--batch-prompts", type=int, default=32)
    s.add_argument("--no-hidden-coe", action="store_true", help="skip the hidden-state CoE baseline (extra forward)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default="out/selection")
    s.add_argument("--shard", action="store_true", help="only sample --rows into --out (records, features)")
    s.add_argument("--no-greedy", action="store_true", help="with --shard: skip the greedy pass")
    s.add_argument("--early-stop-only", action="store_true", help="with --shard: one pass with EarlyStopWeak")
    s.add_argument("--features", action="store_true", help="with --shard: save probe features")
    s.add_argument("--combine", nargs="*", default=None, help="eval shard folders to summarise")
    s.add_argument("--train-shards", nargs="*", default=[], help="shard folders with features to train the probe")
    s.add_argument("--num-attention-layers", type=int, default=24)
    s.set_defaults(func=cmd_eval_selection)

    from .eval_embeddings import ENCODERS, POOLINGS

    ee = evs.add_parser("embeddings", help="KV embeddings vs all-MiniLM-L6-v2: retrieval and classification")
    ee.add_argument("--data-dir", default="../shared/data", help="folder with gsm8k.jsonl and math500.jsonl")
    ee.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS),
                    help="encoders to evaluate (default: all)")
    ee.add_argument("--model-path", action="append", default=[], metavar="NAME=PATH",
                    help="load a KV model from a path, e.g. qwen2.5-coder-0.5b=/tmp/m/model.gguf (repeatable)")
    ee.add_argument("--poolings", nargs="+", default=None, choices=list(POOLINGS), help="KV pooling configs (default: all)")
    ee.add_argument("--limit", type=int, default=0, help="first N rows of each dataset (default: all)")
    ee.add_argument("--batch-size", type=int, default=32)
    ee.add_argument("--max-length", type=int, default=512, help="token limit per text for the KV encoders")
    ee.add_argument("--dtype", default="float32", help="KV model dtype (float32, bfloat16, auto)")
    ee.add_argument("--device", default="auto")
    ee.add_argument("--cache-dir", default="out/emb_cache", help="embedding cache (.npy + .json per model/field)")
    ee.add_argument("--out", default="out/eval_embeddings", help="results.md, results.json, embeddings.png")
    ee.add_argument("--encode-only", action="store_true", help="only fill the cache (e.g. on the GPU), no metrics")
    ee.add_argument("--cache-only", action="store_true", help="never compute: fail when an embedding is not cached")
    ee.add_argument("--seed", type=int, default=0, help="cross-validation split seed")
    ee.set_defaults(func=cmd_eval_embeddings)

    m = sub.add_parser("models", help="list or fetch the embedded models")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("name", nargs="?")
    m.add_argument("--force", action="store_true", help="fetch and convert again")
    m.set_defaults(func=cmd_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
