"""``kvagents eval embeddings``: metrics against brute force, the embedding cache, and the pipeline from a cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvagents.evals import embeddings as ee


def _brute_ranks(q, d):
    out = []
    for i in range(len(q)):
        sims = [float(np.dot(q[i], d[j]) / np.linalg.norm(q[i]) / np.linalg.norm(d[j])) for j in range(len(d))]
        out.append(1 + sum(s > sims[i] for s in sims))
    return np.array(out)


def test_retrieval_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(40, 8))
    d = q + rng.normal(scale=1.5, size=q.shape)  # related but noisy: ranks spread over 1..40
    ranks = _brute_ranks(q, d)
    assert len(set(ranks.tolist())) > 5
    got = ee.retrieval_metrics(q, d)
    assert got["recall@1"] == pytest.approx(np.mean(ranks == 1))
    assert got["recall@10"] == pytest.approx(np.mean(ranks <= 10))
    assert got["mrr"] == pytest.approx(np.mean(1 / ranks))
    perfect = ee.retrieval_metrics(q, 3 * q)
    assert perfect == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0}


def test_chance_retrieval_is_the_mean_over_random_rankings():
    rng = np.random.default_rng(1)
    n = 30
    sims = [ee.retrieval_metrics(rng.normal(size=(n, 16)), rng.normal(size=(n, 16))) for _ in range(300)]
    c = ee.chance_retrieval(n)
    for k in c:
        assert np.mean([s[k] for s in sims]) == pytest.approx(c[k], abs=0.02)


def test_classification_metrics_separable_and_random():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 30)
    x = np.stack([rng.normal(size=6) + 6.0 * np.eye(6)[["a", "b", "c"].index(v)] for v in y])  # one axis per class
    m = ee.classification_metrics(x, list(y))
    assert m["knn"] > 0.9 and m["logreg"] > 0.9 and m["majority"] == pytest.approx(1 / 3, abs=0.05)
    noise = ee.classification_metrics(rng.normal(size=(90, 6)), list(y))
    assert noise["logreg"] < 0.6 and noise["folds"] == 5


class FakeRunner:
    """Stands in for a model: deterministic vectors from the text, counting calls."""

    name = "smollm2-135m"
    calls = 0

    def __init__(self, poolings=("p1", "p2")):
        self.poolings = poolings

    def pooling_configs(self):
        return {p: {"cfg": p} for p in self.poolings}

    def embed(self, texts):
        self.calls += 1
        vec = {p: np.stack([_vec(t, k) for t in texts]) for k, p in enumerate(self.poolings)}
        return vec, {"encode_s": 2.0, "device": "cpu", "device_name": "test cpu", "dtype": "float32", "batch_size": 4,
                     "max_length": 16, "source": "fake", "load_s": 0.0, "date": "today"}


def _vec(text: str, k: int) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((text, k))) % 2**32)
    return rng.normal(size=4).astype(np.float32)


def test_cache_round_trip_prefix_reuse_and_invalidation(tmp_path):
    texts = [f"text {i}" for i in range(10)]
    r = FakeRunner()
    v1, meta = ee.embeddings_for(r, tmp_path, "gsm8k", "question", texts, cache_only=False, log=lambda *_: None)
    assert r.calls == 1 and meta["n"] == 10 and set(v1) == {"p1", "p2"}
    v2, _ = ee.embeddings_for(r, tmp_path, "gsm8k", "question", texts[:6], cache_only=True)  # a prefix: cached
    assert r.calls == 1
    np.testing.assert_array_equal(v2["p1"], v1["p1"][:6])
    with pytest.raises(FileNotFoundError, match="--cache-only"):  # different texts are not served from the cache
        ee.embeddings_for(r, tmp_path, "gsm8k", "question", ["other"] + texts[1:], cache_only=True)
    with pytest.raises(FileNotFoundError):  # a pooling config not in the cache
        ee.embeddings_for(FakeRunner(("p1", "p3")), tmp_path, "gsm8k", "question", texts, cache_only=True)
    ee.embeddings_for(r, tmp_path, "gsm8k", "question", texts + ["new"], cache_only=False, log=lambda *_: None)
    assert r.calls == 2  # more rows than cached: recomputed


def _write_data(folder, n=24):
    subjects = ["Algebra", "Geometry", "Prealgebra"]
    with open(folder / "gsm8k.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"q{i} how many", "answer": f"a{i} so #### {i}"}) + "\n")
    with open(folder / "math500.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"problem": f"p{i}", "solution": f"s{i}", "subject": subjects[i % 3],
                                "level": 1 + i % 2}) + "\n")


def test_run_from_cache_writes_report_and_chart(tmp_path, capsys):
    pytest.importorskip("sklearn")
    data, cache, out = tmp_path / "data", tmp_path / "cache", tmp_path / "out"
    data.mkdir()
    _write_data(data)
    names = ["kv-mean-last4", "v-mean-last8"]
    cfgs = {k: ee.POOLINGS[k].model_dump() for k in names}
    rng = np.random.default_rng(0)
    for ds, fields in ee.FIELDS.items():
        rows = ee.load_dataset(data, ds)
        for field in fields:
            texts = [str(r[field]) for r in rows]
            base = rng.normal(size=(len(texts), 6)).astype(np.float32) if field in ("question", "problem") else None
            vecs = {k: rng.normal(size=(len(texts), 6)).astype(np.float32) for k in names}
            if base is not None:
                queries = vecs
            else:  # documents = their query + small noise: retrieval must come out near perfect
                vecs = {k: queries[k] + 0.01 * rng.normal(size=queries[k].shape).astype(np.float32) for k in names}
            ee.CacheEntry(cache, "smollm2-135m", ds, field).save(
                texts, vecs, cfgs, {"encode_s": 1.0, "device": "cuda", "device_name": "NVIDIA H100", "dtype": "float32",
                                    "batch_size": 32, "max_length": 512, "source": "x.gguf", "load_s": 1.0,
                                    "date": "2026-11-25"})
    from kvagents.cli import main

    rc = main(["eval", "embeddings", "--encoders", "smollm2-135m", "--poolings", *names, "--data-dir", str(data),
               "--cache-dir", str(cache), "--out", str(out), "--cache-only"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["pooling"] for r in res["rows"]] == names
    assert all(r["gsm8k/mrr"] == 1.0 and r["math500/recall@1"] == 1.0 for r in res["rows"])
    assert res["timing"]["smollm2-135m"]["s_per_1000_texts"] == pytest.approx(1000 / 24)
    md = (out / "results.md").read_text()
    assert "| smollm2-135m | kv-mean-last4 | 6 |" in md and "NVIDIA H100" in md
    if (out / "embeddings.png").exists():
        assert (out / "embeddings.png").stat().st_size > 1000
    assert main(["eval", "embeddings", "--encoders", "all-minilm-l6-v2", "--data-dir", str(data), "--cache-dir",
          str(cache), "--out", str(out), "--cache-only"]) == 2  # MiniLM is not cached, --cache-only refuses to compute
    assert 'no cached' in capsys.readouterr().err
    assert main(["eval", "embeddings", "--model-path", "nopath", "--cache-dir", str(cache)]) == 2
    assert 'NAME=PATH' in capsys.readouterr().err
