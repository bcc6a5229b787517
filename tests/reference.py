"""Independent NumPy re-implementations used as test oracles (written from the definitions, not the library)."""

from __future__ import annotations

import numpy as np
import torch


def full_forward_kv(model, ids: list[int]):
    """Per-layer K and V ``[H, T, d]`` (float64 NumPy) from one fresh forward over ``ids``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    ks = [layer.keys[0].double().numpy() for layer in cache.layers]
    vs = [layer.values[0].double().numpy() for layer in cache.layers]
    return ks, vs


def ref_pool(ks, vs, rows, cfg) -> np.ndarray:
    """The paper's aggregation for one sequence: ``rows`` (ordered indices) of per-layer ``[H, T, d]`` arrays."""
    n_layers = len(ks)
    if isinstance(cfg.layers, int):
        layers = list(range(n_layers))[-cfg.layers :]
    else:
        layers = sorted(i % n_layers for i in cfg.layers)
    per_layer = []
    for i in layers:
        parts = {"k": [ks[i]], "v": [vs[i]], "kv": [ks[i], vs[i]]}[cfg.part]
        vecs = []
        for x in parts:
            x = x[:, rows, :]  # [H, R, d]
            if cfg.positions == "mean":
                x = x.mean(axis=1)
            elif cfg.positions == "sum":
                x = x.sum(axis=1)
            elif cfg.positions == "first":
                x = x[:, 0]
            elif cfg.positions == "last":
                x = x[:, -1]
            else:
                x = x[:, -cfg.window :].mean(axis=1)
            x = x.mean(axis=0) if cfg.heads == "mean" else x.reshape(-1)
            vecs.append(x)
        per_layer.append(np.concatenate(vecs))
    P = np.stack(per_layer)
    out = {"mean": P.mean(0), "sum": P.sum(0), "flatten": P.reshape(-1), "last": P[-1], "stack": P}[cfg.layer_agg]
    if cfg.normalize:
        out = out / np.linalg.norm(out, axis=-1, keepdims=True)
    return out
