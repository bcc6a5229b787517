"""KVIndex against a brute-force NumPy oracle, and its persistence (corruption, mismatches, crashes mid-save)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kvagents import (
    IndexChecksumError,
    IndexFormatError,
    IndexMismatchError,
    IndexVersionError,
    KVIndex,
    KVIndexError,
)

pytest.importorskip("faiss")
torch = pytest.importorskip("torch")

DIM = 16
BACKENDS = ["faiss", "torch", "sharded"]  # sharded: rows spread over 3 devices (here all "cpu"), top-k merged
SHARDS = ["cpu", "cpu", "cpu"]


def make_index(dim, metric, backend, **kw):
    if backend == "sharded":
        return KVIndex(dim, metric, device=SHARDS, **kw)
    return KVIndex(dim, metric, backend=backend, **kw)


def oracle(store: dict[str, np.ndarray], meta: dict[str, dict], q: np.ndarray, k: int, metric: str, filter=None):
    """Brute force: ids and scores of the k best entries of ``store`` for query ``q``."""
    ids = [i for i in store if filter is None or all(meta[i].get(key) == v for key, v in filter.items())]
    if not ids:
        return [], np.zeros(0)
    x = np.stack([store[i] for i in ids]).astype(np.float64)
    qq = q.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        qq = qq / np.linalg.norm(qq)
        s = x @ qq
        order = np.argsort(-s)
    elif metric == "ip":
        s = x @ qq
        order = np.argsort(-s)
    else:
        s = ((x - qq) ** 2).sum(1)
        order = np.argsort(s)
    order = order[:k]
    return [ids[j] for j in order], s[order]


def check(index: KVIndex, store, meta, queries, k, metric, filter=None):
    got_all = index.search_batch(queries, k, filter=filter)
    for q, got in zip(queries, got_all):
        want_ids, want_scores = oracle(store, meta, q, k, metric, filter)
        assert [h.id for h in got] == want_ids
        np.testing.assert_allclose([h.score for h in got], want_scores, rtol=1e-4, atol=1e-4)
        for h in got:
            assert h.metadata == meta[h.id]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("with_ids", [True, False])
def test_search_equals_bruteforce_through_adds_filters_deletes(backend, metric, with_ids):
    rng = np.random.default_rng(0)
    index = make_index(DIM, metric, backend)
    store: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}
    for batch in range(3):
        x = rng.normal(size=(60, DIM)).astype(np.float32)
        md = [{"color": ["red", "green", "blue"][j % 3], "batch": batch} for j in range(60)]
        ids = [f"b{batch}-{j}" for j in range(60)] if with_ids else None
        got_ids = index.add(torch.from_numpy(x) if batch == 1 else x, ids=ids, metadatas=md)
        if with_ids:
            assert got_ids == ids
        assert len(set(got_ids)) == 60
        for i, v, m in zip(got_ids, x, md):
            store[i], meta[i] = v, m
        queries = rng.normal(size=(5, DIM)).astype(np.float32)
        check(index, store, meta, queries, 7, metric)
        check(index, store, meta, queries, 7, metric, filter={"color": "red"})
        check(index, store, meta, queries, 3, metric, filter={"color": "green", "batch": 0})
        # delete a third, including ids never added
        victims = list(store)[::3]
        assert index.delete(victims + ["never-there"]) == len(victims)
        for v in victims:
            del store[v], meta[v]
        assert len(index) == len(store)
        check(index, store, meta, queries, 10, metric)
        check(index, store, meta, queries, 5, metric, filter={"color": "blue"})
    # k larger than the collection
    q = rng.normal(size=DIM).astype(np.float32)
    assert [h.id for h in index.search(q, k=10_000)] == oracle(store, meta, q, 10_000, metric)[0]
    # filters passed as callables equal dict filters; a filter matching nothing gives no hits
    dict_hits = index.search(q, 5, filter={"color": "red"})
    call_hits = index.search(q, 5, filter=lambda m: m["color"] == "red")
    assert [h.id for h in dict_hits] == [h.id for h in call_hits]
    assert index.search(q, 5, filter={"color": "purple"}) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_filter_goes_through_the_selector_and_stays_exact(backend):
    rng = np.random.default_rng(1)
    index = make_index(DIM, "l2", backend)
    index.exact_filter_limit = 10  # force the faiss IDSelector path
    x = rng.normal(size=(300, DIM)).astype(np.float32)
    ids = [str(i) for i in range(300)]
    md = [{"even": i % 2 == 0} for i in range(300)]
    index.add(x, ids=ids, metadatas=md)
    store, meta = dict(zip(ids, x)), dict(zip(ids, md))
    check(index, store, meta, rng.normal(size=(4, DIM)).astype(np.float32), 8, "l2", filter={"even": True})


def test_post_filter_for_indexes_without_selectors():
    """IndexPQ rejects IDSelectors: the index over-fetches and filters after; results match the PQ's own order."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, DIM)).astype(np.float32)
    index = KVIndex(DIM, "l2", factory="PQ4x4")
    index.exact_filter_limit = 0
    index.add(x, ids=[str(i) for i in range(2000)], metadatas=[{"g": i % 50} for i in range(2000)])
    q = rng.normal(size=DIM).astype(np.float32)
    hits = index.search(q, 5, filter={"g": 7})
    assert len(hits) == 5 and all(h.metadata["g"] == 7 for h in hits)
    unfiltered = [h for h in index.search(q, 2000) if h.metadata["g"] == 7][:5]
    assert [h.id for h in hits] == [h.id for h in unfiltered]


def test_upsert_replaces_vector_text_and_metadata_and_get_orders():
    index = KVIndex(4, "l2")
    index.add(np.eye(4, dtype=np.float32), ids=["a", "b", "c", "d"], texts=list("ABCD"),
              metadatas=[{"v": i} for i in range(4)])
    with pytest.raises(KVIndexError, match="upsert"):
        index.add(np.eye(4, dtype=np.float32)[:1], ids=["a"])
    index.upsert(np.array([[0, 0, 0, 5.0], [9, 9, 9, 9]], dtype=np.float32), ids=["a", "e"], texts=["new", "E"],
                 metadatas=[{"v": 10}, {"v": 11}])
    assert len(index) == 5
    rec = index.get(["e", "zzz", "a"])
    assert [r.id for r in rec] == ["e", "a"]
    np.testing.assert_array_equal(rec[1].vector, [0, 0, 0, 5.0])
    assert rec[1].text == "new" and rec[1].metadata == {"v": 10}
    hit = index.search(np.array([0, 0, 0, 5.0]), k=1)[0]
    assert (hit.id, hit.score, hit.metadata) == ("a", 0.0, {"v": 10})
    assert all(h.id != "a" or h.score > 0 for h in index.search(np.array([1.0, 0, 0, 0]), k=5))
    assert index.delete([]) == 0 and index.delete(["zzz"]) == 0


def test_mmr_matches_langchain_reference():
    lc = pytest.importorskip("langchain_core.vectorstores.utils")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, DIM)).astype(np.float32)
    index = KVIndex(DIM, "cosine")
    index.add(x, ids=[str(i) for i in range(100)])
    q = rng.normal(size=DIM).astype(np.float32)
    cands = index.search(q, 20)
    cand_vecs = np.stack([x[int(h.id)] for h in cands])
    for lam in (0.0, 0.5, 1.0):
        want = lc.maximal_marginal_relevance(q, list(cand_vecs), lambda_mult=lam, k=5)
        got = index.mmr(q, k=5, fetch_k=20, lambda_mult=lam)
        assert [h.id for h in got] == [cands[i].id for i in want]


def test_ivf_and_hnsw_recall_and_training():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(20, DIM)) * 5
    x = (centers[rng.integers(0, 20, 3000)] + rng.normal(size=(3000, DIM))).astype(np.float32)
    for factory in ("IVF16,Flat", "HNSW16"):
        index = KVIndex(DIM, "l2", factory=factory)
        index.train(x[:2000])
        assert index.is_trained
        index.add(x, ids=[str(i) for i in range(3000)])
        q = x[:50] + 0.01
        got = index.search_batch(q, 10)
        exact = KVIndex(DIM, "l2")
        exact.add(x, ids=[str(i) for i in range(3000)])
        want = exact.search_batch(q, 10)
        recall = np.mean([len({h.id for h in g} & {h.id for h in w}) / 10 for g, w in zip(got, want)])
        assert recall > 0.8, (factory, recall)
        removed = index.delete([str(i) for i in range(0, 3000, 2)])  # HNSW cannot remove: tombstones
        assert removed == 1500
        assert all(int(h.id) % 2 == 1 for hits in index.search_batch(q, 10) for h in hits)


def test_bad_input_errors():
    with pytest.raises(KVIndexError, match="metric"):
        KVIndex(4, "manhattan")
    with pytest.raises(KVIndexError, match="dim"):
        KVIndex(0)
    with pytest.raises(KVIndexError, match="factory"):
        KVIndex(4, factory="NotAFactory")
    with pytest.raises(KVIndexError, match="exact only"):
        KVIndex(4, factory="IVF4,Flat", backend="torch")
    with pytest.raises(KVIndexError, match="several devices"):
        KVIndex(4, factory="IVF4,Flat", device=["cpu", "cpu"])
    index = KVIndex(4)
    with pytest.raises(KVIndexError, match=r"\[n, 4\]"):
        index.add(np.zeros((2, 5)))
    with pytest.raises(KVIndexError, match="NaN"):
        index.add(np.array([[1, np.nan, 0, 0]]))
    with pytest.raises(KVIndexError, match="3 entries for 2"):
        index.add(np.ones((2, 4)), ids=["a", "b", "c"])
    with pytest.raises(KVIndexError, match="repeated"):
        index.add(np.ones((2, 4)), ids=["a", "a"])
    with pytest.raises(KVIndexError, match="k must"):
        index.search(np.ones(4), k=0)
    assert len(index) == 0  # nothing half-added
    assert index.search(np.ones(4)) == []


# ---------------------------------------------------------------------------------------------- persistence
IDENTITY = {"kind": "kvagents", "model": "tiny", "pooling": {"layers": [-1]}, "dim": DIM}


def _sample_index(backend="faiss", factory=None, n=200, seed=0, metric="cosine"):
    rng = np.random.default_rng(seed)
    index = make_index(DIM, metric, backend, factory=factory, encoder_identity=IDENTITY)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    if factory:
        index.train(x)
    index.add(x, ids=[f"id{i}" for i in range(n)], texts=[f"text {i} é" for i in range(n)],
              metadatas=[{"i": i, "tag": ["x", "y"][i % 2], "nested": {"a": [i]}} for i in range(n)])
    index.delete([f"id{i}" for i in range(0, n, 7)])
    return index, rng.normal(size=(6, DIM)).astype(np.float32)


def _same_results(a: KVIndex, b: KVIndex, queries):
    for filt in (None, {"tag": "x"}):
        for ra, rb in zip(a.search_batch(queries, 9, filter=filt), b.search_batch(queries, 9, filter=filt)):
            assert [(h.id, h.text, h.metadata) for h in ra] == [(h.id, h.text, h.metadata) for h in rb]
            np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], rtol=1e-6)


@pytest.mark.parametrize("backend,factory", [("faiss", None), ("torch", None), ("sharded", None),
                                             ("faiss", "IVF8,Flat"), ("faiss", "HNSW8")])
def test_save_load_round_trip(tmp_path, backend, factory):
    index, queries = _sample_index(backend, factory)
    path = index.save(tmp_path / "idx.kvx")
    if backend == "sharded":
        loaded = KVIndex.load(path, encoder_identity=IDENTITY, dim=DIM, device=SHARDS)
    else:
        loaded = KVIndex.load(path, encoder_identity=IDENTITY, dim=DIM, backend=backend)
    assert loaded.ids == index.ids and len(loaded) == len(index)
    _same_results(index, loaded, queries)
    # the loaded index keeps working: add, upsert, delete
    loaded.upsert(np.ones((1, DIM)), ids=["id1"], metadatas=[{"i": -1}])
    assert loaded.get(["id1"])[0].metadata == {"i": -1}
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_files_raise_named_errors_and_stay_untouched(tmp_path):
    index, _ = _sample_index()
    good = index.save(tmp_path / "good.kvx")
    data = good.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], IndexFormatError),
        "truncated-tiny": (data[:10], IndexFormatError),
        "magic": (b"X" + data[1:], IndexFormatError),
        "newer": (data[:8] + struct.pack("<I", 99) + data[12:], IndexVersionError),
    }
    for pos in (44, 70, len(data) // 3, len(data) - 5):  # lengths, header, payload, vectors
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        cases[f"flip@{pos}"] = (bytes(flipped), (IndexChecksumError, IndexFormatError))
    for name, (blob, err) in cases.items():
        path = tmp_path / f"{name}.kvx"
        path.write_bytes(blob)
        before = _digest(path)
        with pytest.raises(err):
            KVIndex.load(path)
        assert _digest(path) == before, name
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    (tmp_path / "payload.kvx").write_bytes(bytes(flipped))
    with pytest.raises(IndexChecksumError, match="SHA-256"):
        KVIndex.load(tmp_path / "payload.kvx")
    before = _digest(good)
    with pytest.raises(IndexMismatchError, match="16-d vectors but the encoder in use gives 32-d"):
        KVIndex.load(good, dim=32)
    with pytest.raises(IndexMismatchError, match="other"):
        KVIndex.load(good, encoder_identity={**IDENTITY, "model": "other"})
    with pytest.raises(FileNotFoundError):
        KVIndex.load(tmp_path / "missing.kvx")
    assert _digest(good) == before
    assert len(KVIndex.load(good, encoder_identity=dict(IDENTITY))) == len(index)


def test_unsaveable_metadata_names_the_id_and_keeps_the_old_file(tmp_path):
    index, _ = _sample_index()
    path = index.save(tmp_path / "i.kvx")
    before = _digest(path)
    with pytest.raises(KVIndexError, match="'bad'"):  # refused when added, so it can never reach a save
        index.add(np.ones((1, DIM)), ids=["bad"], metadatas=[{"obj": object()}])
    assert "bad" not in index
    index.save(path)
    assert _digest(path) == before


SAVER = textwrap.dedent(
    """
    import sys, types, numpy as np
    pkg = types.ModuleType("kvagents")  # import the index modules without the package's torch-heavy __init__
    pkg.__path__ = [sys.argv[2]]
    sys.modules["kvagents"] = pkg
    from kvagents.retrieval.index import KVIndex
    path = sys.argv[1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60000, 32)).astype(np.float32)
    version = 1
    while True:
        index = KVIndex(32, "l2", backend="faiss")
        index.add(x + version, ids=[str(i) for i in range(len(x))], metadatas=[{"v": version}] * len(x))
        print(version, flush=True)
        index.save(path)
        version += 1
    """
)


def test_killed_saves_always_leave_a_loadable_index(tmp_path):
    """SIGKILL a process that keeps re-saving the index, 24 times at random moments: the file always loads intact."""
    path = tmp_path / "crash.kvx"
    x = np.random.default_rng(0).normal(size=(60000, 32)).astype(np.float32)
    first = KVIndex(32, "l2")
    first.add(x, ids=[str(i) for i in range(len(x))], metadatas=[{"v": 0}] * len(x))
    first.save(path)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    seen_versions = set()
    for _ in range(24):
        pkg_dir = str(Path(__file__).resolve().parents[1] / "kvagents")
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path), pkg_dir], stdout=subprocess.PIPE, env=env,
                                text=True)
        proc.stdout.readline()  # the first index is built; saving starts now
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = KVIndex.load(path)  # never raises
        version = loaded.get(["0"])[0].metadata["v"]
        np.testing.assert_array_equal(loaded.get(["5"])[0].vector, x[5] + version)
        assert len(loaded) == len(x)
        seen_versions.add(version)
    for leftover in tmp_path.glob(".crash.kvx.tmp-*"):  # killed writers leave temp files; never the target
        leftover.unlink()
    assert len(seen_versions) >= 2  # the kills did land at different points of the save loop
