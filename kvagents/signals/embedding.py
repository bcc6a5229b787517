"""The KV embedding component: each sequence's pooled KV, computed incrementally while it is decoded.

Example:
    >>> from kvagents import KVEmbedding, KVPooling
    >>> comp = KVEmbedding(KVPooling(segment="generated"))
    >>> # llm.generate("Hi", params, components=[comp]).samples[0][0].outputs["kv_embedding"]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.components import Component, FinishView, PrefillView, StepView
from .pooling import KVPooling, RunningPool

_POOL_ATTRS = ("sum", "first", "last", "ring", "count")


@dataclass
class KVEmbedding(Component):
    """Pooled KV embedding of each sequence, computed incrementally in the decode loop.

    O(1) work per step per selected layer: the step's new K/V row is added to running state (see
    :class:`~kvagents.signals.pooling.RunningPool`); the cache is never re-read after prefill. Output per sample: a
    float32 CPU tensor ``[D]`` (``[nL, D]`` for ``layer_agg="stack"``).

    Example:
        >>> comp = KVEmbedding(KVPooling(segment="generated"))
        >>> # model.generate("Hi", params, components=[comp]); result.samples[0][0].outputs["kv_embedding"]
    """

    pooling: KVPooling = field(default_factory=KVPooling)
    name: str = "kv_embedding"
    _pool: RunningPool | None = field(default=None, init=False, repr=False)
    _layers: list[int] = field(default_factory=list, init=False, repr=False)
    _heads: str = field(default="keep", init=False, repr=False)

    def on_prefill(self, view: PrefillView) -> None:
        p = self.pooling
        info = view.layers
        self._layers = p.resolve_layers(info.attention_layers, info.num_layers)
        # heads="mean": average the heads where the rows live (before they leave a GPU / rank); same result
        self._heads = "mean" if p.heads == "mean" else "keep"
        heads = 1 if self._heads == "mean" else info.kv_heads
        prompts, dev = view.input_ids.shape[0], view.input_ids.device
        shape = (len(self._layers), p.parts, heads, info.head_dim)
        if p.segment in ("prompt", "all"):
            rows = view.kv_rows(self._layers, p.part, heads=self._heads)
            mask = view.attention_mask.bool()[:, -rows.shape[4]:]
            prompt_pool = RunningPool(p, (prompts, *shape), device=dev)
            prompt_pool.init_rows(rows, mask)
            self._pool = prompt_pool.repeat_interleave(view.n)
        else:
            self._pool = RunningPool(p, (prompts * view.n, *shape), device=dev)

    def on_step(self, view: StepView) -> None:
        if self.pooling.segment == "prompt" or not view.has_kv:
            return None
        self._pool.update(view.kv_rows(self._layers, self.pooling.part, heads=self._heads), view.fed_valid)
        return None

    def graph_state(self) -> dict[str, torch.Tensor]:
        """The running pool's tensors, which :meth:`step_tensors` updates in place (the fast path's captured step)."""
        return {f"_pool.{a}": getattr(self._pool, a) for a in _POOL_ATTRS if getattr(self._pool, a) is not None}

    def step_tensors(self, view) -> None:
        """:meth:`on_step` with in-place device ops only (graph-safe)."""
        if not view.has_kv or self.pooling.segment == "prompt":
            return
        pool = self._pool
        row = view.kv_rows(self._layers, self.pooling.part, heads=self._heads).float()
        v = view.fed_valid[:, None, None, None, None]
        if pool.sum is not None:
            pool.sum += row * v
        if pool.first is not None:
            pool.first.copy_(torch.where(v & (pool.count == 0)[:, None, None, None, None], row, pool.first))
        if pool.last is not None:
            pool.last.copy_(torch.where(v, row, pool.last))
        if pool.ring is not None:
            b = torch.arange(row.shape[0], device=row.device)
            slot = pool.count % self.pooling.window
            pool.ring[b, slot] = torch.where(v, row, pool.ring[b, slot])
        pool.count += view.fed_valid.long()

    def embeddings(self) -> torch.Tensor:
        """Current pooled vectors ``[B, D]`` on the device."""
        return self._pool.finish()

    def on_finish(self, view: FinishView) -> list[torch.Tensor]:
        if self.pooling.segment == "generated" and bool((self._pool.count == 0).any()):
            out = self._pool.finish().cpu()
            empty = (self._pool.count == 0).cpu()
            return [None if empty[i] else out[i] for i in range(out.shape[0])]
        return list(self._pool.finish().cpu().unbind(0))
