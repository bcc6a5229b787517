"""``kvagents eval selection``: best-of-N selection and correctness prediction on GSM8K-style data.

One sampled pass (n samples per problem, one prefill each) computes every in-loop score; a greedy pass gives the
greedy baseline; the hidden-state CoE baseline takes one extra forward per sample (``--hidden-coe``). A trained
KV probe is fitted on a *different* slice of rows (``--probe-train``) and evaluated on the evaluation rows.
Score directions come from :data:`kvagents.signals.scoring.SCORE_DIRECTIONS` (fixed before any row is seen).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..control.answers import normalize_number, parse_gsm8k
from ..engine.params import SamplingParams
from ..model import KVModel
from ..signals.probe import KVProbe, probe_pooling
from ..signals.scoring import SCORE_DIRECTIONS, LayerCoE, ProbabilityScores, TokenCoE, hidden_coe_from_forward
from .metrics import aupr, auroc, fpr_at_95_tpr

INSTRUCTION = "Solve the problem step by step. End with a final line of the form 'Answer: <number>'."


def load_rows(path: str | Path, rows: tuple[int, int]) -> list[dict]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for i in range(rows[0], min(rows[1], len(lines))):
        r = json.loads(lines[i])
        q = r.get("question") or r.get("problem")
        gold = r["answer"].split("####")[-1] if "####" in str(r["answer"]) else r["answer"]
        out.append({"row": i, "question": q, "gold": normalize_number(gold)})
    if not out:
        raise ValueError(f"no rows {rows[0]}:{rows[1]} in {path} ({len(lines)} lines)")
    return out


def _prompt(q: str) -> list[dict]:
    return [{"role": "user", "content": f"{q}\n\n{INSTRUCTION}"}]


def sample_rows(llm: KVModel, rows: list[dict], params: SamplingParams, batch_prompts: int, *, with_features: bool,
                hidden: bool, desc: str = "sample") -> list[dict]:
    """Generate n samples per row with every scorer on; one record per sample."""
    from ..signals.embedding import KVEmbedding

    info_layers = None
    records = []
    for start in tqdm(range(0, len(rows), batch_prompts), desc=desc):
        chunk = rows[start : start + batch_prompts]
        comps = [LayerCoE(), LayerCoE(part="v", name="kv_coe_layer_v"), TokenCoE(), ProbabilityScores()]
        if with_features:
            if info_layers is None:
                info_layers = len(_attention_layers(llm))
            comps.append(KVEmbedding(probe_pooling(info_layers), name="features"))
        res = llm.generate([_prompt(r["question"]) for r in chunk], params, components=comps)
        for p, group in enumerate(res.samples):
            for s in group:
                scores = {}
                for name, out in s.outputs.items():
                    if name == "features":
                        continue
                    if name == "kv_coe_layer_v":
                        out = {k.replace("kv_coe_layer", "kv_coe_layer_v"): v for k, v in out.items()}
                    scores.update(out)
                if hidden:
                    ids = llm.encode_prompt(_prompt(chunk[p]["question"]))
                    scores.update(hidden_coe_from_forward(llm.model, ids + s.token_ids[:-1], len(ids)))
                ans = parse_gsm8k(s.text)
                rec = {"row": chunk[p]["row"], "sample": s.sample_index, "answer": ans, "gold": chunk[p]["gold"],
                       "correct": ans is not None and ans == chunk[p]["gold"], "tokens": s.generated_tokens,
                       "finish": s.finish_reason, "scores": scores, "text": s.text}
                if with_features:
                    f = s.outputs["features"]
                    rec["features"] = None if f is None else f.numpy().astype(np.float32)
                records.append(rec)
    return records


def _attention_layers(llm: KVModel) -> list[int]:
    from transformers import DynamicCache

    from ..engine.decode import layer_info

    cache = DynamicCache(config=llm.model.config)
    ids = torch.tensor([[llm.engine.pad_token_id]], device=llm.device)
    llm.engine.prefill(ids, torch.ones_like(ids), torch.zeros_like(ids), cache)
    return layer_info(cache, llm.model.config).attention_layers


def _groups(records: list[dict]) -> dict[int, list[dict]]:
    g: dict[int, list[dict]] = {}
    for r in records:
        g.setdefault(r["row"], []).append(r)
    return g


def _score_of(rec: dict, name: str) -> float:
    v = rec["scores"].get(name, float("nan"))
    return float("nan") if v is None else float(v) * SCORE_DIRECTIONS.get(name, 1)


def best_of_n(groups: dict[int, list[dict]], name: str) -> float:
    hits = []
    for recs in groups.values():
        vals = [_score_of(r, name) for r in recs]
        vals = [-math.inf if math.isnan(v) else v for v in vals]
        hits.append(recs[int(np.argmax(vals))]["correct"])
    return float(np.mean(hits))


def majority(groups: dict[int, list[dict]], weight: str | None = None) -> float:
    """Majority (or score-weighted) vote over parsed answers; weights are min-max normalised within a group."""
    hits = []
    for recs in groups.values():
        if weight is None:
            w = [1.0] * len(recs)
        else:
            v = np.array([_score_of(r, weight) for r in recs])
            v = np.where(np.isnan(v), np.nanmin(v) if np.isfinite(v).any() else 0.0, v)
            span = v.max() - v.min()
            w = list((v - v.min()) / span + 1e-3) if span > 0 else [1.0] * len(recs)
        votes: Counter = Counter()
        for r, wi in zip(recs, w):
            if r["answer"] is not None:
                votes[r["answer"]] += wi
        if not votes:
            hits.append(False)
            continue
        hits.append(votes.most_common(1)[0][0] == recs[0]["gold"])
    return float(np.mean(hits))


def summarize(records: list[dict], greedy: list[dict] | None) -> dict:
    groups = _groups(records)
    names = sorted({k for r in records for k in r["scores"] if k in SCORE_DIRECTIONS or k == "kv_probe"})
    labels = np.array([r["correct"] for r in records])
    out = {
        "rows": len(groups),
        "samples": len(records),
        "greedy_accuracy": float(np.mean([r["correct"] for r in greedy])) if greedy else None,
        "single_sample_accuracy": float(labels.mean()),
        "majority_vote": majority(groups),
        "oracle_any_correct": float(np.mean([any(r["correct"] for r in g) for g in groups.values()])),
        "mean_generated_tokens": float(np.mean([r["tokens"] for r in records])),
        "parse_failures": float(np.mean([r["answer"] is None for r in records])),
        "scores": {},
    }
    for name in names:
        s = np.array([_score_of(r, name) for r in records])
        out["scores"][name] = {
            "direction": SCORE_DIRECTIONS.get(name, 1),
            "best_of_n": best_of_n(groups, name),
            "weighted_vote": majority(groups, weight=name),
            "auroc": auroc(s, labels),
            "fpr95": fpr_at_95_tpr(s, labels),
            "aupr": aupr(s, labels),
        }
    return out


def markdown_table(summary: dict) -> str:
    lines = [
        f"rows {summary['rows']}, samples {summary['samples']}, mean generated tokens "
        f"{summary['mean_generated_tokens']:.1f}, unparsed answers {100 * summary['parse_failures']:.1f} %",
        "",
        "| selection | accuracy % |",
        "|---|---|",
    ]
    if summary["greedy_accuracy"] is not None:
        lines.append(f"| greedy | {100 * summary['greedy_accuracy']:.1f} |")
    lines += [
        f"| single sample (random pick) | {100 * summary['single_sample_accuracy']:.1f} |",
        f"| majority vote | {100 * summary['majority_vote']:.1f} |",
        f"| oracle (any sample right) | {100 * summary['oracle_any_correct']:.1f} |",
    ]
    if summary.get("probe_weighted_vote"):
        t = summary["probe_weighted_vote"]
        lines.append(f"| KV-probe-weighted vote (tau={t['tau']} chosen on the training rows) | "
                     f"{100 * t['eval_accuracy']:.1f} |")
    if summary.get("early_stop"):
        e = summary["early_stop"]
        lines.append(
            f"| majority vote with early stop of weak samples (rows {e['rows']}; {e['stopped']}/{e['samples']} "
            f"stopped, mean tokens {e['mean_tokens_with_early_stop']:.0f} vs {e['mean_tokens_without_on_same_rows']:.0f}"
            f", majority without early stop on these rows {100 * e['majority_vote_without_on_same_rows']:.1f}) | "
            f"{100 * e['majority_vote_with_early_stop']:.1f} |"
        )
    lines += [
        "",
        "| score | dir | best-of-N % | weighted vote % | AUROC | FPR@95 | AUPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["scores"].items():
        lines.append(
            f"| {name} | {'+' if m['direction'] > 0 else '-'} | {100 * m['best_of_n']:.1f} | "
            f"{100 * m['weighted_vote']:.1f} | {m['auroc']:.3f} | {m['fpr95']:.3f} | {m['aupr']:.3f} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return
    names = list(summary["scores"])
    cols = 4
    rows = math.ceil(len(names) / cols) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows))
    axes = axes.flatten()
    for ax, name in zip(axes, names):
        s = np.array([_score_of(r, name) for r in records])
        y = np.array([r["correct"] for r in records])
        ok = np.isfinite(s)
        ax.hist([s[ok & y], s[ok & ~y]], bins=30, density=True, label=["correct", "wrong"], alpha=0.7)
        ax.set_title(f"{name} AUROC {summary['scores'][name]['auroc']:.2f}", fontsize=8)
    axes[0].legend(fontsize=7)
    ax = axes[len(names)]
    for extra in axes[len(names) + 1 :]:
        extra.axis("off")
    labels = ["single", "majority", "oracle"] + [f"bo{n}" for n in names]
    vals = [summary["single_sample_accuracy"], summary["majority_vote"], summary["oracle_any_correct"]] + [
        summary["scores"][n]["best_of_n"] for n in names
    ]
    ax.barh(range(len(vals)), [100 * v for v in vals])
    ax.set_yticks(range(len(vals)), labels, fontsize=6)
    ax.set_xlabel("accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run(data: str, model: str, n: int, rows: tuple[int, int], probe_rows: tuple[int, int] | None, out_dir: Path,
        *, device: str = "auto", dtype: str = "auto", temperature: float = 0.7, top_p: float = 0.95,
        max_new_tokens: int = 384, batch_prompts: int = 32, hidden: bool = True, seed: int = 0) -> dict:
    """The whole evaluation in one process: an evaluation shard, a probe-training shard, then :func:`combine`."""
    llm = KVModel.from_pretrained(model, dtype=dtype, device=device).load()
    common = dict(device=device, dtype=dtype, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                  batch_prompts=batch_prompts, seed=seed, llm=llm)
    features = probe_rows is not None
    run_shard(data, model, n, rows, out_dir / "eval", greedy=True, hidden=hidden, features=features, **common)
    train_dirs = []
    if features:
        run_shard(data, model, n, probe_rows, out_dir / "train", greedy=False, hidden=False, features=True, **common)
        train_dirs = [out_dir / "train"]
    return combine([out_dir / "eval"], train_dirs, out_dir, len(_attention_layers(llm)))


# ---- sharded runs (long evaluations split across calls) --------------------------------------------------------


def run_shard(data: str, model: str, n: int, rows: tuple[int, int], out_dir: Path, *, greedy: bool, hidden: bool,
              features: bool, device: str = "auto", dtype: str = "auto", temperature: float = 0.7,
              top_p: float = 0.95, max_new_tokens: int = 384, batch_prompts: int = 32, seed: int = 0,
              llm: KVModel | None = None, early_stop_only: bool = False) -> None:
    """Sample rows ``rows`` and write ``records.jsonl`` (+ ``features.npy``, ``greedy.jsonl``) to ``out_dir``.

    ``early_stop_only``: instead, one sampled pass with :class:`EarlyStopWeak` on; writes ``early_stop.json``
    (majority vote over the samples that were not stopped, generated and saved tokens)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = llm or KVModel.from_pretrained(model, dtype=dtype, device=device).load()
    data_rows = load_rows(data, rows)
    if early_stop_only:
        from ..control.early_stop import EarlyStopWeak, early_stop_summary

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                seed=seed + rows[0])
        hits, summaries = [], []
        for start in tqdm(range(0, len(data_rows), batch_prompts), desc="early-stop"):
            chunk = data_rows[start : start + batch_prompts]
            es = EarlyStopWeak()
            res = llm.generate([_prompt(r["question"]) for r in chunk], params, components=[es])
            summaries.append(early_stop_summary(res, es.name))
            for row, group in zip(chunk, res.samples):
                kept = [s for s in group if not s.outputs[es.name]["stopped_early"]] or group
                votes = Counter(a for a in (parse_gsm8k(s.text) for s in kept) if a is not None)
                hits.append(bool(votes) and votes.most_common(1)[0][0] == row["gold"])
        out = {k: sum(x[k] for x in summaries) for k in ("samples", "stopped", "generated_tokens", "tokens_saved_est")}
        out.update({"rows": list(rows), "majority_correct": int(sum(hits)), "problems": len(hits),
                    "settings": repr(EarlyStopWeak())})
        (out_dir / "early_stop.json").write_text(json.dumps(out, indent=2))
        (out_dir / "meta.json").write_text(json.dumps({"rows": list(rows), "early_stop": True}))
        print(json.dumps(out))
        return
    t0 = time.perf_counter()
    if greedy:
        g = sample_rows(llm, data_rows, SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                        batch_prompts * n, with_features=False, hidden=False, desc="greedy")
        with open(out_dir / "greedy.jsonl", "w") as f:
            for r in g:
                f.write(json.dumps(r) + "\n")
    t1 = time.perf_counter()
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            seed=seed + rows[0])
    recs = sample_rows(llm, data_rows, params, batch_prompts, with_features=features, hidden=hidden, desc="sample")
    t2 = time.perf_counter()
    if features:
        np.save(out_dir / "features.npy", np.stack([r.pop("features") for r in recs]).astype(np.float16))
    with open(out_dir / "records.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    meta = {"rows": list(rows), "greedy_s": t1 - t0, "sample_s": t2 - t1, "samples": len(recs),
            "tokens": int(sum(r["tokens"] for r in recs)), "model": model, "n": n, "temperature": temperature,
            "top_p": top_p, "max_new_tokens": max_new_tokens, "dtype": str(llm.dtype),
            "device": torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu"}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))


def _read_shard(d: Path) -> tuple[list[dict], list[dict], np.ndarray | None]:
    recs = [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]
    greedy = [json.loads(x) for x in (d / "greedy.jsonl").read_text().splitlines()] if (d / "greedy.jsonl").exists() else []
    feats = np.load(d / "features.npy").astype(np.float32) if (d / "features.npy").exists() else None
    return recs, greedy, feats


TAU_GRID = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 20.0)


def probe_vote(groups: dict[int, list[dict]], tau: float) -> float:
    """Vote where each sample weighs ``exp(logit(p_probe) / tau)`` (tau -> inf: majority vote)."""
    hits = []
    for recs in groups.values():
        p = np.clip(np.array([r["scores"].get("kv_probe", np.nan) for r in recs], float), 1e-6, 1 - 1e-6)
        logit = np.log(p / (1 - p))
        logit = np.where(np.isnan(logit), np.nanmin(logit) if np.isfinite(logit).any() else 0.0, logit)
        w = np.exp((logit - logit.max()) / tau)
        votes: dict = {}
        for r, wi in zip(recs, w):
            if r["answer"] is not None:
                votes[r["answer"]] = votes.get(r["answer"], 0.0) + wi
        hits.append(bool(votes) and max(votes, key=votes.get) == recs[0]["gold"])
    return float(np.mean(hits))


def cross_fitted_probe_scores(records: list[dict], x: np.ndarray, num_attention_layers: int, folds: int = 5):
    """Out-of-fold probe P(correct) for training rows (folds split by problem, never by sample)."""
    y = np.array([r["correct"] for r in records], dtype=float)
    rows = np.array([r["row"] for r in records])
    out = np.full(len(records), np.nan)
    for part in np.array_split(np.unique(rows), folds):
        test = np.isin(rows, part)
        fit = ~test & np.isfinite(x).all(1)
        out[test] = KVProbe.fit(x[fit], y[fit], probe_pooling(num_attention_layers)).predict(np.nan_to_num(x[test]))
    return out


def combine(eval_dirs: list[Path], train_dirs: list[Path], out_dir: Path, num_attention_layers: int) -> dict:
    """Train the KV probe on ``train_dirs`` features, score the eval shards with it, summarise everything."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records, greedy, eval_feats = [], [], []
    for d in eval_dirs:
        r, g, f = _read_shard(d)
        records += r
        greedy += g
        eval_feats.append(f)
    probe_note = None
    probe = None
    if train_dirs:
        tr, xs = [], []
        for d in train_dirs:
            r, _, f = _read_shard(d)
            tr += r
            xs.append(f)
        x = np.concatenate(xs)
        y = np.array([r["correct"] for r in tr], dtype=float)
        ok = np.isfinite(x).all(1)
        rows = sorted({r["row"] for r in tr})
        try:
            probe = KVProbe.fit(x[ok], y[ok], probe_pooling(num_attention_layers))
        except ValueError as e:
            probe, probe_note = None, f"KV probe not trained: {e}"
        else:
            probe.save(out_dir / "probe")
            probe_note = (f"KV probe trained on rows {rows[0]}-{rows[-1]} of the same file ({int(ok.sum())} "
                          f"samples, {100 * y[ok].mean():.1f} % correct)")
        if probe is not None and all(f is not None for f in eval_feats):
            p = probe.predict(np.nan_to_num(np.concatenate(eval_feats)))
            for r, v in zip(records, p):
                r["scores"]["kv_probe"] = float(v)
            # choose the vote temperature on the training rows only (cross-fitted probe scores), then apply it once
            oof = cross_fitted_probe_scores(tr, x, num_attention_layers)
            for r, v in zip(tr, oof):
                r["scores"]["kv_probe"] = float(v)
            train_groups = _groups(tr)
            tuning = {tau: probe_vote(train_groups, tau) for tau in TAU_GRID}
            tau = max(tuning, key=tuning.get)
            tuned = {"tau": tau, "train_majority": majority(train_groups), "train_accuracy_by_tau": tuning,
                     "eval_accuracy": probe_vote(_groups(records), tau)}
    summary = summarize(records, greedy)
    es_dirs = [d for d in eval_dirs[0].parent.glob("es-*") if (d / "early_stop.json").exists()]
    if es_dirs:
        es = [json.loads((d / "early_stop.json").read_text()) for d in es_dirs]
        es_rows = sorted(r for e in es for r in e["rows"])
        tot = {k: sum(e[k] for e in es) for k in ("samples", "stopped", "generated_tokens", "tokens_saved_est",
                                                   "majority_correct", "problems")}
        same = [r for r in records if es_rows[0] <= r["row"] < es_rows[-1]]
        summary["early_stop"] = {
            **tot, "rows": f"{es_rows[0]}-{es_rows[-1] - 1}", "settings": es[0]["settings"],
            "majority_vote_with_early_stop": tot["majority_correct"] / tot["problems"],
            "majority_vote_without_on_same_rows": majority(_groups(same)) if same else None,
            "mean_tokens_with_early_stop": tot["generated_tokens"] / tot["samples"],
            "mean_tokens_without_on_same_rows": float(np.mean([r["tokens"] for r in same])) if same else None,
        }
    if train_dirs and probe is not None:
        summary["probe_weighted_vote"] = tuned
    metas = [json.loads((d / "meta.json").read_text()) for d in eval_dirs]
    rows = sorted({r["row"] for r in records})
    summary.update({k: metas[0][k] for k in ("model", "n", "temperature", "top_p", "max_new_tokens", "dtype", "device")})
    summary.update({"rows_used": f"{rows[0]}-{rows[-1]}", "probe": probe_note,
                    "seconds": sum(m["greedy_s"] + m["sample_s"] for m in metas), "date": time.strftime("%Y-%m-%d")})
    (out_dir / "selection.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(summary)
    (out_dir / "selection.md").write_text(table + "\n")
    plot(records, summary, out_dir / "selection.png")
    print(table)
    print(probe_note or "")
    return summary
