"""Evaluation pipelines behind ``kvagents eval``: best-of-N selection and correctness prediction, KV embeddings
against a dedicated embedder, fast/slow reasoning control; and the metrics they share.
"""
