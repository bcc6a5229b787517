"""Cold first calls: kvagents' Triton kernels compiled in worker processes while the main process compiles the rest.

A fresh process JIT-compiles each Triton kernel at its first launch, one after another in the main thread: on an
H100 host the five one-row GEMVs of the 8B shape took 1.8-2.6 s of a cold first call, and the several-row GEMVs,
the attention, RoPE and top-k kernels as much again, all before Inductor compiles the sampling head (7-10 s).
Threads do not help much: about half of Triton's compile holds the GIL (8 kernels for sm_90 on 2 cores: 1.9 s
serial, 1.4 s in two threads).

:class:`KernelPrecompiler` runs a step once with those compiles *recorded instead of done* (Triton's
``knobs.runtime.jit_cache_hook``: the kernels' launches do nothing while it records, so the caller restores any
state the step touched), and hands each recorded specialisation to a worker process (``python -m
kvagents.kernels.kernel_precompile``) at once. A worker compiles it into Triton's on-disk cache with Triton's own
``JITFunction.preload`` under a driver that only names the target, so it opens no CUDA context; the real launches
then find the kernels there. Meanwhile the same step goes on to Inductor's compile of the sampling head in this
process. Nothing here changes what a kernel computes: a failed or missing worker only means the launch compiles
the kernel itself, as before.

Measured, it does not pay (H100, Triton 3.6, 8B shape, cold caches, 2026-12-06): the workers compiled all 14
kernels of the 1x8 step but took 15.4 s doing it (each imports torch and Triton, then compiles), against about
2 s of serial JIT in the main process, and Inductor's compile of the head beside them slowed from 5.7 to 9.1 s:
first call 20.2 s with it against 14.6 s without (B=1: 19.6 against 11.8 s). Hence opt-in
(``KVAGENTS_PRECOMPILE=1``); it may pay where the kernels' JIT is long and the host has idle cores.

Example:
    >>> pre = KernelPrecompiler()  # doctest: +SKIP
    >>> with pre.recording():  # doctest: +SKIP
    ...     step()  # kvagents' kernels recorded and sent to workers; their launches do nothing
    >>> pre.wait()  # doctest: +SKIP
    {'recorded': 7, 'compiled': 7, 'failed': 0, 'seconds': 1.9}
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .triton_support import interpreting, triton_modules

__all__ = ["KernelPrecompiler", "compile_specialization", "find_kernel"]


def find_kernel(obj: Any, qualname: str):
    """The Triton ``JITFunction`` whose function is named ``qualname`` inside ``obj`` (a kernel module's ``_build()``
    result: nested tuples of kernels), or None."""
    fn = getattr(obj, "fn", None)
    if fn is not None and getattr(fn, "__qualname__", None) == qualname:
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = find_kernel(item, qualname)
            if found is not None:
                return found
    return None


class _TargetDriver:
    """A Triton driver that only names the compile target: ``preload`` compiles with it and opens no CUDA context."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def compile_specialization(module: str, qualname: str, spec: str) -> None:
    """Compile one recorded kernel specialisation into Triton's on-disk cache (in a worker process): the kernel is
    ``qualname`` of ``module``'s ``_build()``, ``spec`` the JSON Triton serialised when the launch asked for it."""
    tt = triton_modules()
    if tt is None:
        raise RuntimeError("compile_specialization needs triton")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    kernel = find_kernel(importlib.import_module(module)._build(), qualname)
    if kernel is None:
        raise LookupError(f"no Triton kernel {qualname!r} in {module}._build()")
    # left active: a worker process only compiles (the default driver may not even load here, e.g. without a GPU)
    driver.set_active(_TargetDriver(GPUTarget(**json.loads(spec)["target"])))
    kernel.preload(spec)


def _worker() -> None:
    """``python -m kvagents.kernels.kernel_precompile``: one JSON job per stdin line, one JSON result per stdout line."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the compile prints stays off the result channel
    for line in sys.stdin:
        job = json.loads(line)
        t = time.perf_counter()
        try:
            compile_specialization(job["module"], job["qualname"], job["spec"])
            res = {"id": job["id"], "ok": True}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which then compiles it itself
            res = {"id": job["id"], "ok": False, "error": f"{type(e).__name__}: {e}"}
        res["seconds"] = time.perf_counter() - t
        out.write(json.dumps(res) + "\n")
        out.flush()


class KernelPrecompiler:
    """Record the compiles of kvagents' Triton kernels during a step and compile them in ``workers`` processes.

    ``prefix``: the modules whose kernels are recorded (others compile as usual). ``available()`` is False where
    there is nothing to gain or no hook to record with (no Triton, Triton's interpreter, an old Triton); then
    :meth:`recording` records nothing and the step runs as usual.
    """

    def __init__(self, workers: int | None = None, prefix: str = "kvagents.", target=None) -> None:
        self.workers = max(1, workers if workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2)))
        self.prefix = prefix
        # the compile target (a triton GPUTarget) for specialisations serialised without one (Triton <= 3.6 leaves
        # it out; its preload takes the driver's): None = this process's active driver's, looked up when needed
        self.target = target
        self._procs: list[subprocess.Popen] = []
        self._jobs: dict[int, dict] = {}
        self._seen: set[str] = set()
        self._next = 0
        self._t0 = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        tt = triton_modules()
        if tt is None or interpreting():
            return False
        knobs = getattr(tt[0], "knobs", None)
        return knobs is not None and hasattr(knobs.runtime, "jit_cache_hook")

    def _hook(self, prev):
        def hook(*args, **kwargs):
            info, comp = kwargs.get("fn"), kwargs.get("compile") or {}
            module = str(getattr(info, "module", "") or "")
            qualname = getattr(info, "name", None)
            spec = comp.get("specialization_data")
            if module.startswith(self.prefix) and qualname and spec:
                self._submit(module, qualname, spec)
                return True  # recorded: the launch does nothing
            return prev(*args, **kwargs) if prev is not None else None

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[KernelPrecompiler]:
        """While active, a launch of a not yet compiled kernel of ``prefix`` records its specialisation, sends it to
        a worker and returns without running (its outputs keep whatever they held)."""
        if not self.available():
            yield self
            return
        knobs = triton_modules()[0].knobs
        prev = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = self._hook(prev)
        try:
            yield self
        finally:
            knobs.runtime.jit_cache_hook = prev

    def _with_target(self, spec: str) -> str:
        """``spec`` with a ``target`` entry: its own, else :attr:`target` (the active driver's by default)."""
        obj = json.loads(spec)
        if "target" in obj:
            return spec
        if self.target is None:
            from triton.runtime.driver import driver

            self.target = driver.active.get_current_target()
        obj["target"] = dict(vars(self.target))
        return json.dumps(obj)

    def _submit(self, module: str, qualname: str, spec: str) -> None:
        spec = self._with_target(spec)
        with self._lock:
            if spec in self._seen:
                return
            self._seen.add(spec)
            if not self._procs:
                self._t0 = time.perf_counter()
                env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
                # the workers import this package from where this process did (a checkout on sys.path, say)
                root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
                for _ in range(self.workers):
                    self._procs.append(subprocess.Popen(
                        [sys.executable, "-m", "kvagents.kernels.kernel_precompile"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env))  # fmt: skip
            job = {"id": self._next, "module": module, "qualname": qualname, "spec": spec}
            proc = self._procs[self._next % len(self._procs)]
            self._jobs[self._next] = job
            self._next += 1
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()

    def wait(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the workers (at most ``timeout`` seconds in all), then stop them. Returns counts: ``recorded``,
        ``compiled``, ``failed`` (those compile at their next launch instead) and ``seconds`` since the first
        record; ``errors`` lists the failures' messages."""
        with self._lock:
            procs, self._procs = self._procs, []
            jobs, self._jobs = self._jobs, {}
        stats: dict[str, Any] = {"recorded": len(jobs), "compiled": 0, "failed": 0, "seconds": 0.0, "errors": []}
        deadline = time.perf_counter() + timeout
        for i, proc in enumerate(procs):
            expected = sum(1 for j in jobs if j % len(procs) == i)
            with contextlib.suppress(OSError):
                proc.stdin.close()
            done = 0
            while done < expected and time.perf_counter() < deadline:
                line = _readline(proc, deadline - time.perf_counter())
                if not line:
                    break
                res = json.loads(line)
                done += 1
                if res.get("ok"):
                    stats["compiled"] += 1
                else:
                    stats["errors"].append(f"{jobs[res['id']]['qualname']}: {res.get('error')}")
            try:
                proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
        stats["failed"] = stats["recorded"] - stats["compiled"]
        stats["seconds"] = round(time.perf_counter() - self._t0, 2) if jobs else 0.0
        return stats


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, or '' when it ends or ``timeout`` passes."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(max(0.0, timeout))
    return box[0] if box else ""


if __name__ == "__main__":
    _worker()
