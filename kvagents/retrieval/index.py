"""A vector index over KV embeddings (or any embeddings): faiss on the CPU, faiss or exact torch search on the GPU.

``KVIndex`` keeps string ids, optional texts and metadata next to the vectors, supports add / upsert / delete /
get / search (k, metadata filter, batches) / MMR, and persists without pickle (see :mod:`kvagents.retrieval.index_file`).

Example:
    >>> import numpy as np
    >>> from kvagents import KVIndex
    >>> index = KVIndex(dim=4, metric="cosine")
    >>> index.add(np.eye(4, dtype="float32"), ids=["a", "b", "c", "d"], metadatas=[{"n": i} for i in range(4)])
    ['a', 'b', 'c', 'd']
    >>> [hit.id for hit in index.search(np.array([1.0, 0.1, 0, 0]), k=2)]
    ['a', 'b']
    >>> index.delete(["a", "zzz"])  # unknown ids are ignored; the count of removed ones comes back
    1

Design:
    * Every vector gets an int64 *label* (sequential, never reused) that faiss sees; ``IndexIDMap2`` maps labels
      to rows. Upsert = delete + add under a new label, so approximate indexes never hold stale codes.
    * A host copy of the (normalised, for cosine) float32 vectors is kept by label: ``get``, MMR and saving
      need exact vectors, which IVF-PQ cannot give back.
    * Metric ``cosine`` normalises vectors and queries and searches by inner product; scores are similarities
      (higher is better) for ``cosine`` / ``ip`` and squared L2 distances (lower is better) for ``l2``.
    * Filters are applied *before* the search: a filter that matches at most ``exact_filter_limit`` (2048) rows is
      answered by an exact scan of those rows; otherwise faiss searches with an ``IDSelector`` where the index
      accepts one (flat, IVF, HNSW through ``IndexIDMap2``), as does the torch backend; indexes that do not
      (PQ, LSH) are searched with over-fetch (k x 4, doubling up to the whole index) and filtered after.
    * Backends: ``"faiss"`` (CPU, any factory string), ``"torch"`` (exact, on any torch device: the GPU path when
      faiss has no GPUs — faiss-gpu wheels on PyPI are built for CUDA 12), ``"auto"`` (faiss on CPU; on CUDA
      faiss GPU if the installed faiss has GPUs, else torch).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .backends import Metric, _faiss, _FaissBackend, _ShardedTorchBackend, _TorchBackend
from .errors import IndexFormatError, KVIndexError
from .index_file import read_index_file, write_index_file

Filter = dict[str, Any] | Callable[[dict[str, Any]], bool] | None
METRICS = ("cosine", "ip", "l2")


@dataclass(frozen=True)
class SearchHit:
    """One search result. ``score``: similarity for cosine / ip (higher is better), squared L2 distance for l2."""

    id: str
    score: float
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexRecord:
    """A stored entry as returned by :meth:`KVIndex.get` (the vector is normalised when the metric is cosine)."""

    id: str
    vector: np.ndarray
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _as_matrix(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """float32 C-contiguous ``[n, dim]`` from numpy / torch / lists; 1-D input becomes one row."""
    if hasattr(vectors, "detach"):  # torch.Tensor without importing torch here
        vectors = vectors.detach().float().cpu().numpy()
    try:
        x = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise KVIndexError(f"{what} must be a numeric array [n, {dim}]; got {type(vectors).__name__}: {e}") from e
    if x.ndim == 1:
        x = x.reshape(0, dim) if x.size == 0 else x[None, :]  # [] = no rows
    if x.ndim != 2 or x.shape[1] != dim:
        raise KVIndexError(f"{what} must have shape [n, {dim}] (the index dimension); got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).argmax())
        raise KVIndexError(f"{what} row {bad} contains NaN or inf; refusing to index it")
    return np.ascontiguousarray(x)


def _normalize(x: np.ndarray) -> np.ndarray:
    """Unit rows (zero rows stay zero); scaled by the max-abs first so huge or tiny values neither overflow nor
    underflow in float32 (``[1e20, 1e20]`` -> ``[0.707, 0.707]``)."""
    scale = np.abs(x).max(axis=1, keepdims=True) if x.size else np.ones((len(x), 1), np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    y = x / scale
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return (y / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _check_k(k: Any, name: str = "k") -> int:
    """``k`` as a Python int >= 1 (numpy ints accepted; bool, float and the rest refused)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise KVIndexError(f"{name} must be a positive int, got {k!r} ({type(k).__name__})")
    return int(k)


def _check_ids(ids: Any, what: str = "add") -> list[str]:
    """The ids as a list of str; a bare string, or any id that is not a str, is refused."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        hint = f" (for one id pass a list such as [{ids!r}])" if isinstance(ids, str) else ""
        raise KVIndexError(f"ids must be a list of strings; {what}() got {type(ids).__name__} {ids!r}{hint}")
    out = list(ids)
    for i in out:
        if not isinstance(i, str):
            raise KVIndexError(f"ids must be strings; got {i!r} ({type(i).__name__}); pass a list of strings "
                               f"such as [str(x) for x in ids]")
    return [str(i) for i in out]  # str subclasses (numpy.str_) become plain str


def _json_value(value: Any, where: str) -> Any:
    """A copy of ``value`` made of JSON types that round-trips a save / load exactly; refuses anything else."""
    if value is None or isinstance(value, (bool, str)):
        return str(value) if isinstance(value, str) else value
    if isinstance(value, np.generic) and isinstance(value, (np.bool_, np.integer, np.floating, np.str_)):
        value = value.item()  # numpy scalars are stored as the equal Python value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not np.isfinite(value):
            raise KVIndexError(f"{where} is {value!r}: NaN / inf cannot be saved; store None or a string instead")
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [_json_value(v, f"{where}[{j}]") for j, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise KVIndexError(f"{where} has key {key!r} ({type(key).__name__}); metadata keys must be "
                                   "strings (a save / load turns other keys into strings)")
            out[str(key)] = _json_value(v, f"{where}[{key!r}]")
        return out
    hint = " (use a list)" if isinstance(value, (tuple, set, frozenset)) else ""
    raise KVIndexError(f"{where} is {value!r} ({type(value).__name__}): metadata values must be JSON types "
                       f"(None, bool, int, float, str, list, dict) so they survive a save / load unchanged{hint}")


def _check_metadata(md: Any, id_: str) -> dict[str, Any]:
    if md is None:
        return {}
    if not isinstance(md, dict):
        raise KVIndexError(f"metadata of id {id_!r} must be a dict (or None), got {type(md).__name__} {md!r}")
    return _json_value(md, f"metadata of id {id_!r}")


def _matches(filter: Filter, metadata: dict[str, Any]) -> bool:
    if filter is None:
        return True
    if callable(filter):
        return bool(filter(metadata))
    for key, want in filter.items():
        if key not in metadata:  # a missing key matches nothing, not even None
            return False
        have = metadata[key]
        if isinstance(want, (list, tuple, set)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


class KVIndex:
    """Vector index with string ids, texts and metadata; faiss (CPU / GPU) or exact torch search.

    Args:
        dim: vector dimension (``encoder.get_sentence_embedding_dimension()``).
        metric: ``"cosine"`` (default), ``"ip"`` (inner product) or ``"l2"``.
        factory: a faiss factory string for large collections (``"IVF1024,Flat"``, ``"HNSW32"``,
            ``"IVF256,PQ16"``); ``None`` = exact (``"Flat"``). Indexes that need training must be ``train``-ed
            (or are trained on the first ``add`` when it brings enough vectors).
        device: ``"cpu"``, a CUDA device (see ``backend``), or a list of devices (``["cuda:0", "cuda:1"]``): the
            rows are spread over them (label modulo the count), each searched exactly, and the top-k merged.
        backend: ``"auto"``, ``"faiss"`` or ``"torch"`` (exact search with torch on ``device``).
        encoder_identity: what produced the vectors (``encoder.identity``); stored on save, checked on load.

    Example:
        >>> index = KVIndex(dim=2, metric="l2")
        >>> index.add([[0.0, 0.0], [3.0, 4.0]], ids=["o", "p"], texts=["origin", "far"])
        ['o', 'p']
        >>> hit = index.search([3.0, 3.0], k=1)[0]
        >>> hit.id, hit.score, hit.text
        ('p', 1.0, 'far')
    """

    def __init__(
        self,
        dim: int,
        metric: Metric = "cosine",
        *,
        factory: str | None = None,
        device: str | Sequence[str] = "cpu",
        backend: Literal["auto", "faiss", "torch"] = "auto",
        encoder_identity: dict[str, Any] | None = None,
    ):
        if not isinstance(dim, int) or dim <= 0:
            raise KVIndexError(f"dim must be a positive int, got {dim!r}")
        if metric not in METRICS:
            raise KVIndexError(f"unknown metric {metric!r}; use one of {METRICS}")
        if backend not in ("auto", "faiss", "torch"):
            raise KVIndexError(f"unknown backend {backend!r}; use 'auto', 'faiss' or 'torch'")
        self.devices = [str(d) for d in device] if isinstance(device, (list, tuple)) else [str(device)]
        if not self.devices:
            raise KVIndexError("device list is empty")
        self.dim, self.metric, self.factory, self.device = dim, metric, factory, self.devices[0]
        self.encoder_identity = dict(encoder_identity) if encoder_identity else None
        if len(self.devices) > 1:
            if factory not in (None, "Flat") or backend == "faiss":
                raise KVIndexError(
                    f"an index over several devices {self.devices} is exact torch search per device; "
                    f"factory={factory!r} / backend={backend!r} need one device (faiss-gpu shards with device='cuda')"
                )
            self.backend_name = "torch-sharded"
        else:
            self.backend_name = self._pick_backend(backend, factory, self.device)
        self._backend = self._make_backend()
        self._labels: dict[str, int] = {}  # id -> label
        self._ids: dict[int, str] = {}  # label -> id
        self._texts: dict[int, str | None] = {}
        self._metadata: dict[int, dict[str, Any]] = {}
        self._store = np.zeros((0, dim), dtype=np.float32)  # vectors by row (rows of deleted labels are not reused)
        self._rows: dict[int, int] = {}  # label -> row of _store
        self._nrows = 0
        self._next_label = 0
        self._tombstones: set[int] = set()  # removed labels an index type could not remove (HNSW)
        self.exact_filter_limit = 2048  # a filter matching at most this many rows is answered by an exact scan

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _pick_backend(backend: str, factory: str | None, device: str) -> str:
        on_cuda = device.startswith("cuda")
        if backend == "torch":
            if factory not in (None, "Flat"):
                raise KVIndexError(f"the torch backend is exact only; factory {factory!r} needs backend='faiss'")
            return "torch"
        if backend == "faiss":
            return "faiss-gpu" if on_cuda else "faiss"
        if not on_cuda:
            return "faiss"
        faiss = _faiss()
        if faiss.get_num_gpus() > 0:
            return "faiss-gpu"
        if factory not in (None, "Flat"):
            return "faiss"  # approximate index stays on faiss-cpu
        return "torch"

    def _make_backend(self):
        if self.backend_name == "torch-sharded":
            return _ShardedTorchBackend(self.dim, self.metric, self.devices)
        if self.backend_name == "torch":
            return _TorchBackend(self.dim, self.metric, self.device)
        if self.backend_name == "faiss-gpu" and _faiss().get_num_gpus() == 0:
            raise KVIndexError(
                f"device={self.device!r} with backend='faiss' needs a faiss build with GPUs (this one has none); "
                "use backend='torch' or 'auto' for exact search on the GPU"
            )
        return _FaissBackend(self.dim, self.metric, self.factory, use_gpu=self.backend_name == "faiss-gpu")

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return len(self._labels)

    @property
    def ntotal(self) -> int:
        return len(self._labels)

    @property
    def ids(self) -> list[str]:
        return list(self._labels)

    @property
    def is_trained(self) -> bool:
        return bool(self._backend.is_trained)

    def __contains__(self, id: str) -> bool:
        return id in self._labels

    def __repr__(self) -> str:
        return (f"KVIndex(dim={self.dim}, metric={self.metric!r}, factory={self.factory!r}, "
                f"backend={self.backend_name!r}, ntotal={self.ntotal})")

    # ------------------------------------------------------------------ writes
    def _prepare(self, vectors: Any, what: str = "vectors") -> np.ndarray:
        x = _as_matrix(vectors, self.dim, what)
        return _normalize(x) if self.metric == "cosine" else x

    def train(self, vectors: Any) -> None:
        """Train an approximate index (IVF / PQ) on representative vectors; a no-op for exact indexes."""
        self._backend.train(self._prepare(vectors))

    def add(
        self,
        vectors: Any,
        *,
        ids: Sequence[str] | None = None,
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[str]:
        """Add vectors ``[n, dim]`` (numpy, torch or lists). Ids default to fresh uuid4 hex strings.

        ``ids`` must be a list of ``str`` (other types, ``None`` and a bare string are refused, not converted);
        each metadata must be a dict with ``str`` keys and JSON values (None, bool, int, finite float, str, list,
        dict; numpy scalars become the equal Python value) so that it round-trips a save / load exactly —
        tuples, sets, non-str keys and NaN / inf are refused here, naming the id and key. No rows (``[]`` or
        ``[0, dim]``) adds nothing and returns ``[]``.

        Raises KVIndexError for an id that is already present (use :meth:`upsert`) or repeated in the call.
        """
        x = self._prepare(vectors)
        n = len(x)
        ids = [uuid.uuid4().hex for _ in range(n)] if ids is None else _check_ids(ids)
        self._check_lengths(n, ids, texts, metadatas)
        texts = None if texts is None else self._check_texts(texts, ids)
        metadatas = None if metadatas is None else [_check_metadata(md, i) for md, i in zip(metadatas, ids)]
        dupes = [i for i in ids if i in self._labels]
        if dupes:
            raise KVIndexError(f"ids already in the index: {dupes[:5]}; use upsert() to replace them")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            rep = [i for i in ids if i in seen or seen.add(i)]
            raise KVIndexError(f"ids repeated within one add(): {rep[:5]}")
        if n == 0:
            return []
        if not self._backend.is_trained:  # first add to an untrained IVF / PQ index trains it on these vectors
            self._backend.train(x)
        labels = np.arange(self._next_label, self._next_label + n, dtype=np.int64)
        self._backend.add(labels, x)
        self._next_label += n
        start = self._nrows
        if self._store.shape[0] < start + n:
            grown = np.zeros((max(start + n, 2 * self._store.shape[0]), self.dim), dtype=np.float32)
            grown[:start] = self._store[:start]
            self._store = grown
        self._store[start: start + n] = x
        self._nrows += n
        for j, (label, id_) in enumerate(zip(labels.tolist(), ids)):
            self._labels[id_] = label
            self._ids[label] = id_
            self._rows[label] = start + j
            self._texts[label] = texts[j] if texts is not None else None
            self._metadata[label] = metadatas[j] if metadatas is not None else {}
        return ids

    @staticmethod
    def _check_texts(texts: Any, ids: list[str]) -> list[str | None]:
        if isinstance(texts, str):
            raise KVIndexError(f"texts must be a list of strings (or None); got the string {texts!r}")
        texts = list(texts)
        for t, id_ in zip(texts, ids):
            if t is not None and not isinstance(t, str):
                raise KVIndexError(f"text of id {id_!r} must be a str or None, got {type(t).__name__} {t!r}")
        return [None if t is None else str(t) for t in texts]

    def _vectors_of(self, labels: Any) -> np.ndarray:
        """Stored vectors of ``labels`` (an int sequence), in that order."""
        rows = np.fromiter((self._rows[int(label)] for label in labels), dtype=np.int64)
        return self._store[rows]

    def upsert(
        self,
        vectors: Any,
        *,
        ids: Sequence[str],
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[str]:
        """Add or replace by id: vector, text and metadata of an existing id are all replaced."""
        ids = _check_ids(ids, "upsert")
        x = self._prepare(vectors)
        self._check_lengths(len(x), ids, texts, metadatas)
        if len(set(ids)) != len(ids):
            raise KVIndexError("ids repeated within one upsert()")
        self.delete([i for i in ids if i in self._labels])
        return self.add(x, ids=ids, texts=texts, metadatas=metadatas)

    def delete(self, ids: Iterable[str]) -> int:
        """Delete by id; unknown ids are ignored. Returns how many entries were removed."""
        labels = [self._labels.pop(str(i)) for i in dict.fromkeys(ids) if str(i) in self._labels]
        if not labels:
            return 0
        arr = np.asarray(labels, dtype=np.int64)
        if not self._backend.remove(arr):
            self._tombstones.update(labels)
        for label in labels:
            del self._ids[label], self._texts[label], self._metadata[label], self._rows[label]
        return len(labels)

    @staticmethod
    def _check_lengths(n, ids, texts, metadatas) -> None:
        for name, seq in (("ids", ids), ("texts", texts), ("metadatas", metadatas)):
            if seq is not None and len(seq) != n:
                raise KVIndexError(f"{name} has {len(seq)} entries for {n} vectors")

    # ------------------------------------------------------------------ reads
    def get(self, ids: Iterable[str]) -> list[IndexRecord]:
        """Records for ``ids`` in the order asked; unknown ids are skipped."""
        out = []
        for i in ids:
            label = self._labels.get(str(i))
            if label is not None:
                out.append(IndexRecord(self._ids[label], self._store[self._rows[label]].copy(), self._texts[label],
                                       dict(self._metadata[label])))
        return out

    def _allowed(self, filter: Filter) -> np.ndarray | None:
        """Labels passing ``filter`` (None = everything alive and no tombstones to hide)."""
        if filter is None:
            if not self._tombstones:
                return None
            return np.fromiter(self._ids.keys(), dtype=np.int64, count=len(self._ids))
        if not (callable(filter) or isinstance(filter, dict)):
            raise KVIndexError(f"filter must be a dict of metadata values or a callable, got {type(filter).__name__}")
        return np.asarray([label for label, md in self._metadata.items() if _matches(filter, md)], dtype=np.int64)

    def search_batch(self, queries: Any, k: int = 4, *, filter: Filter = None) -> list[list[SearchHit]]:
        """Top-``k`` hits for each query row ``[q, dim]``, best first; fewer when fewer entries match."""
        k = _check_k(k)
        q = self._prepare(queries, "queries")
        allowed = self._allowed(filter)
        if len(self._labels) == 0 or (allowed is not None and len(allowed) == 0):
            return [[] for _ in range(len(q))]
        k = min(k, len(self._labels) if allowed is None else len(allowed))  # never allocate beyond the rows
        if allowed is not None and not self.backend_name.startswith("torch") and len(allowed) <= self.exact_filter_limit:
            scores, labels = self._exact_subset(q, k, allowed)  # few matches: exact scan of just those rows
        else:
            try:
                scores, labels = self._backend.search(q, k, allowed)
            except NotImplementedError:  # the index cannot pre-filter: over-fetch, then post-filter
                scores, labels = self._post_filtered(q, k, set(allowed.tolist()))
        return [self._hits(s, lab, k) for s, lab in zip(scores, labels)]

    def _exact_subset(self, q: np.ndarray, k: int, allowed: np.ndarray):
        x = self._vectors_of(allowed.tolist())
        if self.metric == "l2":
            scores = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
            order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        else:
            scores = q @ x.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), allowed[order]

    def _post_filtered(self, q: np.ndarray, k: int, allowed: set[int]):
        total = len(self._labels) + len(self._tombstones)  # rows the backend holds
        fetch = min(max(4 * k, k), total)
        while True:
            scores, labels = self._backend.search(q, fetch, None)
            keep_s = np.full((len(q), k), np.nan, dtype=np.float32)
            keep_l = np.full((len(q), k), -1, dtype=np.int64)
            done = True
            for r in range(len(q)):
                ok = [j for j, lab in enumerate(labels[r]) if lab in allowed][:k]
                keep_s[r, : len(ok)], keep_l[r, : len(ok)] = scores[r, ok], labels[r, ok]
                if len(ok) < k and fetch < total:
                    done = False
            if done:
                return keep_s, keep_l
            fetch = min(2 * fetch, total)

    def _hits(self, scores: np.ndarray, labels: np.ndarray, k: int) -> list[SearchHit]:
        hits = []
        for s, lab in zip(scores.tolist(), labels.tolist()):
            if lab < 0 or lab not in self._ids or lab in self._tombstones:
                continue
            hits.append(SearchHit(self._ids[lab], float(s), self._texts[lab], dict(self._metadata[lab])))
            if len(hits) == k:
                break
        return hits

    def search(self, query: Any, k: int = 4, *, filter: Filter = None) -> list[SearchHit]:
        """Top-``k`` hits for one query vector ``[dim]``, best first.

        ``filter``: a dict (each key must be present and equal the metadata value, or be in it when the value is
        a list; ``{"k": None}`` matches only entries whose ``k`` is None) or a callable on the metadata dict.
        ``k``: an int >= 1 (numpy ints too, bool refused), capped at the number of entries.
        """
        q = _as_matrix(query, self.dim, "query")
        if q.shape[0] != 1:
            raise KVIndexError(f"search() takes one query vector; got {q.shape[0]} rows (use search_batch)")
        return self.search_batch(q, k, filter=filter)[0]

    def mmr(self, query: Any, k: int = 4, *, fetch_k: int = 20, lambda_mult: float = 0.5,
            filter: Filter = None) -> list[SearchHit]:
        """Maximal marginal relevance: ``fetch_k`` nearest candidates, then greedily pick ``k`` that are relevant
        to the query (cosine) and unlike those already picked; ``lambda_mult`` 1 = relevance only, 0 = diversity only.
        """
        k, fetch_k = _check_k(k), _check_k(fetch_k, "fetch_k")
        if not isinstance(lambda_mult, (int, float, np.floating)) or not 0.0 <= lambda_mult <= 1.0:
            raise KVIndexError(f"lambda_mult must be in [0, 1], got {lambda_mult!r}")
        candidates = self.search(query, max(fetch_k, k), filter=filter)
        if not candidates:
            return []
        q = _normalize(_as_matrix(query, self.dim, "query"))[0]
        vecs = _normalize(self._vectors_of([self._labels[h.id] for h in candidates]))
        picked = maximal_marginal_relevance(q, vecs, k=k, lambda_mult=lambda_mult)
        return [candidates[i] for i in picked]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the index to one file atomically (temp file, fsync, rename): a crash keeps the previous file."""
        labels = sorted(self._ids)
        records = {
            "ids": [self._ids[label] for label in labels],
            "labels": labels,
            "texts": [self._texts[label] for label in labels],
            "metadatas": [self._metadata[label] for label in labels],
            "tombstones": sorted(self._tombstones),
            "next_label": self._next_label,
        }
        vectors = self._vectors_of(labels) if labels else np.zeros((0, self.dim), dtype=np.float32)
        faiss_bytes = self._backend.to_bytes().tobytes() if isinstance(self._backend, _FaissBackend) else b""
        meta = {"dim": self.dim, "metric": self.metric, "factory": self.factory,
                "encoder_identity": self.encoder_identity, "ntotal": self.ntotal}
        return write_index_file(Path(path), meta, records, faiss_bytes, vectors)

    @classmethod
    def load(cls, path: str | Path, *, encoder_identity: dict[str, Any] | None = None, dim: int | None = None,
             device: str | Sequence[str] = "cpu", backend: Literal["auto", "faiss", "torch"] = "auto") -> KVIndex:
        """Load a saved index; refuses a corrupt / truncated file, a newer format, or an encoder / dimension that
        differs from ``encoder_identity`` / ``dim`` (each a subclass of :class:`KVIndexError`)."""
        path = Path(path)
        header, records, faiss_bytes, vectors = read_index_file(path, encoder_identity=encoder_identity, dim=dim)
        stored_dim = int(header["dim"])
        try:
            index = cls(stored_dim, header["metric"], factory=header.get("factory"), device=device, backend=backend,
                        encoder_identity=header.get("encoder_identity"))
        except KVIndexError as e:
            if isinstance(e, IndexFormatError) or "factory" not in str(e):
                raise
            raise IndexFormatError(f"{path} is not a consistent index file: {e}") from e
        labels = list(records["labels"])
        tombstones = list(records["tombstones"])
        if isinstance(index._backend, _FaissBackend) and faiss_bytes:  # faiss holds the labels: keep them
            problem = _FaissBackend.layout_mismatch(faiss_bytes, stored_dim, len(labels) + len(tombstones))
            if problem:
                raise IndexFormatError(f"{path} is not a consistent index file: {problem}")
            try:
                index._backend = _FaissBackend.from_bytes(
                    np.frombuffer(faiss_bytes, dtype=np.uint8), stored_dim, header["metric"], header.get("factory"),
                    use_gpu=index.backend_name == "faiss-gpu",
                )
                problem = index._backend.mismatch(labels, tombstones, vectors)
            except (RuntimeError, MemoryError, ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
                problem = f"the faiss section cannot be read ({type(e).__name__}: {e})"
            if problem:
                raise IndexFormatError(f"{path} is not a consistent index file: {problem}")
            index._next_label = int(records["next_label"])
            index._tombstones = set(tombstones)
            if index._tombstones:
                index._backend.can_remove = False
        else:  # the vectors are added afresh: number them 0..n-1 (no allocation follows a stored label)
            labels = list(range(len(labels)))
            if labels:
                if not index._backend.is_trained:
                    index._backend.train(vectors)
                index._backend.add(np.asarray(labels, dtype=np.int64), vectors)
            index._next_label = len(labels)
        index._store = np.array(vectors, dtype=np.float32, copy=True).reshape(len(labels), stored_dim)
        index._nrows = len(labels)
        for row, (label, id_, text, md) in enumerate(zip(labels, records["ids"], records["texts"],
                                                         records["metadatas"])):
            index._labels[id_] = label
            index._ids[label] = id_
            index._rows[label] = row
            index._texts[label] = text
            index._metadata[label] = md
        return index


def maximal_marginal_relevance(query: np.ndarray, vectors: np.ndarray, k: int = 4,
                               lambda_mult: float = 0.5) -> list[int]:
    """Indices of ``k`` rows of ``vectors`` (unit norm) chosen by MMR against unit ``query`` (as LangChain does)."""
    if len(vectors) == 0 or k <= 0:
        return []
    rel = vectors @ query
    picked = [int(np.argmax(rel))]
    while len(picked) < min(k, len(vectors)):
        sim_to_picked = (vectors @ vectors[picked].T).max(axis=1)
        mmr = lambda_mult * rel - (1 - lambda_mult) * sim_to_picked
        mmr[picked] = -np.inf
        picked.append(int(np.argmax(mmr)))
    return picked
