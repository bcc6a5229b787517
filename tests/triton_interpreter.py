"""Shared by the Triton kernel tests (test_fused_gemv.py, test_topk_values.py, ...): CPU tensors through Triton's
interpreter. Import this module before kvagents.

Triton's interpreter must be on before Triton is first imported (importing kvagents imports it, through torch's
compile stack): importing this module turns it on when it gets there first, and not on a GPU machine (it would turn
Inductor's GPU kernels into interpreted ones for the rest of the session). Otherwise the ``interp`` fixture skips
the kernel tests in-process (:func:`require_interpreter`) and :func:`rerun_under_interpreter` runs the test file
again in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def require_interpreter() -> None:
    """Skip unless this process runs Triton's interpreter (the ``interp`` fixture of tests/conftest.py): when
    Triton was imported without it (another test module came first, or a GPU machine), the file's
    test_kernel_tests_in_a_subprocess runs these tests instead."""
    pytest.importorskip("triton")
    if not INTERPRETER:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1: test_kernel_tests_in_a_subprocess runs them")


def rerun_under_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a subprocess with the interpreter on (skipped when this process has it on)."""
    pytest.importorskip("triton")
    if INTERPRETER:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(test_file).resolve())]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 units in the last place (monotone integer view of the bits)."""

    def key(t):
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (key(a) - key(b)).abs()


def load_without_triton(monkeypatch, module, name: str):
    """A fresh copy of the kernel ``module`` loaded from its file while ``import triton`` fails (the kernel tests'
    "imports without Triton" checks): ``available()`` must say False and the kernels must say what is missing."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.available() is False
    return mod
