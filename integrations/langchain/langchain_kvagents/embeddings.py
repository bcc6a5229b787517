"""``KVEmbeddings``: LangChain ``Embeddings`` over kvagents' KV encoder (pooled KV cache of one prefill)."""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from kvagents import KVEncoder, KVPooling

from ._shared import get_model, run_on_worker

__all__ = ["KVEmbeddings"]


class KVEmbeddings(BaseModel, Embeddings):
    """Text embeddings from the KV cache of a causal LM (:class:`kvagents.KVEncoder`), as LangChain ``Embeddings``.

    The model is shared with every ``ChatKV`` / ``KVEmbeddings`` of the same ``(model, dtype, device)`` and loads
    on the first call. Vectors are L2-normalised by default (cosine = inner product).

    Example:
        .. code-block:: python

            from langchain_kvagents import KVEmbeddings

            emb = KVEmbeddings(model="smollm2-135m", dtype="float32", device="cpu")
            emb.embed_query("How old is the moon?")[:3]
            emb.embed_documents(["The moon is 4.5 billion years old.", "Cats sleep a lot."])
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str = "smollm2-135m"
    """Registry name, hub id or local path of the causal LM."""
    dtype: str = "auto"
    """``auto``, ``float32``, ``bfloat16``, ``float16``."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` ..."""
    pooling: KVPooling | None = None
    """How the KV cache is pooled (default :class:`KVPooling`: last 4 layers, [K; V] means)."""
    batch_size: int = 32
    """Texts per prefill."""
    max_length: int | None = 512
    """Token limit per text."""
    normalize_embeddings: bool = True
    """L2-normalise the vectors."""
    query_prompt: str = ""
    """Prepended to queries (e.g. ``"Question: "``)."""
    document_prompt: str = ""
    """Prepended to documents."""
    encode_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments of ``KVEncoder.encode``."""

    _encoder: KVEncoder | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> KVEmbeddings:
        get_model(self.model, self.dtype, self.device)  # unknown names fail here; nothing loads yet
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        return self

    @property
    def encoder(self) -> KVEncoder:
        if self._encoder is None:
            llm = get_model(self.model, self.dtype, self.device)
            self._encoder = KVEncoder(
                llm, self.pooling, batch_size=self.batch_size, max_length=self.max_length,
                prompts={"query": self.query_prompt, "document": self.document_prompt},
            )
        return self._encoder

    def _encode(self, texts: list[str], prompt_name: str) -> list[list[float]]:
        if not texts:
            return []
        vecs = self.encoder.encode(
            list(texts), prompt_name=prompt_name, normalize_embeddings=self.normalize_embeddings,
            convert_to_numpy=True, **self.encode_kwargs,
        )
        return vecs.astype("float64").tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._encode(texts, "document")

    def embed_query(self, text: str) -> list[float]:
        return self._encode([text], "query")[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await run_on_worker(self.encoder.model, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await run_on_worker(self.encoder.model, self.embed_query, text)
