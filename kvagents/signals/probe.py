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
from .artifact import ArtifactError, as_fingerprint, load_artifact, save_artifact
from .embedding import KVEmbedding
from .pooling import KVPooling

FORMAT_VERSION = 1


def probe_pooling(num_attention_layers: int, positions: str = "mean") -> KVPooling:
    """The probe's feature pooling: every attention layer, generated segment, heads averaged, [K; V] per layer.

    ``positions``: ``"mean"`` (every generated token, the default), ``"last"`` (the last token fed to the model) or
    ``"window:K"`` (the mean of the last ``K`` generated tokens: the end of the answer, where the final answer is
    written).

    Example:
        >>> probe_pooling(24, "window:16").window
        16
    """
    kind, _, k = positions.partition(":")
    if kind == "window" and k.isdigit() and int(k) >= 1:
        extra = {"positions": "window", "window": int(k)}
    elif kind in ("mean", "last") and not k:
        extra = {"positions": kind}
    else:
        raise ValueError(f"probe positions {positions!r}: use mean, last or window:K (K >= 1, e.g. window:16)")
    return KVPooling(layers=num_attention_layers, part="kv", heads="mean", layer_agg="flatten", normalize=False,
                     segment="generated", **extra)


def pooling_tag(positions: str) -> str:
    """The file-name tag of a probe pooling's features: ``""`` for mean, ``".last"``, ``".w16"`` for window:16."""
    probe_pooling(1, positions)  # validates
    return "" if positions == "mean" else "." + positions.replace("window:", "w")


def center_by_group(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``x`` minus the mean of its group's finite rows (rows with a non-finite value stay as they are)."""
    x = np.array(x, dtype=np.float64 if np.asarray(x).dtype == np.float64 else np.float32)
    groups = np.asarray(groups)
    if groups.shape != (len(x),):
        raise ValueError(f"groups must give one prompt per row ({len(x)}), got shape {groups.shape}")
    ok = np.isfinite(x).all(1)
    for g in np.unique(groups):
        m = groups == g
        if (m & ok).any():
            x[m & ok] -= x[m & ok].mean(0)
    return x


class KVProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pooling: KVPooling
    l2: float = Field(1e-2, description="L2 penalty on the weights (features are standardised).")
    max_iter: int = Field(200, description="L-BFGS iterations.")
    dim: int = 0
    center: bool = Field(False, description="Rank the samples of one prompt: each sample's features minus the mean "
                         "of its prompt's samples (what best-of-n selection needs; trained on prompts whose samples "
                         "are partly right).")


class KVProbe:
    """Standardise -> logistic regression. ``predict(features)`` returns P(correct) in [0, 1]."""

    def __init__(self, config: KVProbeConfig, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor) -> None:
        # own, freshly allocated float32: a loaded probe (safetensors memory is aligned differently, which changes
        # the SIMD reduction order) computes exactly what the trained one does
        weight, bias, mean, std = (t.detach().float().clone() for t in (weight, bias, mean, std))
        self.config, self.weight, self.bias, self.mean, self.std = config, weight, bias, mean, std
        self.metadata: dict = {}  # artifact.json of a loaded probe (training data, metrics, model)

    @classmethod
    def fit(cls, features, labels, pooling: KVPooling, *, l2: float = 1e-2, max_iter: int = 200,
            groups=None) -> KVProbe:
        """Fit on ``features [N, D]`` and 0/1 ``labels [N]``. ``groups [N]`` (the prompt of each sample) makes a
        centred probe (``config.center``): features are taken relative to their prompt's mean, and prompts whose
        samples are all right or all wrong are left out (they say nothing about which sample to pick).

        Example:
            >>> import numpy as np
            >>> rng = np.random.default_rng(0); x = rng.normal(size=(40, 3)); y = (x[:, 0] > 0).astype(float)
            >>> pool = probe_pooling(1)
            >>> p = KVProbe.fit(x, y, pool, groups=np.repeat(np.arange(10), 4))
            >>> p.config.center, p.predict(x[:4], groups=[0, 0, 0, 0]).shape
            (True, (4,))
        """
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.float64).flatten()
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features must be [N, D] with N = len(labels); got {tuple(x.shape)} and {len(y)} labels")
        if groups is not None:
            g = np.asarray(groups)
            if g.shape != (x.shape[0],):
                raise ValueError(f"groups must give one prompt per sample ({x.shape[0]}), got shape {g.shape}")
            x = torch.as_tensor(center_by_group(x.numpy(), g), dtype=torch.float64)
            yn = y.numpy()
            mixed = {k for k in np.unique(g) if 0 < yn[g == k].mean() < 1}
            keep_g = torch.as_tensor(np.isin(g, list(mixed)))
            if not keep_g.any():
                raise ValueError("a centred probe needs prompts with both right and wrong samples; none has both")
            x, y = x[keep_g], y[keep_g]
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
        cfg = KVProbeConfig(pooling=pooling, l2=l2, max_iter=max_iter, dim=z.shape[1], center=groups is not None)
        return cls(cfg, w.detach().float(), b.detach().float(), mean.float(), std.float())

    def predict(self, features, groups=None) -> np.ndarray:
        """P(correct) per row of ``features [N, D]``. A centred probe compares samples of one prompt: ``groups``
        gives each row's prompt (default: all rows are samples of one prompt)."""
        x = np.asarray(features)
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"probe expects {self.config.dim} features, got {x.shape[-1]}")
        if self.config.center:
            x = center_by_group(x, np.zeros(len(x), int) if groups is None else np.asarray(groups))
        x = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
        z = (x - self.mean) / self.std
        return torch.sigmoid(z @ self.weight + self.bias).numpy()

    def save(self, path: str | Path, model=None, *, training: dict | None = None,
             metrics: dict | None = None) -> Path:
        """Write the probe as a trained-signal folder (:mod:`kvagents.signals.artifact`). ``model``: the ``KVModel``
        (or its :class:`~kvagents.signals.artifact.ModelFingerprint`) whose features it was trained on, so that
        loading it onto another model is refused; ``training`` / ``metrics``: what it was trained on and how it did."""
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        return save_artifact(path, "kv_probe", tensors, self.config.model_dump(), as_fingerprint(model),
                             training=training, metrics=metrics)

    @classmethod
    def from_pretrained(cls, name: str | Path, model=None) -> KVProbe:
        """A shipped probe by name (the model's registry name, e.g. ``"qwen2.5-coder-0.5b"``;
        :func:`~kvagents.signals.artifact.shipped` lists them) or a probe folder; ``model`` refuses a probe trained on
        another model.

        Example:
            >>> from kvagents.signals.artifact import shipped
            >>> "qwen2.5-coder-0.5b-probe" in shipped("kv_probe")
            True
        """
        from .artifact import find_trained

        return cls.load(find_trained(name, "kv_probe"), model)

    @classmethod
    def load(cls, path: str | Path, model=None) -> KVProbe:
        """Load a probe folder. ``model`` (a ``KVModel`` or a fingerprint): refuse a probe trained on another model
        (:class:`~kvagents.signals.artifact.ArtifactMismatchError`). Folders of the older layout (``probe.json``)
        load too, unchecked."""
        path = Path(path)
        if (path / "probe.json").is_file() and not (path / "artifact.json").is_file():
            from safetensors.torch import load_file

            meta = json.loads((path / "probe.json").read_text())
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ArtifactError(f"{path} was written by a newer kvagents (format {meta['format_version']})")
            t = load_file(str(path / "probe.safetensors"))
            return cls(KVProbeConfig(**meta["config"]), t["weight"], t["bias"], t["mean"], t["std"])
        meta, t = load_artifact(path, "kv_probe", model=as_fingerprint(model))
        probe = cls(KVProbeConfig(**meta["config"]), t["weight"], t["bias"], t["mean"], t["std"])
        probe.metadata = meta
        return probe


@dataclass
class KVProbeScore(Component):
    """Scores each sample with a :class:`KVProbe` from the KV it pools in the loop (output key ``kv_probe``)."""

    probe: KVProbe
    name: str = "kv_probe"
    _emb: KVEmbedding | None = field(default=None, init=False, repr=False)

    def on_prefill(self, view: PrefillView) -> None:
        info, pooling = view.layers, self.probe.config.pooling
        layers = pooling.resolve_layers(info.attention_layers, info.num_layers)
        expected = len(layers) * pooling.parts * info.head_dim * (1 if pooling.heads == "mean" else info.kv_heads)
        if pooling.layer_agg == "flatten" and expected != self.probe.config.dim:
            raise ArtifactError(f"this probe reads {self.probe.config.dim} features but this model gives {expected} "
                                f"({len(layers)} layers x {pooling.parts} parts x head_dim {info.head_dim}): it was "
                                "trained on another model; train one on this model")
        self._emb = KVEmbedding(self.probe.config.pooling, name="_probe_features")
        self._emb.on_prefill(view)

    def on_step(self, view: StepView):
        return self._emb.on_step(view)

    def on_finish(self, view: FinishView) -> list[dict]:
        feats = self._emb.on_finish(view)
        out: list[dict] = [{"kv_probe": float("nan")} for _ in feats]
        ok = [i for i, f in enumerate(feats) if f is not None]
        if ok:  # one call: a centred probe compares the samples of each prompt
            p = self.probe.predict(np.stack([np.asarray(feats[i]) for i in ok]),
                                   groups=[view.prompt_index[i] for i in ok])
            for i, v in zip(ok, p):
                out[i]["kv_probe"] = float(v)
        return out
