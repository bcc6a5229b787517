"""``kvagents`` command line: ``demo``, ``embed``, ``index``, ``eval``, ``train``, ``serve``, ``models``."""

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


def cmd_serve(args) -> int:
    try:
        from .serving.app import serve
    except ImportError as e:
        raise SystemExit(f"error: `kvagents serve` needs the serve extra ({e.name} is missing): "
                         "pip install 'kvagents[serve]'") from None
    if args.max_seq_len is not None and not args.fast:
        raise SystemExit("error: --max-seq-len bounds the fast scheduler's slots: pass it with --fast")
    from .model import KVModel

    llm = KVModel.from_pretrained(args.model, dtype=args.dtype, device=args.device).load()
    name = args.served_model_name or args.model
    fast = {"fast": True, "max_seq_len": args.max_seq_len} if args.fast else {}
    print(f"kvagents: serving {name!r} on http://{args.host}:{args.port}/v1 (max_rows={args.max_rows}, "
          f"max_queue={args.max_queue}{', fast scheduler' if args.fast else ''})", file=sys.stderr)
    serve(llm, host=args.host, port=args.port, log_level=args.log_level, served_model_name=name,
          max_rows=args.max_rows, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
          default_max_tokens=args.default_max_tokens, scores=not (args.no_scores or args.fast), **fast)
    return 0


def cmd_train_probe(args) -> int:
    from .evals.train_probe import TrainProbeConfig, format_report, train_probe

    cfg = TrainProbeConfig(**{k: getattr(args, k) for k in TrainProbeConfig.model_fields})
    report = train_probe(cfg)
    print(format_report(report))
    print(f"probe written to {cfg.out} (load it with KVProbe.load({cfg.out!r}, model))")
    return 0


def cmd_train_router(args) -> int:
    from .evals.train_router import TrainRouterConfig, format_report, train_router

    cfg = TrainRouterConfig(**{k: getattr(args, k) for k in TrainRouterConfig.model_fields})
    report = train_router(cfg)
    print(format_report(report))
    print(f"router written to {cfg.out} (load it with KVRouter.load({cfg.out!r}, model))")
    return 0


def _add_config_args(p: argparse.ArgumentParser, config_cls) -> None:
    """One option per field of a pydantic config (``--field-name``), typed, with the field's help and default."""
    import typing

    for name, field in config_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kw = {"help": field.description or COMMON_HELP.get(name, name.replace("_", " "))}
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) is list:
            kw.update(nargs="+", type=args[0] if args else str)
        elif ann in (int, float):
            kw["type"] = ann
        elif len(args) == 1 and args[0] in (int, float):
            kw["type"] = args[0]
        if field.is_required():
            kw["required"] = True
        else:
            default = field.get_default(call_default_factory=True)
            kw["default"] = default
            if default is not None:
                shown = " ".join(map(str, default)) if isinstance(default, list) else default
                kw["help"] += f" (default {shown})"
        p.add_argument(flag, **kw)


def cmd_embed(args) -> int:
    import numpy as np

    from .model import KVModel

    texts = _read_texts(args.input, args.field)
    if args.limit:
        texts = texts[: args.limit]
    pooling = _pooling_from_args(args)
    llm = KVModel.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    vecs = llm.embed(texts, pooling, batch_size=args.batch_size, show_progress_bar=True).numpy()
    np.save(args.output, vecs)
    print(f"wrote {vecs.shape[0]} x {vecs.shape[1:]} float32 to {args.output}")
    return 0


def _add_pooling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default="4", help="last-n count (4) or comma list of indices (write --layers=-1,-2 for negatives)")
    p.add_argument("--part", default="kv", choices=["k", "v", "kv"])
    p.add_argument("--positions", default="mean", choices=["mean", "sum", "last", "first", "window"])
    p.add_argument("--heads", default="mean", choices=["mean", "flatten"])
    p.add_argument("--layer-agg", default="mean", choices=["mean", "sum", "flatten", "last", "stack"])
    p.add_argument("--no-normalize", action="store_true")


def _pooling_from_args(args):
    from .signals.pooling import KVPooling

    spec = args.layers
    try:
        layers = [int(x) for x in spec.split(",")] if "," in spec or spec.startswith("-") else int(spec)
    except ValueError:
        raise SystemExit(f"error: --layers {spec!r} must be a count (4) or a comma list of layer indices") from None
    return KVPooling(layers=layers, part=args.part, positions=args.positions, heads=args.heads,
                     layer_agg=args.layer_agg, normalize=not args.no_normalize)


def _read_rows(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: input file {path!r} does not exist")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line) if p.suffix == ".jsonl" else {"text": line})
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n} is not valid JSON ({e})") from None
    if not rows:
        raise SystemExit(f"error: {path!r} holds no rows")
    return rows


INDEX_FILE = "index.kvx"


def cmd_index(args) -> int:
    from .retrieval.encoder import KVEncoder
    from .retrieval.index import KVIndex
    from .signals.pooling import KVPooling

    folder = Path(args.folder)
    if args.action == "build":
        rows = _read_rows(args.input)[: args.limit or None]
        field = args.field or next((k for k in ("text", "question", "problem", "en") if k in rows[0]), None)
        if field is None or any(field not in r for r in rows):
            raise SystemExit(f"error: rows need the text field {field!r}; pass --field (keys: {sorted(rows[0])})")
        if args.id_field and any(args.id_field not in r for r in rows):
            raise SystemExit(f"error: --id-field {args.id_field!r} is missing from some rows")
        texts = [str(r[field]) for r in rows]
        ids = [str(r[args.id_field]) for r in rows] if args.id_field else [str(i) for i in range(len(rows))]
        metadatas = [{k: v for k, v in r.items() if k != field} for r in rows]
        encoder = KVEncoder(args.model, _pooling_from_args(args), batch_size=args.batch_size,
                            max_length=args.max_length, dtype=args.dtype, device=args.device)
        vectors = encoder.encode_document(texts, show_progress_bar=True)
        index = KVIndex(vectors.shape[1], args.metric, factory=args.factory, encoder_identity=encoder.identity)
        if args.factory:
            index.train(vectors)
        index.add(vectors, ids=ids, texts=texts, metadatas=metadatas)
        path = index.save(folder / INDEX_FILE)
        print(f"indexed {len(index)} texts ({vectors.shape[1]}-d, {args.metric}, {args.factory or 'exact'}) -> {path}")
        return 0

    from .retrieval.index_file import read_header

    path = folder / INDEX_FILE if folder.is_dir() else folder
    if not path.exists():
        raise SystemExit(f"error: no index at {path}; build one with `kvagents index build INPUT {folder}`")
    identity = read_header(path).get("encoder_identity") or {}
    if identity.get("kind") != "kvagents":
        raise SystemExit(f"error: {path} was not built by a KV encoder ({identity}); search it from Python")
    model = args.model or identity["model"]
    encoder = KVEncoder(model, KVPooling(**identity["pooling"]), dtype=args.dtype, device=args.device)
    index = KVIndex.load(path, dim=identity.get("dim"))
    filt = None
    if args.filter:
        filt = {}
        for spec in args.filter:
            key, sep, value = spec.partition("=")
            if not sep:
                raise SystemExit(f"error: --filter {spec!r} must look like KEY=VALUE")
            try:
                filt[key] = json.loads(value)
            except json.JSONDecodeError:
                filt[key] = value
    query = encoder.encode_query([args.query])
    hits = index.mmr(query[0], k=args.k, fetch_k=max(4 * args.k, 20), filter=filt) if args.mmr else index.search(
        query[0], k=args.k, filter=filt)
    if args.json:
        print(json.dumps([{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in hits]))
        return 0
    print("| rank | score | id | text |\n|---:|---:|---|---|")
    for rank, h in enumerate(hits, 1):
        text = (h.text or "").replace("\n", " ").replace("|", "\\|")
        print(f"| {rank} | {h.score:.4f} | {h.id} | {text[:args.width]} |")
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
    from .evals.selection import combine, run, run_shard

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
    from .evals.embeddings import run

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


def cmd_eval_reasoning(args) -> int:
    from .evals import reasoning as er

    try:
        cfg = er.ReasoningEvalConfig(
            model=args.model, data_dir=args.data_dir, datasets=args.datasets, train_per_dataset=args.train_per_dataset,
            eval_per_dataset=args.eval_per_dataset, format=args.format, dtype=args.dtype, device=args.device,
            fast_tokens=args.fast_tokens, slow_tokens=args.slow_tokens, answer_tokens=args.answer_tokens,
            every=args.every, window=args.window, layers=args.layers, budgets=args.budgets,
            batch_prompts=args.batch_prompts, tolerance=args.tolerance, folds=args.folds, seed=args.seed,
            patience=args.patience, lookahead_tokens=args.lookahead_tokens)
        work = Path(args.work)
        stage = args.stage
        if stage == "all":
            er.run_all(cfg, work, args.out)
        elif stage == "collect":
            er.collect(cfg, work)
        elif stage == "train":
            er.train(cfg, work)
        elif stage == "eval-base":
            er.eval_base(cfg, work, parts=tuple(args.parts))
        elif stage == "eval-online":
            er.eval_online(cfg, work, names=tuple(args.controllers))
        elif stage == "eval-posthoc":
            er.eval_posthoc(cfg, work)
        else:
            er.report(cfg, work, args.out)
        if args.append_results and stage in ("all", "report"):
            _append_reasoning_results(Path(args.out or work), Path(args.append_results))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def _append_reasoning_results(out: Path, results_md: Path) -> None:
    import shutil

    body = (out / "results.md").read_text()
    fig = results_md.parent / "figures" / "reasoning_pareto.png"
    fig.parent.mkdir(parents=True, exist_ok=True)
    if (out / "pareto.png").exists():
        shutil.copyfile(out / "pareto.png", fig)
    from .evals.results_page import write_section

    how = write_section(results_md, "Fast/slow thinking with a KV classifier, online",
                        body + "\n![accuracy vs mean generated tokens](figures/reasoning_pareto.png)\n")
    print(f"{how} its section in {results_md} (figure {fig})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvagents", description="Use the KV cache an LLM builds anyway: KV embeddings, "
                                 "chain-of-embedding best-of-N, KV-classifier reasoning control.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="best-of-N on two problems, picked by majority, by logprobs and by the KV cache; "
                       "weak samples stopped early")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, hub id or path (default {DEFAULT_MODEL})")
    d.add_argument("--n", type=int, default=6, help="samples per problem (default 6)")
    d.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per sample (default 256)")
    d.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    d.add_argument("--dtype", default="fast", help="fast (default: bfloat16 on CUDA and on CPUs with bf16 "
                   "instructions, else float32), auto, float32 or bfloat16")
    d.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("embed", help="texts (.txt lines or .jsonl) -> KV embeddings (.npy)")
    e.add_argument("input")
    e.add_argument("output")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--field", default=None, help="JSONL field holding the text (default: text/question/problem/en)")
    e.add_argument("--limit", type=int, default=0)
    _add_pooling_args(e)
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

    from .evals.embedding_configs import ENCODERS
    from .evals.embedding_configs import POOLING_SETTINGS as POOLINGS

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

    er = evs.add_parser("reasoning", help="fast/slow thinking routed and switched by KV classifiers")
    er.add_argument("stage", nargs="?", default="all",
                    choices=["all", "collect", "train", "eval-base", "eval-online", "eval-posthoc", "report"],
                    help="all (default) or one stage; stages share --work")
    er.add_argument("--model", default=DEFAULT_MODEL)
    er.add_argument("--data-dir", default="../shared/data")
    er.add_argument("--datasets", nargs="+", default=["gsm8k", "commonsenseqa", "math500"])
    er.add_argument("--train-per-dataset", type=int, default=200, help="training slice: the last N rows of each file")
    er.add_argument("--eval-per-dataset", type=int, default=150, help="evaluation slice: the first N rows")
    er.add_argument("--format", default="plain", choices=["plain", "qwen3"])
    er.add_argument("--fast-tokens", type=int, default=32)
    er.add_argument("--slow-tokens", type=int, default=512)
    er.add_argument("--answer-tokens", type=int, default=32)
    er.add_argument("--every", type=int, default=32, help="re-predict every k tokens")
    er.add_argument("--window", type=int, default=64)
    er.add_argument("--layers", type=int, default=4)
    er.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    er.add_argument("--batch-prompts", type=int, default=256)
    er.add_argument("--tolerance", type=float, default=0.5, help="calibration: accuracy points below slow allowed")
    er.add_argument("--parts", nargs="+", default=["fast", "slow", "budgets"], help="eval-base: which runs")
    er.add_argument("--folds", type=int, default=5, help="cross-fitting folds for threshold calibration")
    er.add_argument("--controllers", nargs="+", default=["online_paper", "online_ours"],
                    help="eval-online: which (online_paper, online_ours, online_convergence, online_ours_convergence)")
    er.add_argument("--patience", type=int, default=2, help="answer-convergence exit: equal trial answers needed")
    er.add_argument("--lookahead-tokens", type=int, default=8, help="answer-convergence exit: tokens per look-ahead")
    er.add_argument("--seed", type=int, default=0)
    er.add_argument("--dtype", default="auto")
    er.add_argument("--device", default="auto")
    er.add_argument("--work", default="out/reasoning")
    er.add_argument("--out", default=None, help="report folder (default: --work)")
    er.add_argument("--results-page", "--append-results", dest="append_results", default=None,
                    help="write the report as its section of this Markdown page (e.g. docs/results.md), replacing the old one")
    er.set_defaults(func=cmd_eval_reasoning)

    ix = sub.add_parser("index", help="build a KV-embedding index from texts, or search one")
    ixs = ix.add_subparsers(dest="action", required=True)
    b = ixs.add_parser("build", help="texts (.jsonl rows or .txt lines) -> index folder (index.kvx)")
    b.add_argument("input")
    b.add_argument("folder")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--field", default=None, help="JSONL field holding the text (default: text/question/problem/en)")
    b.add_argument("--id-field", default=None, help="JSONL field holding the id (default: row number)")
    b.add_argument("--metric", default="cosine", choices=["cosine", "ip", "l2"])
    b.add_argument("--factory", default=None, help="faiss factory string for large collections, e.g. IVF1024,Flat")
    b.add_argument("--limit", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--max-length", type=int, default=512)
    b.add_argument("--dtype", default="auto")
    b.add_argument("--device", default="auto")
    _add_pooling_args(b)
    b.set_defaults(func=cmd_index)
    q = ixs.add_parser("search", help="query an index folder; prints the top-k table")
    q.add_argument("folder")
    q.add_argument("query")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="metadata filter (repeatable)")
    q.add_argument("--mmr", action="store_true", help="diversify with maximal marginal relevance")
    q.add_argument("--model", default=None, help="model path if it moved (default: the one recorded in the index)")
    q.add_argument("--json", action="store_true")
    q.add_argument("--width", type=int, default=80, help="text columns shown")
    q.add_argument("--dtype", default="auto")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=cmd_index)

    tr = sub.add_parser("train", help="train a KV signal on your model and data")
    trs = tr.add_subparsers(dest="signal", required=True)
    tp = trs.add_parser("probe", help="a correctness probe: sample n answers per question, grade them, fit a probe "
                        "on the KV, report it on held-out questions")
    from .evals.train_probe import TrainProbeConfig

    for name, field in TrainProbeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kw = {"help": field.description or COMMON_HELP.get(name, name.replace("_", " "))}
        if field.is_required():
            kw["required"] = True
        else:
            kw["default"] = field.get_default(call_default_factory=True)
            kw["help"] += f" (default {kw['default']})"
        if field.annotation in (int, float):
            kw["type"] = field.annotation
        elif field.annotation is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif getattr(field.annotation, "__origin__", None) is list:
            kw["nargs"], kw["type"] = "+", field.annotation.__args__[0]
        tp.add_argument(flag, **kw)
    tp.set_defaults(func=cmd_train_probe)
    trr = trs.add_parser("router", help="a fast/slow thinking router: run fast and slow modes on each question, "
                         "label, fit the prefill and step KV classifiers, calibrate their thresholds, report them on "
                         "held-out questions (or train from a `kvagents eval reasoning collect` work folder)")
    from .evals.train_router import TrainRouterConfig

    _add_config_args(trr, TrainRouterConfig)
    trr.set_defaults(func=cmd_train_router)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, embeddings) on "
                        "continuous batching")
    sv.add_argument("--model", default=DEFAULT_MODEL, help=f"{COMMON_HELP['model']} (default {DEFAULT_MODEL})")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    sv.add_argument("--max-rows", type=int, default=16, help="sequences decoded together in the shared batch "
                    "(default 16)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait for rows; more answer HTTP "
                    "429 (default 64)")
    sv.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled between two decode "
                    "steps (default 256)")
    sv.add_argument("--default-max-tokens", type=int, default=1024, help="token limit of a request that sets none "
                    "(default 1024)")
    sv.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    sv.add_argument("--no-scores", action="store_true", help="leave kvagents' probability scores out of each choice")
    sv.add_argument("--fast", action="store_true", help="serve on the fast scheduler (static KV slots, one CUDA-graph "
                    "step for all rows); requests with a grammar or a thinking budget run that work on the host each "
                    "step, and the probability scores are left out (default off)")
    sv.add_argument("--max-seq-len", type=int, default=None, help="with --fast: prompt + max_tokens of one request "
                    "at most (default min(context, 2048))")
    sv.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    sv.add_argument("--dtype", default="auto", help=COMMON_HELP["dtype"] + " (default auto)")
    sv.add_argument("--device", default="auto", help=COMMON_HELP["device"] + " (default auto)")
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="list or fetch the embedded models")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("name", nargs="?")
    m.add_argument("--force", action="store_true", help="fetch and convert again")
    m.set_defaults(func=cmd_models)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    _fill_help(ap)
    return ap


#: help of options whose meaning is the same in every command
COMMON_HELP = {
    "model": "registry name (kvagents models list), Hugging Face id, folder or .gguf file",
    "dtype": "auto (bfloat16 on CUDA, float32 on CPU), fast (bfloat16 also on CPUs with bf16 instructions), "
             "float32, bfloat16 or float16",
    "device": "auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
    "seed": "sampling seed (same seed, same samples)",
    "temperature": "sampling temperature (0 = greedy)",
    "top_p": "nucleus sampling: keep the smallest set of tokens with this much probability",
    "max_new_tokens": "most tokens generated per sample",
    "n": "samples per question",
    "limit": "only the first N rows (0 = all)",
    "batch_size": "texts per forward pass",
    "batch_prompts": "prompts decoded together in one batch",
    "input": "texts: a .txt file (one per line) or a .jsonl file (see --field)",
    "output": "where to write the embeddings (.npy)",
    "folder": "index folder (holds index.kvx)",
    "query": "text to search for",
    "k": "number of hits",
    "json": "print JSON instead of a table",
    "max_length": "truncate texts to this many tokens",
    "metric": "similarity: cosine, ip (inner product) or l2",
    "part": "which part of the cache: k, v or kv ([K;V])",
    "positions": "how token rows are pooled: mean, sum, last, first or window",
    "heads": "KV heads averaged (mean) or concatenated (flatten)",
    "layer_agg": "how the selected layers are combined",
    "no_normalize": "keep raw vectors (default: L2-normalised)",
    "data": "JSONL file of GSM8K-style rows (question, answer)",
    "data_dir": "folder with the evaluation datasets (gsm8k.jsonl, commonsenseqa.jsonl, math500.jsonl)",
    "datasets": "which datasets of --data-dir",
    "out": "output folder",
    "work": "working folder: records of every stage, resumable",
    "format": "thinking format: plain (cues for instruct models) or qwen3 (<think> tags)",
    "fast_tokens": "token budget of a fast (direct) answer",
    "slow_tokens": "token budget of slow (step-by-step) thinking",
    "answer_tokens": "token budget of the answer after thinking",
    "window": "tokens in the KV window the classifier reads",
    "layers": "last-n layer count read by the classifier",
    "budgets": "fixed thinking budgets compared as baselines",
    "num_attention_layers": "attention layers of the model (for probe features)",
    "action": "what to do",
    "name": "model name (see kvagents models list)",
    "stage": "all (default) or one stage; stages share --work",
    "command": "what to run",
    "what": "which evaluation",
    "signal": "which signal to train",
}


def _fill_help(parser: argparse.ArgumentParser) -> None:
    """Give every option without a help text the common one for its name (a test checks none is left empty)."""
    for action in parser._actions:
        if action.help is None and action.dest in COMMON_HELP:
            action.help = COMMON_HELP[action.dest]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _fill_help(sub)


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that describe the user's input (unknown model, missing file, bad value), not a bug: one line each.
    Imported only when a command failed, so that --help stays instant."""
    types: list[type[BaseException]] = [UserError, FileNotFoundError, IsADirectoryError, PermissionError,
                                         ValueError]
    try:
        from pydantic import ValidationError

        types.append(ValidationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SystemExit as e:  # a command's own one-line message about the user's input
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not isinstance(e, _user_error_types()):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
