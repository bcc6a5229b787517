"""What components see on the fast path: :class:`StaticStepView` over the static KV buffers, and the protocol by
which a component's per-step work runs inside the captured CUDA graph (:func:`graph_step_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .components import Component, StepView

# ----------------------------------------------------------------------------------------------------------------
# Views


class _StaticCacheLayer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _StaticCacheView:
    """``cache.layers[i].keys``/``.values`` ``[B, H, cols, d]`` over the static buffers (for plain components)."""

    def __init__(self, K, V, cols: int):
        self.layers = [_StaticCacheLayer(K[i, :, :, :cols], V[i, :, :, :cols]) for i in range(K.shape[0])]


@dataclass
class StaticStepView(StepView):
    """The :class:`~kvagents.engine.components.StepView` of the fast path. ``step`` is a 0-d device tensor inside the
    graph (an int for plain components); ``kv_rows`` reads the fed token's rows from the static cache column
    ``col`` (one gather for all layers, shared by all components of the step)."""

    K: Any = None
    V: Any = None
    col: Any = None
    _rows: dict | None = None

    def kv_rows(self, layers: list[int], part: str = "kv", heads: str = "keep") -> torch.Tensor:
        if self.fed_ids is None:
            raise RuntimeError("step 0 has no fed token: its logits come from prefill (see on_prefill)")
        if self._rows is None:
            self._rows = {}
        key = (tuple(layers), part, heads)
        if key not in self._rows and heads == "mean":
            rows = self.kv_rows(layers, part)
            n = rows.shape[3]
            if n <= 16:
                # the head mean as an unrolled float32 sum (a pointwise kernel reading along d): Inductor's
                # reduction over the strided head axis read across rows and cost 0.18 ms/step at 32 rows (H200)
                acc = rows[:, :, :, 0:1].float()
                for h in range(1, n):
                    acc = acc + rows[:, :, :, h : h + 1].float()
                self._rows[key] = (acc / n).to(rows.dtype)
            else:
                self._rows[key] = rows.mean(dim=3, keepdim=True)
        if key not in self._rows:
            if "all" not in self._rows:
                k = self.K.index_select(3, self.col).squeeze(3).transpose(0, 1)  # [B, L, H, d]
                v = self.V.index_select(3, self.col).squeeze(3).transpose(0, 1)
                self._rows["all"] = torch.stack([k, v], dim=2)  # [B, L, 2, H, d]
            rows = self._rows["all"]
            if list(layers) != list(range(rows.shape[1])):
                rows = rows[:, list(layers)]
            if part == "k":
                rows = rows[:, :, :1]
            elif part == "v":
                rows = rows[:, :, 1:]
            self._rows[key] = rows
        return self._rows[key]


# ----------------------------------------------------------------------------------------------------------------
# Graph-safe component steps


def graph_step_for(component: Component) -> tuple[Callable, Callable] | None:
    """``(state_fn, step_fn)`` when ``component`` can run inside the captured step, else ``None``.

    ``state_fn(c) -> dict[str, Tensor]``: the state tensors ``step_fn(c, view)`` updates in place. A component
    opts in with ``graph_state()`` and ``step_tensors(view)`` methods (the built-in scorers and
    :class:`~kvagents.signals.embedding.KVEmbedding` have them). A subclass that overrides ``on_step`` below the
    class that defines ``step_tensors`` may add host work the captured step would skip: it keeps the plain API."""
    cls = type(component)
    if not (callable(getattr(cls, "step_tensors", None)) and callable(getattr(cls, "graph_state", None))):
        return None
    owner = next(k for k in cls.__mro__ if "step_tensors" in vars(k))
    on_step_owner = next((k for k in cls.__mro__ if "on_step" in vars(k)), owner)
    if on_step_owner is not owner and issubclass(on_step_owner, owner):
        return None
    return (lambda c: c.graph_state(), lambda c, view: c.step_tensors(view))


def _graph_key(c) -> Any:
    """What identifies a component's captured step besides its state buffers: ``graph_key()`` when it has one
    (the plain values its ``step_tensors`` reads), else ``repr`` (dataclass components)."""
    key = getattr(c, "graph_key", None)
    return (type(c).__qualname__, key()) if callable(key) else repr(c)


def _get_attr(obj, name):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(obj, name, value):
    parts = name.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)
