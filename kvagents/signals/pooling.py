"""Pooling the KV cache into vectors: the configuration and both ways of computing it.

Shapes used throughout (``nL`` selected layers, ``P`` parts (1 for K or V, 2 for K;V), ``H`` KV heads,
``d`` head dim, ``T`` cache rows):

* rows of the cache, as read from ``cache.layers[i].keys`` / ``.values``: ``[B, H, T, d]``;
* a stacked per-step row: ``[B, nL, P, H, d]``;
* the pooled vector: ``[B, D]`` (``[B, nL, D]`` for ``layer_agg="stack"``).

Two computations share one finishing function (:func:`finish_pooled`):

* :func:`pool_cache_rows` pools rows already in a cache (prefill, ``embed``);
* :class:`RunningPool` updates O(1) per step per layer (sums, first, last, a ring buffer for the window)
  inside the decode loop, never re-reading the cache.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

Part = Literal["k", "v", "kv"]
Positions = Literal["mean", "sum", "last", "first", "window"]
Heads = Literal["mean", "flatten"]
LayerAgg = Literal["mean", "sum", "flatten", "last", "stack"]
Segment = Literal["prompt", "generated", "all"]


class KVPooling(BaseModel):
    """How to turn KV-cache rows into one vector per sequence.

    Defaults follow the paper's released MTEB script (``mteb/custom_model.py``): the last 4 layers, K and V
    concatenated (``kv_cat``), masked mean over positions, mean over KV heads, mean over layers, L2-normalised.
    The default vector is ``normalize(mean_l mean_h mean_t [K_l; V_l])`` of size ``2 * head_dim``.

    ``layers`` counts attention layers only: layers whose cache holds no keys (linear-attention layers of hybrid
    models) are skipped by ``layers=n`` and rejected when named explicitly. On GQA models (fewer KV heads than
    attention heads) heads are the *KV* heads stored in the cache. With ``part="kv"`` and ``heads="flatten"`` a
    layer's vector is ``[K heads flattened ; V heads flattened]``.

    Segments (which cache rows are pooled; pads never are):

    * ``prompt``: the prompt's tokens (on sliding-window layers only the rows the cache still holds after prefill,
      i.e. the last ``sliding_window - 1`` prompt tokens);
    * ``generated``: the generated tokens that were *fed* to the model: every generated token but the last one
      (the last sampled token ends the loop and never enters the cache);
    * ``all``: prompt rows followed by generated rows.

    Example:
        >>> KVPooling(layers=[-1, -2], part="k", positions="last").part
        'k'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int | list[int] = Field(4, description="Last n attention layers (int) or explicit indices (negatives allowed).")
    part: Part = Field("kv", description="k, v, or kv (concatenated along features).")
    positions: Positions = Field("mean", description="mean | sum | last | first | window (mean of the last `window` rows).")
    window: int = Field(64, description="Rows averaged by positions='window'.")
    heads: Heads = Field("mean", description="mean over KV heads or flatten heads x dim.")
    layer_agg: LayerAgg = Field("mean", description="mean | sum | flatten (concat) | last | stack ([nL, D]).")
    normalize: bool = Field(True, description="L2-normalise the final vector (each layer's for stack).")
    segment: Segment = Field("prompt", description="prompt | generated | all.")

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"layers as a count must be >= 1, got {v}")
        if isinstance(v, list):
            if not v:
                raise ValueError("layers as a list must name at least one layer, got []")
            if len(set(v)) != len(v):
                raise ValueError(f"layers lists a layer twice: {v}")
        return v

    @field_validator("window")
    @classmethod
    def _check_window(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"window must be >= 1, got {v}")
        return v

    @property
    def parts(self) -> int:
        return 2 if self.part == "kv" else 1

    def resolve_layers(self, attention_layers: list[int], num_layers: int) -> list[int]:
        """Absolute layer indices selected by ``layers``, in increasing order.

        ``attention_layers`` are the indices whose cache holds keys; ``num_layers`` all decoder layers.
        """
        if not attention_layers:
            raise ValueError("this model's cache holds no keys in any layer: nothing to pool")
        if isinstance(self.layers, int):
            if self.layers > len(attention_layers):
                raise ValueError(
                    f"layers={self.layers} asks for more layers than the model's {len(attention_layers)} attention "
                    f"layers; use layers<={len(attention_layers)}"
                )
            return attention_layers[-self.layers :]
        out = []
        for idx in self.layers:
            if not -num_layers <= idx < num_layers:
                raise ValueError(
                    f"layer index {idx} is out of range for a model with {num_layers} layers "
                    f"(valid: {-num_layers}..{num_layers - 1})"
                )
            absolute = idx % num_layers
            if absolute not in attention_layers:
                raise ValueError(f"layer {idx} holds no keys (a linear-attention layer); choose from {attention_layers}")
            out.append(absolute)
        if len(set(out)) != len(out):
            raise ValueError(f"layers {self.layers} name the same layer twice")
        return sorted(out)


# ----------------------------------------------------------------------------------------------------------------
# Finishing: [B, nL, P, H, d] (positions already reduced) -> [B, D]


def finish_pooled(x: torch.Tensor, pooling: KVPooling) -> torch.Tensor:
    """Reduce heads, join parts, aggregate layers and normalise. ``x``: ``[B, nL, P, H, d]``."""
    x = x.float()
    if pooling.heads == "mean":
        x = x.mean(dim=3)  # [B, nL, P, d]
    else:
        x = x.flatten(3)  # [B, nL, P, H*d]
    x = x.flatten(2)  # [B, nL, P*D'] = [K ; V]
    if pooling.layer_agg == "mean":
        out = x.mean(dim=1)
    elif pooling.layer_agg == "sum":
        out = x.sum(dim=1)
    elif pooling.layer_agg == "flatten":
        out = x.flatten(1)
    elif pooling.layer_agg == "last":
        out = x[:, -1]
    else:  # stack
        out = x
    if pooling.normalize:
        out = F.normalize(out, dim=-1)
    return out


def stack_layer_rows(cache, layers: list[int], part: str, rows: slice | int | None = None, *, device=None,
                     heads: str = "keep", tp=None) -> torch.Tensor:
    """Stack cache rows of ``layers`` into ``[B, nL, P, H, T, d]`` (``[B, nL, P, H, d]`` for an int ``rows``).

    Layers on several devices and tensor-parallel head shards are gathered to ``device`` (see
    :func:`kvagents.engine.devices.gather_layer_rows`); on one device this is a plain ``torch.stack``.
    """
    from ..engine.devices import gather_layer_rows  # noqa: PLC0415

    return gather_layer_rows(cache, layers, part, rows, device=device, heads=heads, tp=tp)


def reduce_positions(rows: torch.Tensor, mask: torch.Tensor, pooling: KVPooling) -> torch.Tensor:
    """Reduce ``rows`` ``[B, nL, P, H, T, d]`` over T where ``mask`` ``[B, T]`` is true -> ``[B, nL, P, H, d]``."""
    rows = rows.float()
    m = mask.to(rows.dtype)
    count = m.sum(-1)  # [B]
    if bool((count == 0).any()):
        raise ValueError("a sequence has no rows in the pooled segment (empty prompt or nothing generated yet)")
    mm = m[:, None, None, None, :, None]
    if pooling.positions in ("mean", "sum"):
        s = (rows * mm).sum(dim=4)
        return s if pooling.positions == "sum" else s / count[:, None, None, None, None]
    ordinal = mask.long().cumsum(-1) - 1  # index among valid rows
    if pooling.positions == "first":
        idx = (mask & (ordinal == 0)).float().argmax(-1)
    elif pooling.positions == "last":
        idx = (mask & (ordinal == count[:, None].long() - 1)).float().argmax(-1)
    else:  # window
        keep = mask & (ordinal >= count[:, None].long() - pooling.window)
        w = keep.to(rows.dtype)
        s = (rows * w[:, None, None, None, :, None]).sum(dim=4)
        return s / w.sum(-1)[:, None, None, None, None]
    gather = idx[:, None, None, None, None, None].expand(*rows.shape[:4], 1, rows.shape[-1])
    return rows.gather(4, gather).squeeze(4)


def pool_cache_rows(cache, layers: list[int], mask: torch.Tensor, pooling: KVPooling, tp=None) -> torch.Tensor:
    """Pool the rows of ``cache`` selected by ``mask`` ``[B, T]`` (the cache's own length) -> ``[B, D]``.

    ``tp``: the model's :class:`~kvagents.engine.devices.TensorParallel` when its heads are split over ranks.
    """
    rows = stack_layer_rows(cache, layers, pooling.part, device=mask.device, tp=tp)
    t = rows.shape[4]
    if mask.shape[-1] != t:  # sliding-window layers keep only the tail
        mask = mask[:, -t:]
    return finish_pooled(reduce_positions(rows, mask, pooling), pooling)


# ----------------------------------------------------------------------------------------------------------------
# Incremental pooling inside the decode loop


class RunningPool:
    """O(1)-per-step pooled state for one segment, ``[B, nL, P, H, d]`` tensors on the model's device.

    ``init_rows`` seeds it with rows already in a cache (the prompt, for segment ``all``); ``update`` adds one
    row per sequence where ``valid`` is true. Only what ``pooling.positions`` needs is kept: a running sum, the
    first and last row, or a ring buffer of ``window`` rows.
    """

    def __init__(self, pooling: KVPooling, shape: tuple[int, ...], device, dtype=torch.float32) -> None:
        self.pooling = pooling
        b = shape[0]
        self.count = torch.zeros(b, dtype=torch.long, device=device)
        pos = pooling.positions
        self.sum = torch.zeros(shape, dtype=dtype, device=device) if pos in ("mean", "sum") else None
        self.first = torch.zeros(shape, dtype=dtype, device=device) if pos == "first" else None
        self.last = torch.zeros(shape, dtype=dtype, device=device) if pos == "last" else None
        self.ring = (
            torch.zeros((b, pooling.window, *shape[1:]), dtype=dtype, device=device) if pos == "window" else None
        )

    def repeat_interleave(self, n: int) -> RunningPool:
        """A copy whose every row is repeated ``n`` times (per-prompt state -> one row per sample)."""
        out = RunningPool.__new__(RunningPool)
        out.pooling = self.pooling
        for name in ("count", "sum", "first", "last", "ring"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.repeat_interleave(n, dim=0))
        return out

    def init_rows(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Seed from ``rows`` ``[B, nL, P, H, T, d]`` under ``mask`` ``[B, T]`` (called once, before updates)."""
        rows = rows.float()
        m = mask.to(rows.dtype)
        count = mask.long().sum(-1)
        if self.sum is not None:
            self.sum += (rows * m[:, None, None, None, :, None]).sum(dim=4)
        if self.first is not None or self.last is not None:
            reduced = reduce_positions(rows, mask, self.pooling) if bool((count > 0).all()) else None
            if reduced is not None:
                if self.first is not None:
                    self.first.copy_(reduced)
                if self.last is not None:
                    self.last.copy_(reduced)
        if self.ring is not None:
            ordinal = mask.long().cumsum(-1) - 1
            keep = mask & (ordinal >= count[:, None] - self.pooling.window)
            bi, ti = keep.nonzero(as_tuple=True)
            slot = ordinal[bi, ti] % self.pooling.window
            self.ring[bi, slot] = rows[bi, :, :, :, ti].to(self.ring.dtype)
        self.count += count

    def update(self, row: torch.Tensor, valid: torch.Tensor) -> None:
        """Add ``row`` ``[B, nL, P, H, d]`` for sequences where ``valid`` ``[B]`` is true."""
        row = row.float()
        v = valid[:, None, None, None, None]
        if self.sum is not None:
            self.sum += row * v
        if self.first is not None:
            self.first = torch.where(v & (self.count == 0)[:, None, None, None, None], row, self.first)
        if self.last is not None:
            self.last = torch.where(v, row, self.last)
        if self.ring is not None:
            b = torch.arange(row.shape[0], device=row.device)
            slot = self.count % self.pooling.window
            self.ring[b, slot] = torch.where(v, row, self.ring[b, slot])
        self.count += valid.long()

    def reduced(self) -> torch.Tensor:
        """Positions-reduced state ``[B, nL, P, H, d]``; zero rows where nothing was pooled."""
        c = self.count.clamp(min=1).float()[:, None, None, None, None]
        pos = self.pooling.positions
        if pos == "sum":
            return self.sum
        if pos == "mean":
            return self.sum / c
        if pos == "first":
            return self.first
        if pos == "last":
            return self.last
        filled = self.count.clamp(max=self.pooling.window).clamp(min=1).float()[:, None, None, None, None]
        return self.ring.sum(dim=1) / filled

    def finish(self) -> torch.Tensor:
        return finish_pooled(self.reduced(), self.pooling)
