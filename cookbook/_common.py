"""Shared settings of the cookbook examples: the embedded model, CPU, greedy unless an example samples."""

from __future__ import annotations

import os

MODEL = os.environ.get("KVAGENTS_COOKBOOK_MODEL", "smollm2-135m")
DEVICE = os.environ.get("KVAGENTS_COOKBOOK_DEVICE", "cpu")


def chat(**kw):
    from langchain_kvagents import ChatKV

    base = {"model": MODEL, "dtype": "float32" if DEVICE == "cpu" else "auto", "device": DEVICE,
            "temperature": 0, "max_tokens": 48}
    return ChatKV(**{**base, **kw})


def embeddings(**kw):
    from langchain_kvagents import KVEmbeddings

    return KVEmbeddings(**{"model": MODEL, "dtype": "float32" if DEVICE == "cpu" else "auto", "device": DEVICE,
                           **kw})
