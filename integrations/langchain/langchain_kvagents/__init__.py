"""LangChain integration of kvagents: chat model, embeddings, vector store, retriever and runnables.

Example:
    >>> from langchain_kvagents import ChatKV
    >>> llm = ChatKV(model="smollm2-135m", temperature=0, max_tokens=32)  # nothing loaded yet
    >>> # llm.invoke("Hello").content
"""

from ._messages import UnsupportedMessageError
from .chat_models import ChatKV, UnsupportedArgumentError
from .embeddings import KVEmbeddings
from .retrievers import KVRetriever
from .runnables import KVBestOfN, KVStepEvents, budgeted_reasoning
from .vectorstores import KVVectorStore

__all__ = [
    "ChatKV",
    "KVBestOfN",
    "KVEmbeddings",
    "KVRetriever",
    "KVStepEvents",
    "KVVectorStore",
    "UnsupportedArgumentError",
    "UnsupportedMessageError",
    "budgeted_reasoning",
]
