"""``KVVectorStore``: a LangChain ``VectorStore`` over :class:`kvagents.KVIndex` (faiss / torch), no pickle."""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from kvagents import KVIndex

__all__ = ["KVVectorStore"]

_CONFIG = "kvagents_vectorstore.json"
_INDEX = "index.kvi"


class KVVectorStore(VectorStore):
    """Vector store over a :class:`kvagents.KVIndex`: add / upsert by id / delete / get_by_ids, similarity search
    with scores, MMR, metadata filters, retriever, and safe save / load (the index's checksummed format, JSON
    config; nothing is pickled).

    Works with any LangChain ``Embeddings``; with :class:`~langchain_kvagents.KVEmbeddings` it is a KV
    embedding store. The index is created on the first ``add`` (its dimension comes from the vectors).

    Args:
        embedding: the ``Embeddings`` used for texts and queries.
        metric: ``"cosine"`` (default; scores are cosine similarities), ``"ip"`` or ``"l2"``.
        index_kwargs: extra ``KVIndex`` arguments (``factory="IVF256,Flat"``, ``device="cuda"``, ``backend``).

    Example:
        .. code-block:: python

            from langchain_kvagents import KVEmbeddings, KVVectorStore

            store = KVVectorStore(KVEmbeddings(model="smollm2-135m"))
            store.add_texts(["cats purr", "dogs bark"], metadatas=[{"k": "cat"}, {"k": "dog"}], ids=["c", "d"])
            store.similarity_search_with_score("what do cats do?", k=1, filter={"k": "cat"})
            store.save_local("my_store"); KVVectorStore.load_local("my_store", store.embeddings)
    """

    def __init__(
        self,
        embedding: Embeddings,
        *,
        metric: Literal["cosine", "ip", "l2"] = "cosine",
        index: KVIndex | None = None,
        **index_kwargs: Any,
    ) -> None:
        if metric not in ("cosine", "ip", "l2"):
            raise ValueError(f"unknown metric {metric!r}; use 'cosine', 'ip' or 'l2'")
        self.embedding = embedding
        self.metric = index.metric if index is not None else metric
        self.index_kwargs = index_kwargs
        self.index = index
        self._lock = threading.RLock()

    @property
    def embeddings(self) -> Embeddings:
        return self.embedding

    def _ensure_index(self, dim: int) -> KVIndex:
        if self.index is None:
            identity = getattr(getattr(self.embedding, "encoder", None), "identity", None)
            self.index = KVIndex(dim, self.metric, encoder_identity=identity, **self.index_kwargs)
        return self.index

    # -- writing ------------------------------------------------------------------------------------------------
    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        vectors = self.embedding.embed_documents(texts)
        return self._upsert(texts, vectors, metadatas, ids)

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        vectors = await self.embedding.aembed_documents(texts)
        return self._upsert(texts, vectors, metadatas, ids)

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        ids = kwargs.pop("ids", None) or [d.id for d in documents]
        ids = [i if i else uuid.uuid4().hex for i in ids]
        return self.add_texts([d.page_content for d in documents], [dict(d.metadata) for d in documents], ids=ids)

    async def aadd_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        ids = kwargs.pop("ids", None) or [d.id for d in documents]
        ids = [i if i else uuid.uuid4().hex for i in ids]
        return await self.aadd_texts(
            [d.page_content for d in documents], [dict(d.metadata) for d in documents], ids=ids
        )

    def add_embeddings(
        self,
        texts: Sequence[str],
        embeddings: Sequence[Sequence[float]],
        metadatas: list[dict] | None = None,
        ids: list[str] | None = None,
    ) -> list[str]:
        """Add precomputed vectors (upsert by id)."""
        return self._upsert(list(texts), embeddings, metadatas, ids)

    def _upsert(self, texts, vectors, metadatas, ids) -> list[str]:
        n = len(texts)
        if metadatas is not None and len(metadatas) != n:
            raise ValueError(f"got {n} texts but {len(metadatas)} metadatas")
        if ids is not None and len(ids) != n:
            raise ValueError(f"got {n} texts but {len(ids)} ids")
        # a missing id (None or "") gets a fresh one; any other id goes to KVIndex as given (it refuses non-str
        # ids, so 0 is an error to fix, not an id silently replaced)
        ids = [uuid.uuid4().hex if i is None or i == "" else i for i in (ids or [None] * n)]
        metas = [dict(m or {}) for m in (metadatas or [{}] * n)]
        vecs = np.asarray(vectors, dtype=np.float32)
        with self._lock:
            index = self._ensure_index(vecs.shape[1])
            # last occurrence of a repeated id wins, as sequential upserts would
            last = {i: k for k, i in enumerate(ids)}
            keep = sorted(last.values())
            index.upsert(vecs[keep], ids=[ids[k] for k in keep], texts=[texts[k] for k in keep],
                         metadatas=[metas[k] for k in keep])
        return ids

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete by id (unknown ids are ignored); ``ids=None`` deletes everything."""
        with self._lock:
            if self.index is None:
                return True
            if ids is None:
                ids = list(self.index.ids)
            self.index.delete(list(ids))
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        return self.delete(ids, **kwargs)

    # -- reading ------------------------------------------------------------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        with self._lock:
            if self.index is None:
                return []
            records = self.index.get(list(ids))
        return [Document(id=r.id, page_content=r.text or "", metadata=dict(r.metadata)) for r in records]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return self.get_by_ids(ids)

    def _hits_to_docs(self, hits) -> list[tuple[Document, float]]:
        return [(Document(id=h.id, page_content=h.text or "", metadata=dict(h.metadata)), float(h.score)) for h in hits]

    def similarity_search_with_score_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict | Callable | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        with self._lock:
            if self.index is None or len(self.index) == 0:
                return []
            return self._hits_to_docs(self.index.search(np.asarray(embedding, np.float32), k, filter=filter))

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: dict | Callable | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Documents and scores, best first: cosine / inner-product similarity, or squared L2 distance."""
        return self.similarity_search_with_score_by_vector(self.embedding.embed_query(query), k, filter, **kwargs)

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, filter: dict | Callable | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        vec = await self.embedding.aembed_query(query)
        return self.similarity_search_with_score_by_vector(vec, k, filter, **kwargs)

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict | Callable | None = None, **kwargs: Any
    ) -> list[Document]:
        return [d for d, _ in self.similarity_search_with_score_by_vector(embedding, k, filter, **kwargs)]

    def similarity_search(
        self, query: str, k: int = 4, filter: dict | Callable | None = None, **kwargs: Any
    ) -> list[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    async def asimilarity_search(
        self, query: str, k: int = 4, filter: dict | Callable | None = None, **kwargs: Any
    ) -> list[Document]:
        return [d for d, _ in await self.asimilarity_search_with_score(query, k, filter, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        if self.metric == "l2":  # squared distance of (usually unit) vectors -> [0, 1]
            return lambda d: 1.0 - math.sqrt(max(d, 0.0)) / math.sqrt(2.0)
        return lambda s: (1.0 + s) / 2.0 if self.metric == "cosine" else s

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict | Callable | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        with self._lock:
            if self.index is None or len(self.index) == 0:
                return []
            hits = self.index.mmr(np.asarray(embedding, np.float32), k, fetch_k=fetch_k, lambda_mult=lambda_mult,
                                  filter=filter)
        return [d for d, _ in self._hits_to_docs(hits)]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict | Callable | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        return self.max_marginal_relevance_search_by_vector(
            self.embedding.embed_query(query), k, fetch_k, lambda_mult, filter, **kwargs
        )

    async def amax_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict | Callable | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        vec = await self.embedding.aembed_query(query)
        return self.max_marginal_relevance_search_by_vector(vec, k, fetch_k, lambda_mult, filter, **kwargs)

    def as_retriever(self, **kwargs: Any):
        """A :class:`~langchain_kvagents.KVRetriever` (``k``, ``search_type``, ``search_kwargs``)."""
        from .retrievers import KVRetriever

        search_kwargs = dict(kwargs.pop("search_kwargs", None) or {})
        k = kwargs.pop("k", search_kwargs.pop("k", 4))
        return KVRetriever(vectorstore=self, k=k, search_kwargs=search_kwargs, **kwargs)

    # -- construction / persistence -----------------------------------------------------------------------------
    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> KVVectorStore:
        store = cls(embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def save_local(self, folder: str | Path) -> Path:
        """Save to ``folder``: the index file (checksummed, no pickle) and a JSON config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.index is not None:
                self.index.save(folder / _INDEX)
            cfg = {"metric": self.metric, "has_index": self.index is not None,
                   "index_kwargs": {k: v for k, v in self.index_kwargs.items() if isinstance(v, (str, int, float))}}
        (folder / _CONFIG).write_text(json.dumps(cfg, indent=2))
        return folder

    @classmethod
    def load_local(cls, folder: str | Path, embedding: Embeddings, **kwargs: Any) -> KVVectorStore:
        """Load a store saved by :meth:`save_local`; a KV-embedding store refuses embeddings of another encoder."""
        folder = Path(folder)
        cfg_path = folder / _CONFIG
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: {folder} is not a saved KVVectorStore")
        cfg = json.loads(cfg_path.read_text())
        index = None
        if cfg.get("has_index"):
            identity = getattr(getattr(embedding, "encoder", None), "identity", None)
            index = KVIndex.load(folder / _INDEX, encoder_identity=identity, **kwargs)
        return cls(embedding, metric=cfg["metric"], index=index, **cfg.get("index_kwargs", {}))
