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
MAX_NORM = 1e18  # ip / l2: rows and queries above this norm would give float32 scores of inf
MAX_DEPTH = 100  # metadata nested deeper is refused (JSON readers recurse)
_CHUNK = 65536  # rows normalised at a time


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


def _as_matrix(vectors: Any, dim: int, what: str = "vectors", metric: str | None = None) -> np.ndarray:
    """float32 C-contiguous ``[n, dim]`` from numpy / torch / lists; 1-D input becomes one row, ``[]`` no rows.

    Refuses non-real input, NaN / inf and the wrong width. ``metric="cosine"`` returns unit rows (normalised in
    float64, so a float64 ``1e300`` row keeps its direction); ``"ip"`` / ``"l2"`` refuse rows whose norm exceeds
    :data:`MAX_NORM`, where float32 scores would overflow to inf."""
    if hasattr(vectors, "detach"):  # torch.Tensor without importing torch here
        t = vectors.detach().cpu()
        if t.is_complex():
            raise KVIndexError(f"{what} must be real numbers, got a {t.dtype} tensor; pass the real part or the norm")
        vectors = (t.double() if t.dtype.is_floating_point and t.element_size() >= 8 else t.float()).numpy()
    try:
        x = np.asarray(vectors)
    except (TypeError, ValueError) as e:
        raise KVIndexError(f"{what} must be a numeric array [n, {dim}]; got {type(vectors).__name__}: {e}") from e
    if x.dtype.kind in "cSU":
        raise KVIndexError(f"{what} must be a numeric array [n, {dim}] of real numbers; got {x.dtype} values "
                           f"such as {x.ravel()[:1].tolist()!r}: convert them to floats first")
    if x.dtype.kind not in "biuf":
        try:
            x = x.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise KVIndexError(f"{what} must be a numeric array [n, {dim}] of real numbers; {e}") from e
    if x.ndim == 1:
        x = x.reshape(0, dim) if x.size == 0 else x[None, :]  # [] = no rows
    if x.ndim != 2 or x.shape[1] != dim:
        raise KVIndexError(f"{what} must have shape [n, {dim}] (the index dimension); got {tuple(x.shape)}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).argmax())
        raise KVIndexError(f"{what} row {bad} contains NaN or inf; refusing to index it")
    if metric == "cosine":
        return _normalize(x)
    if x.dtype.kind == "f" and x.dtype.itemsize > 4 and len(x) and np.abs(x).max() > np.finfo(np.float32).max:
        bad = int((np.abs(x) > np.finfo(np.float32).max).any(axis=1).argmax())
        raise KVIndexError(f"{what} row {bad} holds values beyond float32 range ({np.abs(x[bad]).max():.3g}); "
                           "scale the vectors down (or use metric='cosine', which keeps only their direction)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric in ("ip", "l2") and len(x):
        norms = _norms(x)
        if (norms > MAX_NORM).any():
            bad = int((norms > MAX_NORM).argmax())
            raise KVIndexError(f"{what} row {bad} has norm {norms[bad]:.3g}; {metric} scores of vectors above norm "
                               f"{MAX_NORM:.0e} overflow float32 to inf: scale the vectors down (or use "
                               "metric='cosine')")
    return x


def _norms(x: np.ndarray) -> np.ndarray:
    """Row norms in float64 without overflow (each row divided by its largest magnitude first)."""
    out = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), _CHUNK):
        c = x[start: start + _CHUNK].astype(np.float64)
        scale = np.abs(c).max(axis=1) if c.shape[1] else np.zeros(len(c))
        safe = np.where(scale > 0, scale, 1.0)
        out[start: start + _CHUNK] = np.linalg.norm(c / safe[:, None], axis=1) * scale
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    """Unit rows as float32 (zero rows stay zero): each row is divided by its largest magnitude first and the
    norm taken in float64, so huge or tiny values neither overflow nor underflow (``[1e20, 1e20]`` ->
    ``[0.707, 0.707]``). Works in chunks of rows, so the float64 scratch stays small."""
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        c = x[start: start + _CHUNK].astype(np.float64)
        scale = np.abs(c).max(axis=1, keepdims=True) if c.shape[1] else np.zeros((len(c), 1))
        c /= np.where(scale > 0, scale, 1.0)
        norms = np.linalg.norm(c, axis=1, keepdims=True)
        out[start: start + _CHUNK] = c / np.where(norms > 0, norms, 1.0)
    return out


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
    return [_utf8(str.__str__(i), "id") for i in out]  # str subclasses (numpy.str_) become plain str


def _utf8(s: str, where: str) -> str:
    """``s`` unless it cannot be written as UTF-8 (a lone surrogate such as ``'\\ud800'``): refused when added,
    not when a later save fails."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise KVIndexError(f"{where} {s!r} holds a lone surrogate at position {e.start}, which cannot be saved "
                               "as UTF-8; fix the string (e.g. decode its bytes with errors='replace')") from None
    return s


def _check_list(value: Any, name: str) -> list:
    """``texts`` / ``metadatas`` as a list: one value per vector, so a bare string or dict is refused."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise KVIndexError(f"{name} must be a list with one entry per vector; got {type(value).__name__} "
                           f"{value!r} (for one vector pass [{value!r}])")
    return list(value)


def _json_value(value: Any, where: str, depth: int = 0) -> Any:
    """A copy of ``value`` made of JSON types that round-trips a save / load exactly; refuses anything else."""
    if value is None or isinstance(value, (bool, str)):
        return _utf8(str.__str__(value), where) if isinstance(value, str) else value
    if isinstance(value, (np.bool_, np.integer, np.floating, np.str_)) and not isinstance(value.item(), np.generic):
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
        return _utf8(str.__str__(value), where)
    if isinstance(value, (list, dict)) and depth >= MAX_DEPTH:
        where = where if len(where) < 120 else where[:100] + "..."
        raise KVIndexError(f"{where} is nested deeper than {MAX_DEPTH} lists / dicts; flatten it (e.g. store a "
                           "JSON string)")
    if isinstance(value, list):
        return [_json_value(v, f"{where}[{j}]", depth + 1) for j, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise KVIndexError(f"{where} has key {key!r} ({type(key).__name__}); metadata keys must be "
                                   "strings (a save / load turns other keys into strings)")
            out[_utf8(str.__str__(key), f"{where} key")] = _json_value(v, f"{where}[{key!r}]", depth + 1)
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


def _copy_json(value: Any) -> Any:
    """Deep copy of stored metadata, so a caller changing a hit's metadata cannot change the index."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def _matches(filter: Filter, metadata: dict[str, Any]) -> bool:
    if filter is None:
        return True
    if callable(filter):
        return bool(filter(metadata))
    for key, want in filter.items():
        if key not in metadata:  # a missing key matches nothing, not even None
            return False
        have = metadata[key]
        if isinstance(want, (list, tuple, set, frozenset)):
            if not any(have == w for w in want):  # by equality: a list value is unhashable, so no `in set`
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
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or not 0 < dim < 2**31:
            raise KVIndexError(f"dim must be a positive int (below 2**31), got {dim!r} ({type(dim).__name__})")
        dim = int(dim)
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
        return _as_matrix(vectors, self.dim, what, self.metric)

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
        x, ids, texts, metadatas = self._checked(vectors, ids, texts, metadatas, "add")
        dupes = [i for i in ids if i in self._labels]
        if dupes:
            raise KVIndexError(f"ids already in the index: {dupes[:5]}; use upsert() to replace them")
        return self._add_checked(x, ids, texts, metadatas)

    def _checked(self, vectors, ids, texts, metadatas, what: str):
        """Every argument of add / upsert checked before anything changes: (vectors, ids, texts, metadatas)."""
        x = self._prepare(vectors)
        n = len(x)
        ids = [uuid.uuid4().hex for _ in range(n)] if ids is None else _check_ids(ids, what)
        texts = None if texts is None else _check_list(texts, "texts")
        metadatas = None if metadatas is None else _check_list(metadatas, "metadatas")
        self._check_lengths(n, ids, texts, metadatas)
        texts = None if texts is None else self._check_texts(texts, ids)
        metadatas = None if metadatas is None else [_check_metadata(md, i) for md, i in zip(metadatas, ids)]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            rep = [i for i in ids if i in seen or seen.add(i)]
            raise KVIndexError(f"ids repeated within one {what}(): {rep[:5]}; give each entry its own id")
        return x, ids, texts, metadatas

    def _add_checked(self, x: np.ndarray, ids: list[str], texts, metadatas) -> list[str]:
        n = len(x)
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
        return [None if t is None else _utf8(str.__str__(t), f"text of id {id_!r}") for t, id_ in zip(texts, ids)]

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
        """Add or replace by id: vector, text and metadata of an existing id are all replaced.

        Everything is checked first: a refused argument leaves the existing entries as they were."""
        if ids is None:
            raise KVIndexError("upsert() needs ids (a list of strings naming the entries to add or replace)")
        x, ids, texts, metadatas = self._checked(vectors, ids, texts, metadatas, "upsert")
        self.delete([i for i in ids if i in self._labels])
        return self._add_checked(x, ids, texts, metadatas)

    def delete(self, ids: Iterable[str]) -> int:
        """Delete by id (a list of strings); unknown ids are ignored. Returns how many entries were removed."""
        labels = [self._labels.pop(i) for i in dict.fromkeys(_check_ids(ids, "delete")) if i in self._labels]
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
        """Records for ``ids`` (a list of strings) in the order asked; unknown ids are skipped."""
        out = []
        for i in _check_ids(ids, "get"):
            label = self._labels.get(i)
            if label is not None:
                out.append(IndexRecord(self._ids[label], self._store[self._rows[label]].copy(), self._texts[label],
                                       _copy_json(self._metadata[label])))
        return out

    def _allowed(self, filter: Filter) -> np.ndarray | None:
        """Labels passing ``filter`` (None = everything alive and no tombstones to hide)."""
        if filter is None:
            if not self._tombstones:
                return None
            return np.fromiter(self._ids.keys(), dtype=np.int64, count=len(self._ids))
        if not (callable(filter) or isinstance(filter, dict)):
            raise KVIndexError(f"filter must be a dict of metadata values or a callable, got {type(filter).__name__}")
        bad_keys = [key for key in filter if not isinstance(key, str)] if isinstance(filter, dict) else []
        if bad_keys:
            raise KVIndexError(f"filter key {bad_keys[0]!r} ({type(bad_keys[0]).__name__}) can never match: metadata "
                               f"keys are strings; use {str(bad_keys[0])!r}")
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
            hits.append(SearchHit(self._ids[lab], float(s), self._texts[lab], _copy_json(self._metadata[lab])))
            if len(hits) == k:
                break
        return hits

    def search(self, query: Any, k: int = 4, *, filter: Filter = None) -> list[SearchHit]:
        """Top-``k`` hits for one query vector ``[dim]``, best first.

        ``filter``: a dict (each key must be present and equal the metadata value, or be in it when the value is
        a list; ``{"k": None}`` matches only entries whose ``k`` is None) or a callable on the metadata dict.
        ``k``: an int >= 1 (numpy ints too, bool refused), capped at the number of entries.
        """
        q = _as_matrix(query, self.dim, "query", self.metric)
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
        q = _as_matrix(query, self.dim, "query", "cosine")[0]
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

    @staticmethod
    def _check_stored_entries(path: Path, records: dict[str, Any]) -> None:
        """The stored ids, texts and metadata obey what :meth:`add` accepts (so the loaded index saves again)."""
        try:
            for id_, text, md in zip(records["ids"], records["texts"], records["metadatas"]):
                _utf8(id_, "id")
                if text is not None:
                    _utf8(text, f"text of id {id_!r}")
                _check_metadata(md, id_)
        except KVIndexError as e:
            raise IndexFormatError(f"{path} is not a consistent index file: {e}") from e

    @classmethod
    def load(cls, path: str | Path, *, encoder_identity: dict[str, Any] | None = None, dim: int | None = None,
             device: str | Sequence[str] = "cpu", backend: Literal["auto", "faiss", "torch"] = "auto") -> KVIndex:
        """Load a saved index; refuses a corrupt / truncated / inconsistent file (:class:`IndexFormatError` naming
        the file and what disagrees), a newer format, or an encoder / dimension that differs from
        ``encoder_identity`` / ``dim`` (each a subclass of :class:`KVIndexError`). Stored ids, texts and metadata
        must obey what :meth:`add` accepts. Indexes rebuilt from their vectors (the torch backends, or a file
        without a faiss section) are renumbered 0..n-1, so no allocation follows a stored label."""
        path = Path(path)
        header, records, faiss_bytes, vectors = read_index_file(path, encoder_identity=encoder_identity, dim=dim)
        stored_dim = int(header["dim"])
        factory = header.get("factory")
        flat = factory in (None, "Flat")
        if not flat and not faiss_bytes:
            raise IndexFormatError(f"{path} is not a consistent index file: factory {factory!r} needs the faiss "
                                   "section (it holds the trained index) but the file has none")
        cls._check_stored_entries(path, records)
        try:
            if not flat:  # never build the header's factory: a crafted one ("IVF1000000000,Flat") would allocate
                # before the faiss section is read; check where it may run, then build a flat placeholder
                devices = list(device) if isinstance(device, (list, tuple)) else [device]
                if len(devices) > 1:
                    raise KVIndexError(f"factory {factory!r} needs one device, not {devices}")
                backend_name = cls._pick_backend(backend, factory, str(devices[0]))
            index = cls(stored_dim, header["metric"], factory=None if not flat else factory, device=device,
                        backend=backend, encoder_identity=header.get("encoder_identity"))
        except KVIndexError as e:
            if isinstance(e, IndexFormatError) or "factory" not in str(e):
                raise
            raise IndexFormatError(f"{path} is not a consistent index file: {e}") from e
        if not flat:
            index.factory, index.backend_name = factory, backend_name
        labels = list(records["labels"])
        tombstones = list(records["tombstones"])
        if index.backend_name.startswith("faiss") and faiss_bytes:  # faiss holds the labels: keep them
            problem = _FaissBackend.layout_mismatch(faiss_bytes, stored_dim, len(labels) + len(tombstones))
            if problem:
                raise IndexFormatError(f"{path} is not a consistent index file: {problem}")
            try:
                index._backend = _FaissBackend.from_bytes(
                    np.frombuffer(faiss_bytes, dtype=np.uint8), stored_dim, header["metric"], factory,
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
