"""KV embeddings for search: :class:`~kvagents.retrieval.encoder.KVEncoder` (the ``SentenceTransformer.encode``
interface), :class:`~kvagents.retrieval.index.KVIndex` (faiss or exact torch search), its search backends and its
one-file format.
"""
