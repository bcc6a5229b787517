"""``KVRetriever``: a retriever over a :class:`KVVectorStore` with a ``k`` field."""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, field_validator

__all__ = ["KVRetriever"]


class KVRetriever(BaseRetriever):
    """Retrieve ``k`` documents from a vector store by similarity, MMR or a relevance-score threshold.

    ``invoke(query, k=2, filter={...})`` overrides ``k`` and search arguments per call. Scores land in each
    document's ``metadata["score"]`` (similarity, or squared L2 distance for ``metric="l2"`` stores).

    Example:
        .. code-block:: python

            retriever = KVRetriever(vectorstore=store, k=3)  # or store.as_retriever(k=3)
            retriever.invoke("what do cats do?")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    vectorstore: Any
    """A :class:`KVVectorStore` (any LangChain ``VectorStore`` with scores works)."""
    k: int = 4
    """Number of documents to return."""
    search_type: Literal["similarity", "mmr", "similarity_score_threshold"] = "similarity"
    """How to search."""
    search_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra search arguments: ``filter``, ``fetch_k``, ``lambda_mult``, ``score_threshold``."""

    @field_validator("k")
    @classmethod
    def _check_k(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"k must be >= 1, got {v}")
        return v

    def _search(self, query: str, kwargs: dict) -> list[Document]:
        kw = {**self.search_kwargs, **kwargs}
        k = kw.pop("k", self.k)
        if self.search_type == "mmr":
            return self.vectorstore.max_marginal_relevance_search(query, k=k, **kw)
        threshold = kw.pop("score_threshold", None)
        if self.search_type == "similarity_score_threshold":
            pairs = self.vectorstore.similarity_search_with_relevance_scores(query, k=k, **kw)
            if threshold is not None:
                pairs = [(d, s) for d, s in pairs if s >= threshold]
        else:
            pairs = self.vectorstore.similarity_search_with_score(query, k=k, **kw)
        out = []
        for d, s in pairs:
            out.append(Document(id=d.id, page_content=d.page_content, metadata={**d.metadata, "score": s}))
        return out

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return self._search(query, kwargs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        emb = self.vectorstore.embeddings
        from ._shared import run_on_worker

        llm = getattr(getattr(emb, "encoder", None), "model", None)
        if llm is None:
            return self._search(query, kwargs)
        return await run_on_worker(llm, self._search, query, kwargs)
