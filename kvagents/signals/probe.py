"""A trained correctness probe on the per-layer pooled KV of the generated segment (beyond the paper).

Features: per-layer mean over generated tokens of ``[K; V]`` (heads averaged), all attention layers stacked
(``24 x 128 = 3072`` numbers for qwen2.5-coder-0.5b). Head: standardisation + L2-regularised logistic regression,
fitted full-batch with L-BFGS. Saved as safetensors + JSON; usable as a scorer inside the decode loop.

Example:
    >>> probe = KVProbe.fit(features, labels)           # doctest: +SKIP
    >>> probe.save("probe/"); KVProbe.load("probe/")     # doctest: +SKIP
    >>> llm.generate(q, params, components=[KVProbeScore(probe)])  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..engine.components import Component, FinishView, PrefillView, StepView
from .embedding import KVEmbedding
from .pooling import KVPooling

FORMAT_VERSION = 1


def probe_pooling(num_attention_layers: int) -> KVPooling:
    """The probe's feature pooling: every attention layer, generated segment, mean over tokens and heads."""
    return KVPooling(layers=num_attention_layers, part="kv", positions="mean", heads="mean", layer_agg="flatten",
                     normalize=False, segment="generated")


class KVProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pooling: KVPooling
    l2: float = Field(1e-2, description="L2 penalty on the weights (features are standardised).")
    max_iter: int = Field(200, description="L-BFGS iterations.")
    dim: int = 0


class KVProbe:
    """Standardise -> logistic regression. ``predict(features)`` returns P(correct) in [0, 1]."""

    def __init__(self, config: KVProbeConfig, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor) -> None:
        self.config, self.weight, self.bias, self.mean, self.std = config, weight, bias, mean, std

    @classmethod
    def fit(cls, features, labels, pooling: KVPooling, *, l2: float = 1e-2, max_iter: int = 200) -> KVProbe:
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.float64).flatten()
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features must be [N, D] with N = len(labels); got {tuple(x.shape)} and {len(y)} labels")
        if not (0 < y.mean() < 1):
            raise ValueError(f"labels need both classes to fit a probe; got mean {float(y.mean()):.3f}")
        keep = torch.isfinite(x).all(1)
        x, y = x[keep], y[keep]
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        z = (x - mean) / std
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w) / 2
            loss.backward()
            return loss

        opt.step(closure)
        cfg = KVProbeConfig(pooling=pooling, l2=l2, max_iter=max_iter, dim=z.shape[1])
        return cls(cfg, w.detach().float(), b.detach().float(), mean.float(), std.float())

    def predict(self, features) -> np.ndarray:
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"probe expects {self.config.dim} features, got {x.shape[-1]}")
        z = (x - self.mean) / self.std
        return torch.sigmoid(z @ self.weight + self.bias).numpy()

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std},
                  str(path / "probe.safetensors"))
        (path / "probe.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "kv_probe",
                                                     "config": self.config.model_dump()}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> KVProbe:
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "probe.json").read_text())
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer kvagents (format {meta['format_version']})")
        t = load_file(str(path / "probe.safetensors"))
        return cls(KVProbeConfig(**meta["config"]), t["weight"], t["bias"], t["mean"], t["std"])


@dataclass
class KVProbeScore(Component):
    """Scores each sample with a :class:`KVProbe` from the KV it pools in the loop (output key ``kv_probe``)."""

    probe: KVProbe
    name: str = "kv_probe"
    _emb: KVEmbedding | None = field(default=None, init=False, repr=False)

    def on_prefill(self, view: PrefillView) -> None:
        self._emb = KVEmbedding(self.probe.config.pooling, name="_probe_features")
        self._emb.on_prefill(view)

    def on_step(self, view: StepView):
        return self._emb.on_step(view)

    def on_finish(self, view: FinishView) -> list[dict]:
        feats = self._emb.on_finish(view)
        out = []
        for f in feats:
            out.append({"kv_probe": float("nan") if f is None else float(self.probe.predict(f[None])[0])})
        return out
