"""What kvagents reads off the KV cache: poolings and KV embeddings, chain-of-embedding and output-probability
scores, the trained correctness probe and the KV classifier. Each streaming signal is a
:class:`~kvagents.engine.components.Component` with a graph-safe step for the fast path.
"""
