"""Models spread over devices: KV rows gathered from layers on several GPUs and from tensor-parallel ranks.

Two ways a large model is split, both the ecosystem's own machinery:

* **Layers on different devices** (accelerate ``device_map="auto"``): layer i's cache lives on layer i's GPU.
  :func:`gather_layer_rows` stacks the selected layers' rows *per device* (one stack per run of consecutive layers
  on one device), optionally averages the heads there, and moves only that (small) stack to the target device.
* **Heads on different ranks** (transformers ``tp_plan="auto"`` under ``torchrun``): each rank's cache holds its
  own block of KV heads (``k_proj`` / ``v_proj`` are column-sharded). The rows are completed with one
  ``all_gather`` over the tensor-parallel group along the head axis (rank order = head order), or, when the caller
  only needs the head mean, by averaging locally first and gathering ``H = 1`` rows.

On one device with no tensor parallelism both reduce to ``torch.stack`` (tested against it on the CPU).

Example:
    >>> # torchrun --nproc-per-node 2 script.py, with
    >>> # llm = KVModel.from_pretrained("Qwen/Qwen3-14B", tp_plan="auto")   # or device_map="auto"
    >>> # llm.generate(prompts, params, components=[KVEmbedding()])         # same results as one GPU
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group a model's KV heads are split over (``size`` 1: not split)."""

    size: int = 1
    group: Any = None

    @classmethod
    def of(cls, model: Any) -> TensorParallel:
        """Read ``model.tp_size`` / its device mesh (transformers ``tp_plan``); 1 for everything else."""
        size = int(getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 1)
        if size <= 1:
            return cls()
        import torch.distributed as dist  # noqa: PLC0415

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"the model is tensor-parallel (tp_size={size}) but torch.distributed is not initialised; "
                "run under torchrun (transformers initialises the group when it loads with tp_plan='auto')"
            )
        group = None
        mesh = getattr(model, "_device_mesh", None)
        if mesh is not None:
            try:
                group = mesh.get_group("tp")
            except (KeyError, RuntimeError, ValueError):  # pragma: no cover - 1-D meshes name no dims
                group = mesh.get_group()
        return cls(size, group)


def shared_seed(seed: int, tp: TensorParallel) -> int:
    """``seed`` of tensor-parallel rank 0 on every rank (ranks must draw the same samples); ``seed`` otherwise."""
    if tp.size <= 1:
        return seed
    import torch.distributed as dist  # noqa: PLC0415

    box = [seed]
    dist.broadcast_object_list(box, group_src=0, group=tp.group)
    return int(box[0])


def device_of(t: torch.Tensor) -> torch.device:
    """A tensor's device (a seam: tests simulate multi-device models by replacing it)."""
    return t.device


def move(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move ``x`` to ``device`` (no-op when already there; a seam for tests)."""
    return x if x.device == device else x.to(device, non_blocking=True)


def gather_heads(x: torch.Tensor, tp: TensorParallel, axis: int = 3) -> torch.Tensor:
    """Concatenate the head blocks of all tensor-parallel ranks along ``axis`` (rank order)."""
    if tp.size <= 1:
        return x
    import torch.distributed as dist  # noqa: PLC0415

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=axis)


def gather_layer_rows(
    cache,
    layers: list[int],
    part: str,
    rows: slice | int | None = None,
    *,
    device: torch.device | str | None = None,
    heads: Literal["keep", "mean"] = "keep",
    tp: TensorParallel | None = None,
) -> torch.Tensor:
    """Rows of ``layers`` as ``[B, nL, P, H, T, d]`` (``[B, nL, P, H, d]`` for an int ``rows``) on ``device``.

    ``part`` ``"k"`` / ``"v"`` / ``"kv"`` sets ``P``; ``heads="mean"`` averages the KV heads (``H`` becomes 1)
    on each layer's own device before anything moves; ``device`` defaults to the first layer's device.
    """
    if not layers:
        raise ValueError("no layers selected")
    if part not in ("k", "v", "kv"):
        raise ValueError(f"unknown part {part!r}; use 'k', 'v' or 'kv'")
    target = torch.device(device) if device is not None else device_of(cache.layers[layers[0]].keys)
    runs: list[tuple[torch.device, list[int]]] = []
    for i in layers:
        dev = device_of(cache.layers[i].keys)
        if runs and runs[-1][0] == dev:
            runs[-1][1].append(i)
        else:
            runs.append((dev, [i]))
    blocks = []
    for _, run in runs:
        ks, vs = [], []
        for i in run:
            layer = cache.layers[i]
            k, v = layer.keys, layer.values
            if rows is not None:
                k, v = k[:, :, rows], v[:, :, rows]
            ks.append(k)
            vs.append(v)
        parts = []
        if part in ("k", "kv"):
            parts.append(torch.stack(ks, dim=1))
        if part in ("v", "kv"):
            parts.append(torch.stack(vs, dim=1))
        block = torch.stack(parts, dim=2)  # [B, nl, P, H, (T,) d] on this run's device
        if heads == "mean":
            block = block.mean(dim=3, keepdim=True)
        blocks.append(move(block, target))
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    if tp is not None and tp.size > 1:
        out = gather_heads(out, tp)
        if heads == "mean":  # equal head blocks per rank: the mean of the rank means is the mean of all heads
            out = out.mean(dim=3, keepdim=True)
    return out
