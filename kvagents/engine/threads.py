"""How many CPU threads torch should use for decoding, chosen by measurement.

A decode step on the CPU is a chain of small matrix products. torch's default intra-op thread count (one per core)
is right on an idle machine, but when anything else keeps a core busy, OpenMP threads that wait for each other can
make a step 4-6x slower than one thread. :func:`configure_cpu_threads` therefore times a decode-sized product at
each candidate thread count (a few milliseconds) and keeps the fastest, preferring fewer threads when they are
within 10 %. :class:`~kvagents.model.KVModel` calls it when it loads a model on the CPU.

Override with the environment variable ``KVAGENTS_THREADS``: an integer (that many threads), ``torch`` (leave
torch's setting alone) or ``auto`` (the default: measure). A thread count already set with
``torch.set_num_threads`` or ``OMP_NUM_THREADS`` is respected.

Example:
    >>> from kvagents.engine.threads import measure_cpu_threads
    >>> best, timings = measure_cpu_threads(hidden=64, candidates=[1])
    >>> best
    1
"""

from __future__ import annotations

import os
import time

import torch

ENV = "KVAGENTS_THREADS"
_TORCH_DEFAULT = torch.get_num_threads()  # before anyone changed it
_chosen: int | None = None


def _candidates() -> list[int]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    top = max(1, min(cores, _TORCH_DEFAULT))
    out, t = [], 1
    while t < top:
        out.append(t)
        t *= 2
    return sorted({*out, top})


def measure_cpu_threads(hidden: int = 896, rows: int = 4, candidates: list[int] | None = None,
                        rounds: int = 3, calls: int = 8) -> tuple[int, dict[int, float]]:
    """Time ``rows x hidden @ hidden x 4*hidden`` (one MLP projection of a decode step) at each thread count in
    ``candidates``; returns ``(best, {threads: seconds per call})``. torch's thread setting is restored."""
    candidates = candidates or _candidates()
    before = torch.get_num_threads()
    x = torch.randn(rows, hidden)
    w = torch.randn(4 * hidden, hidden)
    timings: dict[int, float] = {}
    try:
        for t in candidates:
            torch.set_num_threads(t)
            torch.nn.functional.linear(x, w)  # warm-up at this count
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    torch.nn.functional.linear(x, w)
                best = min(best, (time.perf_counter() - t0) / calls)
            timings[t] = best
    finally:
        torch.set_num_threads(before)
    fastest = min(timings.values())
    chosen = min(t for t, s in timings.items() if s <= fastest * 1.1)
    return chosen, timings


def configure_cpu_threads(hidden: int = 896, *, verbose: bool = False) -> int:
    """Set torch's intra-op thread count for CPU decoding (see the module docstring) and return it.

    Measures once per process; later calls reuse the choice. Raises ``ValueError`` for a ``KVAGENTS_THREADS`` that
    is neither an integer >= 1, ``auto`` nor ``torch``."""
    global _chosen
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting == "torch":
        return torch.get_num_threads()
    if setting != "auto":
        try:
            n = int(setting)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: use a thread count >= 1, 'auto' (measure) or 'torch' "
                             "(leave torch's setting)")
        torch.set_num_threads(n)
        return n
    if torch.get_num_threads() != _TORCH_DEFAULT or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()  # set by the caller: respected
    if _chosen is None:
        _chosen, timings = measure_cpu_threads(hidden)
        if verbose:
            shown = ", ".join(f"{t}: {s * 1e3:.2f} ms" for t, s in sorted(timings.items()))
            import sys

            print(f"kvagents: CPU decode on {_chosen} thread(s) (measured per product: {shown}; "
                  f"set {ENV} to override)", file=sys.stderr)
    torch.set_num_threads(_chosen)
    return _chosen
