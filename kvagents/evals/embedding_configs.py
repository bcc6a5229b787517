"""The encoders and KV pooling settings the embeddings evaluation compares, as plain values (no torch), so that
the command line can list them at once.

Example:
    >>> sorted(POOLING_SETTINGS)[:2]
    ['kv-lasttoken-last4', 'kv-mean-last12']
"""

from __future__ import annotations

KV_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
MINILM = "all-minilm-l6-v2"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
ENCODERS = (*KV_MODELS, MINILM)

#: ``KVPooling`` arguments of the configurations evaluated for every KV model (names are cache keys: change a
#: config, rename it)
POOLING_SETTINGS: dict[str, dict] = {
    "kv-mean-last4": {},  # the paper's MTEB default: last 4 layers, [K;V], mean over tokens/heads/layers
    "kv-mean-last4-heads": {"heads": "flatten"},  # KV heads concatenated instead of averaged
    "kv-mean-last12": {"layers": 12},  # deeper average (middle layers carry more semantics)
    "v-mean-last8": {"layers": 8, "part": "v"},  # values only
    "kv-lasttoken-last4": {"positions": "last"},  # the last token's row (decoder-embedding style)
}
