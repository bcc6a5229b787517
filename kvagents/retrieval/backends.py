"""Search backends of :class:`~kvagents.retrieval.index.KVIndex`: faiss (CPU, optional GPU clone), exact torch
search on one device, and exact torch search sharded over several devices with the top-k merged.

Each backend stores vectors under int64 labels and answers ``search(q, k, allowed) -> (scores, labels)``.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .errors import KVIndexError

Metric = Literal["cosine", "ip", "l2"]


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - faiss-cpu is a test dependency
        raise ImportError("KVIndex needs faiss: pip install faiss-cpu (or kvagents[faiss])") from e
    return faiss


_LIMITS_LOCK = threading.Lock()
_LOOP_FLOOR = 1 << 20  # faiss loops of up to this many items (e.g. the lists of an empty IVF) are always allowed


def _deserialize_bounded(faiss, data: np.ndarray):
    """``faiss.deserialize_index`` with faiss's own deserialisation limits lowered to what ``data`` can hold: no
    vector it reads may be larger than the bytes given, no count-driven loop (IVF list counts, ...) longer than
    ``max(len(data), 2**20)``. A crafted count then fails with a RuntimeError instead of allocating. Faiss builds
    without these limits (before 1.14.2) read the bytes as they are."""
    if not hasattr(faiss, "set_deserialization_vector_byte_limit"):  # pragma: no cover - older faiss
        return faiss.deserialize_index(data)
    with _LIMITS_LOCK:  # the limits are process-wide: lower them only around this read, and only lower them
        old_bytes = faiss.get_deserialization_vector_byte_limit()
        old_loops = faiss.get_deserialization_loop_limit()
        faiss.set_deserialization_vector_byte_limit(min(old_bytes, len(data) + 64))
        loops = max(len(data), _LOOP_FLOOR)
        faiss.set_deserialization_loop_limit(loops if old_loops == 0 else min(old_loops, loops))
        try:
            return faiss.deserialize_index(data)
        finally:
            faiss.set_deserialization_vector_byte_limit(old_bytes)
            faiss.set_deserialization_loop_limit(old_loops)


def _kind_of_factory(faiss, factory: str, d: int, metric_type: int):
    """A small index of the same types as ``factory`` builds (every number in the factory clamped to 8, the
    dimension to at most 256), so comparing types never allocates what a crafted factory string asks for; if the
    shrunken factory does not build, the factory itself when its numbers and ``d`` are at most 4096; else None."""
    small = re.sub(r"(?<!fp)(?<!bf)(?<!SQ)\d+", lambda m: str(min(int(m.group()), 8)), factory)
    try:
        return faiss.index_factory(d if d <= 256 else 256, small, metric_type)
    except RuntimeError:
        pass
    if d <= 4096 and all(int(n) <= 4096 for n in re.findall(r"\d+", factory)):  # small enough to build as is
        try:
            return faiss.index_factory(d, factory, metric_type)
        except RuntimeError:
            pass
    return None


class _FaissBackend:
    """faiss index (``IndexIDMap2`` around a factory index) on the CPU; optional GPU clone for search."""

    def __init__(self, dim: int, metric: Metric, factory: str | None, use_gpu: bool = False):
        faiss = _faiss()
        self.faiss = faiss
        self.factory = factory or "Flat"
        faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        try:
            inner = faiss.index_factory(dim, self.factory, faiss_metric)
        except RuntimeError as e:
            raise KVIndexError(f"faiss cannot build factory string {self.factory!r}: {e}") from e
        # IVF indexes carry ids natively (and IndexIDMap over IVF breaks on removal); others get an IndexIDMap2
        native_ids = isinstance(faiss.downcast_index(inner), faiss.IndexIVF) or self.factory.startswith("IDMap")
        self.index = inner if native_ids else faiss.IndexIDMap2(inner)
        self.nprobe = 16
        self.ef_search = 64
        self.use_gpu = use_gpu
        self._gpu_index = None
        self.can_remove = True

    @classmethod
    def from_bytes(cls, data: np.ndarray, dim: int, metric: Metric, factory: str | None, use_gpu: bool = False):
        self = cls.__new__(cls)
        faiss = _faiss()
        self.faiss, self.factory, self.use_gpu, self._gpu_index = faiss, factory or "Flat", use_gpu, None
        self.nprobe, self.ef_search, self.can_remove = 16, 64, True
        self.index = _deserialize_bounded(faiss, data)
        if self.index.d != dim:
            raise KVIndexError(f"stored faiss index has dimension {self.index.d}, header says {dim}")
        self.metric = metric
        return self

    @staticmethod
    def layout_mismatch(data: bytes, dim: int, ntotal: int) -> str | None:
        """Check the serialised faiss header(s) before faiss reads them, so a crafted count cannot make faiss
        allocate more than the file holds: the outer (and ``IndexIDMap2``'s inner) ``d`` / ``ntotal``, and for
        ``IndexIDMap2`` over a flat index the exact length of every field. None when it agrees."""
        header = struct.Struct("<4siq")  # fourcc, d, ntotal: how every faiss index starts
        if len(data) < header.size:
            return f"the faiss section has {len(data)} bytes, too few for an index header"
        _, d, n = header.unpack_from(data)
        if d != dim or n != ntotal:
            return f"the faiss index header says d={d}, ntotal={n}; the records say d={dim}, ntotal={ntotal}"
        if data[:4] != b"IxM2" or len(data) < 37 + header.size:
            return None
        metric_type = struct.unpack_from("<i", data, 33)[0]
        inner = 37 + (4 if metric_type > 1 else 0)
        fourcc, d, n = header.unpack_from(data, inner)
        if d != dim or n != ntotal:
            return f"the inner faiss index header says d={d}, ntotal={n}; the records say d={dim}, ntotal={ntotal}"
        if fourcc in (b"IxFI", b"IxF2"):  # flat: header, codes (count, floats), id_map (count, int64s)
            codes_at = inner + 37
            want = codes_at + 8 + 4 * ntotal * dim + 8 + 8 * ntotal
            if len(data) != want:
                return f"the flat faiss section has {len(data)} bytes; {ntotal} x {dim}-d vectors need {want}"
            n_codes = struct.unpack_from("<Q", data, codes_at)[0]
            n_ids = struct.unpack_from("<Q", data, codes_at + 8 + 4 * ntotal * dim)[0]
            if n_codes != ntotal * dim or n_ids != ntotal:
                return f"the flat faiss section announces {n_codes} floats and {n_ids} ids for {ntotal} vectors"
        return None

    def mismatch(self, labels: list[int], tombstones: list[int], vectors: np.ndarray) -> str | None:
        """What disagrees between this (deserialised) faiss index and the stored labels / vectors, or None.

        Checks the index type and metric against a fresh one of the same factory, ``d`` and ``ntotal``, the ids
        faiss holds (``IndexIDMap2``), and for flat storage the stored codes against the vectors bit for bit."""
        faiss, index = self.faiss, self.index
        if index.d != vectors.shape[1]:
            return f"the faiss index has d={index.d}, the vectors section {vectors.shape[1]}"
        if index.ntotal != len(labels) + len(tombstones):
            return (f"the faiss index holds {index.ntotal} vectors, the records {len(labels)} labels and "
                    f"{len(tombstones)} tombstones")
        if index.ntotal > 0 and not index.is_trained:
            return f"the faiss index holds {index.ntotal} vectors but says it is not trained"
        metric_type = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if index.metric_type != metric_type:
            return f"the faiss index has metric type {index.metric_type}, the header says {self.metric!r}"
        small = _kind_of_factory(faiss, self.factory, index.d, metric_type)
        if small is None:
            return f"faiss cannot build the factory {self.factory!r} the header names"
        native = isinstance(faiss.downcast_index(small), faiss.IndexIVF) or self.factory.startswith("IDMap")
        fresh = small if native else faiss.IndexIDMap2(small)

        def kind(ix) -> str:
            outer = faiss.downcast_index(ix)
            inner = faiss.downcast_index(outer.index) if hasattr(outer, "id_map") else None
            name = type(outer).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
            return name.replace("IndexFlatIP", "IndexFlat").replace("IndexFlatL2", "IndexFlat")  # metric: below

        if kind(index) != kind(fresh):
            return f"the faiss index is a {kind(index)}, factory {self.factory!r} builds a {kind(fresh)}"
        outer = faiss.downcast_index(index)
        if isinstance(outer, faiss.IndexIVF):
            return self._ivf_mismatch(outer, labels, tombstones, vectors)
        if not hasattr(index, "id_map"):
            return None
        id_map = faiss.vector_to_array(index.id_map)
        if sorted(id_map.tolist()) != sorted(labels + tombstones):
            return "the ids inside the faiss index differ from the stored labels and tombstones"
        inner = faiss.downcast_index(index.index)
        storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
        if isinstance(storage, faiss.IndexFlat) and labels:
            codes = faiss.vector_to_array(storage.codes).view(np.float32)
            if codes.size != index.ntotal * index.d:
                return "the faiss flat storage has the wrong size"
            codes = codes.reshape(index.ntotal, index.d)
            pos = {int(label): p for p, label in enumerate(id_map.tolist())}
            want = codes[[pos[label] for label in labels]]
            if not np.array_equal(want.view(np.uint32), np.ascontiguousarray(vectors, np.float32).view(np.uint32)):
                return "the vectors inside the faiss index differ from the vectors section"
        return None

    def _ivf_mismatch(self, ivf, labels: list[int], tombstones: list[int], vectors: np.ndarray) -> str | None:
        """An IVF index keeps its ids in its inverted lists: they must be the stored labels and tombstones, each
        once; an IVF-Flat keeps the vectors themselves, which must equal the vectors section bit for bit."""
        faiss = self.faiss
        invlists = ivf.invlists
        flat_codes = isinstance(ivf, faiss.IndexIVFFlat) and ivf.code_size == 4 * ivf.d
        stored = np.asarray(labels, dtype=np.int64)
        order = np.argsort(stored, kind="stable")
        by_label = stored[order]
        want = np.ascontiguousarray(vectors, np.float32).view(np.uint32)
        seen: list[int] = []
        for list_no in range(ivf.nlist):
            size = invlists.list_size(list_no)
            if size == 0:
                continue
            ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).astype(np.int64)
            seen.extend(ids.tolist())
            if flat_codes and len(stored):
                codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * ivf.code_size).copy()
                codes = codes.view(np.uint32).reshape(size, ivf.d)
                at = np.minimum(np.searchsorted(by_label, ids), len(by_label) - 1)
                live = by_label[at] == ids  # tombstoned ids have no vector to compare with
                if not np.array_equal(codes[live], want[order[at[live]]]):
                    return "the vectors inside the faiss IVF lists differ from the vectors section"
        if sorted(seen) != sorted(labels + tombstones):
            return "the ids inside the faiss IVF lists differ from the stored labels and tombstones"
        return None

    def to_bytes(self) -> np.ndarray:
        return self.faiss.serialize_index(self.index)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, x: np.ndarray) -> None:
        try:
            self.index.train(x)
        except RuntimeError as e:
            raise KVIndexError(f"training {self.factory!r} failed ({len(x)} vectors): {e}") from e

    def add(self, labels: np.ndarray, x: np.ndarray) -> None:
        self.index.add_with_ids(x, labels)
        self._gpu_index = None

    def remove(self, labels: np.ndarray) -> bool:
        """Remove labels; False when this index type cannot remove (caller keeps tombstones)."""
        if not self.can_remove:
            return False
        try:
            self.index.remove_ids(self.faiss.IDSelectorBatch(labels))
        except RuntimeError:
            self.can_remove = False
            return False
        self._gpu_index = None
        return True

    def _params(self, allowed: np.ndarray | None):
        faiss = self.faiss
        sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        inner = faiss.downcast_index(self.index.index if hasattr(self.index, "id_map") else self.index)
        if isinstance(inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, 1))
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k; ``allowed`` restricts labels (pre-filter). Raises NotImplementedError if the index cannot."""
        if self.use_gpu and allowed is None:
            if self._gpu_index is None:  # every visible GPU holds a shard of the rows
                co = self.faiss.GpuMultipleClonerOptions()
                co.shard = True
                self._gpu_index = self.faiss.index_cpu_to_all_gpus(self.index, co=co)
            return self._gpu_index.search(q, k)
        params = self._params(allowed)
        try:
            if params is None:
                return self.index.search(q, k)
            return self.index.search(q, k, params=params)
        except RuntimeError as e:
            if allowed is not None:
                raise NotImplementedError(str(e)) from e
            raise


class _TorchBackend:
    """Exact search with torch matmuls on any device (the GPU path when faiss has no GPUs); a CPU twin for tests."""

    def __init__(self, dim: int, metric: Metric, device: str):
        import torch  # noqa: PLC0415

        self.torch = torch
        self.dim, self.metric, self.device = dim, metric, torch.device(device)
        self.vectors = torch.zeros(0, dim, dtype=torch.float32, device=self.device)
        self.alive = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.can_remove = True
        self.is_trained = True

    def train(self, x: np.ndarray) -> None:  # exact: nothing to train
        pass

    def _grow(self, size: int) -> None:
        torch = self.torch
        if size <= self.vectors.shape[0]:
            return
        cap = max(size, 2 * self.vectors.shape[0], 1024)
        vec = torch.zeros(cap, self.dim, dtype=torch.float32, device=self.device)
        alive = torch.zeros(cap, dtype=torch.bool, device=self.device)
        vec[: self.vectors.shape[0]] = self.vectors
        alive[: self.alive.shape[0]] = self.alive
        self.vectors, self.alive = vec, alive

    def add(self, labels: np.ndarray, x: np.ndarray) -> None:
        torch = self.torch
        self._grow(int(labels.max()) + 1)
        idx = torch.as_tensor(labels, device=self.device)
        self.vectors[idx] = torch.as_tensor(x, device=self.device)
        self.alive[idx] = True

    def remove(self, labels: np.ndarray) -> bool:
        labels = labels[labels < self.alive.shape[0]]
        self.alive[self.torch.as_tensor(labels, device=self.device)] = False
        return True

    def search(self, q: np.ndarray | Any, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        qt = torch.as_tensor(q, dtype=torch.float32, device=self.device)
        n = self.vectors.shape[0]
        mask = self.alive.clone()
        if allowed is not None:
            allow = torch.zeros(n, dtype=torch.bool, device=self.device)
            allowed = allowed[allowed < n]
            allow[torch.as_tensor(allowed, device=self.device)] = True
            mask &= allow
        sims = qt @ self.vectors.T  # [q, n]
        if self.metric == "l2":
            scores = (qt * qt).sum(-1, keepdim=True) - 2 * sims + (self.vectors * self.vectors).sum(-1)[None, :]
            scores = scores.clamp_min(0).masked_fill(~mask[None, :], float("inf"))
            vals, idx = torch.topk(scores, min(k, n), dim=1, largest=False)
            missing = torch.isinf(vals)
        else:
            scores = sims.masked_fill(~mask[None, :], float("-inf"))
            vals, idx = torch.topk(scores, min(k, n), dim=1, largest=True)
            missing = torch.isinf(vals)
        idx = idx.masked_fill(missing, -1)
        vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        if idx.shape[1] < k:  # pad like faiss does
            pad = k - idx.shape[1]
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
            vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=np.nan)
        return vals, idx


class _ShardedTorchBackend:
    """Rows spread over several devices (label % n picks the shard); each shard searched exactly, top-k merged."""

    def __init__(self, dim: int, metric: Metric, devices: Sequence[str]):
        self.metric = metric
        self.shards = [_TorchBackend(dim, metric, d) for d in devices]
        self.can_remove = True
        self.is_trained = True

    def train(self, x: np.ndarray) -> None:
        pass

    def _split(self, labels: np.ndarray):
        n = len(self.shards)
        for i, shard in enumerate(self.shards):
            sel = labels % n == i
            if sel.any():
                yield shard, sel, labels[sel] // n

    def add(self, labels: np.ndarray, x: np.ndarray) -> None:
        for shard, sel, local in self._split(labels):
            shard.add(local, x[sel])

    def remove(self, labels: np.ndarray) -> bool:
        for shard, _, local in self._split(labels):
            shard.remove(local)
        return True

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.shards)
        scores, labels = [], []
        for i, shard in enumerate(self.shards):
            if shard.vectors.shape[0] == 0:
                continue
            local_allowed = None if allowed is None else allowed[allowed % n == i] // n
            if local_allowed is not None and len(local_allowed) == 0:
                continue
            s, idx = shard.search(q, k, local_allowed)
            scores.append(s)
            labels.append(np.where(idx >= 0, idx * n + i, -1))
        if not scores:
            return np.full((len(q), k), np.nan, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        s, lab = np.concatenate(scores, axis=1), np.concatenate(labels, axis=1)
        key = np.where(lab >= 0, s if self.metric == "l2" else -s, np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(lab, order, 1)
