"""kvagents.kernels.kernel_precompile: recorded kernel specialisations compiled by worker processes into Triton's disk cache,
where the launch's own compile then finds them; and the fast path's recording pass leaves results unchanged.

Without a GPU the JIT launch path cannot run, so the round trip is checked from the other side: a specialisation
serialised as Triton's JIT serialises it, compiled for sm_90 by a worker process, then compiled here from the same
source, target and options must be a cache hit (no new cache entry). The recording hook itself runs only on CUDA
(the CUDA test in test_fast_decode covers the fast path with it)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from kvagents.kernels import kernel_precompile
from kvagents.kernels.kernel_precompile import KernelPrecompiler, find_kernel

ROUND_TRIP = r"""
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import serialize_specialization_data
from kvagents.kernels import fused_gemv
from kvagents.kernels.kernel_precompile import KernelPrecompiler

cache = os.environ["TRITON_CACHE_DIR"]
kernel = fused_gemv._build()[0][0]
target = GPUTarget("cuda", 90, 32)
options = make_backend(target).parse_options(dict(num_warps=4, num_stages=1))
names = [p.name for p in kernel.params]
values = dict(HAS_BIAS=False, HAS_RMS=True, SWIGLU=False, HAS_RES=False, BLOCK_N=8, BLOCK_K=512, XBLOCK=2048,
              NUM_STAGES=1, EVEN_K=True, EMU_BF16=False)
types = dict(zip(names, ["*bf16"] * 5 + ["*fp32", "i32", "i32", "i32", "fp32"]))
signature = {n: ("constexpr" if n in values else types[n]) for n in names}
constexprs = {(i,): values[n] for i, n in enumerate(names) if n in values}  # keyed by argument path, as the JIT does
attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
spec = serialize_specialization_data(f"{kernel.fn.__module__}.{kernel.fn.__qualname__}", signature, constexprs,
                                     attrs, options, "key", target)
pre = KernelPrecompiler(workers=1)
pre._submit(kernel.fn.__module__, kernel.fn.__qualname__, spec)
pre._submit(kernel.fn.__module__, kernel.fn.__qualname__, spec)  # the same specialisation goes out once
old = json.loads(spec)  # as Triton <= 3.6 serialises it: no target (the parent adds its own, here sm_90's)
del old["target"]
pre.target = target
pre._submit(kernel.fn.__module__, kernel.fn.__qualname__, json.dumps(old))
stats = pre.wait(timeout=300)
assert stats["recorded"] == 1 and stats["compiled"] == 1, stats
after_worker = sorted(os.listdir(cache))
assert after_worker, "the worker wrote nothing to the cache"
triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
assert sorted(os.listdir(cache)) == after_worker, "the launch's compile missed the worker's cache entry"
bad = KernelPrecompiler(workers=1)
bad._submit(kernel.fn.__module__, "no_such_kernel", spec)
stats = bad.wait(timeout=300)
assert stats["failed"] == 1 and "no_such_kernel" in stats["errors"][0], stats
print("OK")
"""


def test_worker_compiles_a_recorded_specialisation_into_the_cache_the_launch_reads(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    try:
        from triton.runtime.jit import serialize_specialization_data  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no serialize_specialization_data")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    p = subprocess.run([sys.executable, "-c", ROUND_TRIP], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def test_find_kernel_and_no_recording_without_a_gpu_compiler():
    class K:
        def __init__(self, fn):
            self.fn = fn

    def a():
        pass

    def b():
        pass

    ka, kb = K(a), K(b)
    assert find_kernel(((ka,), kb), b.__qualname__) is kb
    assert find_kernel((ka, kb), "nope") is None
    pre = KernelPrecompiler(workers=2)
    if not KernelPrecompiler.available():  # no Triton, or its interpreter (the CPU tests): recording is a no-op
        with pre.recording():
            pass
        assert pre.wait() == {"recorded": 0, "compiled": 0, "failed": 0, "seconds": 0.0, "errors": []}
    assert kernel_precompile.__all__ == ["KernelPrecompiler", "compile_specialization", "find_kernel"]
    assert torch is not None


class GarbagePass:
    """A recording pass as the GPU may leave it, on the CPU: the step's kernels do nothing, so the logits are
    garbage (NaN) and the step's K/V column holds garbage (NaN) too."""

    def __init__(self, engine, log, fail=False):
        self.engine, self.log, self.fail = engine, log, fail

    @contextlib.contextmanager
    def recording(self):
        lm = self.engine.lm
        real = lm.step

        def garbage(ids, pos, col, start, K, V, *args, **kwargs):
            K.index_fill_(3, col, float("nan"))
            V.index_fill_(3, col, float("nan"))
            if self.fail:
                raise RuntimeError("a kernel launch failed")
            return torch.full((ids.shape[0], lm.vocab), float("nan"))

        lm.step = garbage
        try:
            yield self
        finally:
            lm.step = real
            self.log.append("pass")

    def wait(self):
        return {"recorded": 0, "compiled": 0, "failed": 0, "seconds": 0.0, "errors": []}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fast_path_recording_pass_leaves_results_unchanged(arch):
    """The pass runs a whole step (forward + head + graph components) on garbage and must undo it: tokens, finish
    reasons and component outputs equal the eager engine's."""
    from test_engine import PROMPTS
    from test_fast_decode import assert_same_results, comps
    from tiny import ByteTokenizer, tiny_model

    from kvagents import SamplingParams
    from kvagents.engine.decode import DecodeEngine
    from kvagents.engine.fast_decode import FastDecodeEngine

    model = tiny_model(arch)
    fast = FastDecodeEngine(model, ByteTokenizer(), bucket=4, sync_every=3, precompile=True)
    log = []
    fast._precompiler = lambda: GarbagePass(fast, log)
    eager = DecodeEngine(model, ByteTokenizer())
    for params in (SamplingParams(max_new_tokens=12, temperature=0, n=2),
                   SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[213, 57, 94])):
        assert_same_results(eager.generate(PROMPTS, params, comps()), fast.generate(PROMPTS, params, comps()))
    assert log == ["pass", "pass"]  # one pass per call here (no graphs on the CPU: every call is a first capture)
    assert len(fast.precompile_stats) == 2 and fast.precompile_stats[0]["recorded"] == 0
    assert not FastDecodeEngine(model, ByteTokenizer()).precompile  # off by default (and without CUDA graphs)
    fast._precompiler = lambda: GarbagePass(fast, log, fail=True)  # a pass that fails half-way: warned, undone
    params = SamplingParams(max_new_tokens=12, temperature=0, n=2)
    with pytest.warns(RuntimeWarning, match="recording pass failed .RuntimeError: a kernel launch failed"):
        got = fast.generate(PROMPTS, params, comps())
    assert_same_results(eager.generate(PROMPTS, params, comps()), got)
    assert fast.precompile_stats[-1]["error"] == "RuntimeError: a kernel launch failed"


CUDA_PASS = r"""
import copy, json, sys
sys.path.insert(0, "tests")
import torch
from test_engine import PROMPTS
from test_fast_decode import assert_same_results, comps
from tiny import ByteTokenizer, tiny_model
from kvagents import SamplingParams
from kvagents.engine.decode import DecodeEngine
from kvagents.engine.fast_decode import FastDecodeEngine

model = copy.deepcopy(tiny_model("qwen3")).cuda()
eager = DecodeEngine(model, ByteTokenizer())
fast = FastDecodeEngine(model, ByteTokenizer(), bucket=8, sync_every=4, precompile=True)
for params in (SamplingParams(max_new_tokens=20, temperature=0, n=2, stop_token_ids=[212]),
               SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, n=3, seed=1)):
    want = eager.generate(PROMPTS, params, comps()) if params.greedy else None
    got = fast.generate(PROMPTS, params, comps())
    if want is not None:
        assert_same_results(want, got)
one = SamplingParams(max_new_tokens=20, temperature=0)
assert_same_results(eager.generate([PROMPTS[0]], one, comps()), fast.generate([PROMPTS[0]], one, comps()))
print(json.dumps(fast.precompile_stats))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs + Triton JIT)")
def test_cuda_recording_pass_compiles_kernels_in_workers(tmp_path):
    """A fresh process and Triton cache: the fast path's recording pass sends the Triton kernels it meets to worker
    processes, every one compiles there, and the results equal the eager engine's."""
    import json

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), KVAGENTS_ATTN="triton", KVAGENTS_GEMV_ROWS="32")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", CUDA_PASS], env=env, cwd=root, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats and stats[0]["recorded"] > 0, stats
    assert all(s["failed"] == 0 for s in stats), stats
