"""Process-wide model sharing and the per-model request worker.

Chat models, embeddings and runnables built with the same ``(model, dtype, device)`` share one
:class:`~kvagents.KVModel` (weights load once, on first use). Every call on a model runs under that model's lock
(``KVModel._lock``), so concurrent callers queue and never interleave on the decode loop. Async callers do not
hold a thread while they wait: their requests go to the model's single worker thread (a FIFO queue) and are
awaited as futures; calls that join the model's running batch (ChatKV's ``continuous_batching``) run on a shared
pool of caller threads instead, and the scheduler admits them between decode steps.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvagents import KVModel
from kvagents.registry import _HUB_ID_RE, REGISTRY, UnknownModelError

_MODELS: dict[tuple[str, str, str], KVModel] = {}
_WORKERS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def get_model(model: str | KVModel, dtype: str = "auto", device: str = "auto") -> KVModel:
    """The shared lazily-loading :class:`KVModel` for ``(model, dtype, device)`` (a ``KVModel`` passes through).

    Raises ``UnknownModelError`` (a ``ValueError``) at once for a name that is neither a registry name, a local
    path nor a hub id; nothing is loaded until the first call.
    """
    if isinstance(model, KVModel):
        return model
    name = str(model)
    if name not in REGISTRY and not Path(name).expanduser().exists() and not _HUB_ID_RE.fullmatch(name):
        raise UnknownModelError(name)
    key = (str(model), str(dtype), str(device))
    with _LOCK:
        llm = _MODELS.get(key)
        if llm is None:
            llm = KVModel.from_pretrained(str(model), dtype=dtype, device=device, progress=False)
            _MODELS[key] = llm
    return llm


def worker(llm: KVModel) -> ThreadPoolExecutor:
    """The model's single worker thread (its request queue for async callers)."""
    with _LOCK:
        ex = _WORKERS.get(id(llm))
        if ex is None:
            ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvagents-{llm.name}")
            _WORKERS[id(llm)] = ex
    return ex


_CALLERS: ThreadPoolExecutor | None = None


async def run_on_caller_thread(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on one of up to 64 shared threads and await it: for calls that join a model's
    running batch (its scheduler admits them between decode steps), so concurrent async callers are not queued
    behind each other here."""
    global _CALLERS
    with _LOCK:
        if _CALLERS is None:
            _CALLERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kvagents-caller")
    ctx = contextvars.copy_context()
    return await asyncio.wrap_future(_CALLERS.submit(ctx.run, fn, *args, **kwargs))


async def run_on_worker(llm: KVModel, fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on the model's worker thread and await it without blocking the event loop."""
    fut: Future = worker(llm).submit(fn, *args, **kwargs)
    return await asyncio.wrap_future(fut)
