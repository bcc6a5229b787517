"""kvagents.kernels.top_p_search (the nucleus by a ways-ary search, as Triton kernels) on CPU through Triton's interpreter.

Against (1) the sort-and-cumsum nucleus of kvagents.engine.sampling (an independent computation: exact equality on random
logits at several scales and top_p in {0.1, 0.5, 0.9, 0.95}), and (2) the torch search
kvagents.engine.fast_sampling._top_p_keep_impl (the same brackets) and the rule "keep v iff the mass strictly above p_v is
at most top_p" for ways 2, 3 and 8: several chunks per row, V not a multiple of the block, the chunks' partials
summed over several tiles, B = 1 and 5, one-hot rows, uniform rows (ties: all or none kept), rows with zeros, an
all-zero row, row and column strides. Then the launches (a fixed number, grids and scratch following the shapes
only), the argument errors, the import without Triton, and (without a GPU) an sm_90 compilation of both kernels.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

# before kvagents: turns Triton's interpreter on when this process can have it (see tests/triton_interpreter.py)
from triton_interpreter import load_without_triton, rerun_under_interpreter  # noqa: E402

from kvagents.engine.fast_sampling import _top_p_keep_impl  # noqa: E402
from kvagents.kernels import top_p_search as tps  # noqa: E402
from kvagents.kernels.top_p_search import default_block, n_passes, plan, top_p_keep_kernel  # noqa: E402

TOP_PS = (0.1, 0.5, 0.9, 0.95)


def test_kernel_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """kvagents.engine.sampling's rule: sort, keep while the mass before a token is at most top_p."""
    sp, order = probs.sort(-1, descending=True)
    keep_sorted = (sp.cumsum(-1) - sp) <= top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def mass_above_rule(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep v iff the mass of the tokens strictly more probable than v is at most top_p (ties all kept or all
    dropped), summed in float64."""
    p = probs.double()
    above = torch.where(p[:, None, :] > p[:, :, None], p[:, None, :], 0.0).sum(-1)  # [B, V]: mass above token v
    return above <= top_p


def special_rows(v: int, seed: int) -> torch.Tensor:
    """Five rows: random (scale 3), one-hot, uniform (ties), random with a third zeros, random (scale 10)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(5, v)
    rows[0] = (torch.randn(v, generator=g) * 3).softmax(-1)
    rows[1] = torch.zeros(v)
    rows[1, v // 3] = 1.0
    rows[2] = torch.full((v,), 1.0 / v)
    logits = torch.randn(v, generator=g) * 2
    logits[torch.randperm(v, generator=g)[: v // 3]] = float("-inf")
    rows[3] = logits.softmax(-1)
    rows[4] = (torch.randn(v, generator=g) * 10).softmax(-1)
    return rows


# -- the sort-and-cumsum nucleus ------------------------------------------------------------------------------------
def test_keeps_the_sorted_nucleus(interp):
    """Random logits at three scales (four rows each, V = 3000, one chunk): the sorted nucleus, exactly."""
    g = torch.Generator().manual_seed(0)
    probs = torch.cat([(torch.randn(4, 3000, generator=g) * s).softmax(-1) for s in (0.5, 3.0, 10.0)])
    for top_p in TOP_PS:
        want = sorted_nucleus(probs, top_p)
        got = top_p_keep_kernel(probs, top_p, block=4096)
        assert got.dtype == torch.bool and got.shape == probs.shape
        assert torch.equal(got, want), (top_p, (got != want).sum(-1))


# -- the torch search -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ways,block,tile", [(8, 64, 2), (3, 64, 64), (2, 128, 64)])
def test_equals_the_torch_search_over_chunks(interp, monkeypatch, ways, block, tile):
    """B = 5 special rows of V = 300 in chunks of 64 (the last one 44) or 128: the torch search's mask, the
    mass-above rule, and on the rows without ties the sorted nucleus. tile = 2: the partials are summed over the
    5 chunks in three tiles."""
    monkeypatch.setattr(tps, "REDUCE_TILE", tile)
    probs = special_rows(300, seed=ways)
    distinct = [0, 4]  # rows 1-3 have ties (the zeros, the uniform row): the sort keeps some of them
    for top_p in (0.5, 0.9):
        got = top_p_keep_kernel(probs, top_p, ways, block=block)
        assert torch.equal(got, _top_p_keep_impl(probs, top_p, ways)), (ways, top_p)
        assert torch.equal(got, mass_above_rule(probs, top_p)), (ways, top_p)
        assert torch.equal(got[distinct], sorted_nucleus(probs[distinct], top_p)), (ways, top_p)
        assert got[1].sum() == 1 and got[1, 100]  # one-hot: only the token with the mass
        assert bool(got[2].all())  # uniform: nothing is more probable than anything, all kept
        assert not bool(got[3][probs[3] == 0].any())  # zeros are never kept


@pytest.mark.parametrize("ways", [2, 3, 8])
def test_one_row_many_chunks(interp, ways):
    """B = 1, V = 1000 in 8 chunks of 128 (the last one 104)."""
    g = torch.Generator().manual_seed(ways)
    probs = (torch.randn(1, 1000, generator=g) * 4).softmax(-1)
    got = top_p_keep_kernel(probs, 0.95, ways, block=128)
    assert torch.equal(got, _top_p_keep_impl(probs, 0.95, ways))
    assert torch.equal(got, sorted_nucleus(probs, 0.95))


def test_strides_and_an_all_zero_row(interp):
    """Rows of a wider buffer (row stride 80), a transposed tensor (column stride > 1), and a row of zeros (kept
    whole, as by the torch search: nothing is above the maximum 0)."""
    g = torch.Generator().manual_seed(7)
    wide = torch.zeros(3, 80)
    wide[:2, :70] = (torch.randn(2, 70, generator=g) * 3).softmax(-1)
    probs = wide[:, :70]
    assert probs.stride() == (80, 1)
    got = top_p_keep_kernel(probs, 0.9, block=32)
    assert torch.equal(got, _top_p_keep_impl(probs.contiguous(), 0.9, 8))
    assert bool(got[2].all()) and got[:2].sum() < 140
    t = probs.contiguous().t().contiguous().t()
    assert t.stride() == (1, 3)
    assert torch.equal(top_p_keep_kernel(t, 0.9, block=32), got)


class _Recorder:
    """A kernel whose launches record their grid and constexpr flags."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kw):
            self.grids.append((grid, kw.get("FIRST"), kw.get("FINAL")))
            return launch(*args, **kw)

        return call


def test_launches_and_scratch_follow_shapes_not_values(interp, monkeypatch):
    """No host synchronisation: passes + 2 launches, the same grids and scratch for any probabilities."""
    sizes, grids = [], []
    real_empty, real_kernels = torch.empty, tps._kernels

    def spy(*shape, **kw):
        if sys._getframe(1).f_globals.get("__name__") == tps.__name__:
            sizes.append(tuple(shape[0]))
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    monkeypatch.setattr(tps, "_kernels", lambda: tuple(_Recorder(k, grids) for k in real_kernels()))
    onehot = torch.zeros(2, 100)
    onehot[:, 3] = 1.0
    for probs in (onehot, torch.randn(2, 100).softmax(-1)):
        got = top_p_keep_kernel(probs, 0.5, 16, block=64)
        assert torch.equal(got, _top_p_keep_impl(probs, 0.5, 16))
    passes = n_passes(16)
    assert passes == 8
    assert sizes == [(2, 100), (2, 2), (2, 2, 2, 15), (2, 2, 2)] * 2, sizes
    want = [((2, 2), None, None)] + [((2, 2), k == 0, k == passes) for k in range(passes + 1)]
    assert grids == want * 2, grids


def test_empty_shapes_launch_nothing(interp, monkeypatch):
    monkeypatch.setattr(tps, "_kernels", lambda: pytest.fail("launched"))
    assert top_p_keep_kernel(torch.zeros(0, 10), 0.9).shape == (0, 10)
    assert top_p_keep_kernel(torch.zeros(3, 0), 0.9).shape == (3, 0)


# -- the plan -------------------------------------------------------------------------------------------------------
def test_fast_path_sampling_with_the_kernels_equals_the_torch_search(interp, monkeypatch):
    """The fast path's sampled decoding (n = 3, temperature + top-p) with KVAGENTS_TOPP=kernel takes the same tokens
    as with the torch search passes (KVAGENTS_TOPP=search), and top_p_keep(kernel=True) goes through the custom op."""
    from tiny import ByteTokenizer, tiny_model

    from kvagents import SamplingParams
    from kvagents.engine.fast_decode import FastDecodeEngine, top_p_keep

    probs = torch.randn(3, 500).mul(3).softmax(-1)
    assert torch.equal(top_p_keep(probs, 0.9, kernel=True), top_p_keep(probs, 0.9, kernel=False))
    model = tiny_model("qwen3")
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, n=3, seed=3)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    out = {}
    for impl in ("kernel", "search"):
        monkeypatch.setenv("KVAGENTS_TOPP", impl)
        fast = FastDecodeEngine(model, ByteTokenizer(), bucket=8, sync_every=4)
        assert fast._topp_kernel == (impl == "kernel")
        out[impl] = [x.token_ids for x in fast.generate(prompts, params).flat]
    assert out["kernel"] == out["search"]
    monkeypatch.setenv("KVAGENTS_TOPP", "auto")  # the kernels only for a CUDA model, the interpreter aside
    assert not FastDecodeEngine(model, ByteTokenizer(), bucket=8)._topp_kernel


def test_passes_and_default_blocks():
    assert [n_passes(w) for w in range(2, 17)] == [31, 20, 16, 14, 12, 12, 11, 10, 10, 9, 9, 9, 9, 8, 8]
    assert default_block(1, 151936) == 1024  # 149 programs
    assert default_block(8, 151936) == 8192  # 152
    assert default_block(32, 151936) == 8192  # 608: MAX_BLOCK
    assert default_block(4, 300) == 512  # the row, rounded up
    assert default_block(1, 5) == 16
    assert plan(5, 300, 3, 64) == (64, 5, 20)


# -- arguments ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((torch.zeros(2, 3, 4), 0.9), {}, "probs must be [B, V], got shape [2, 3, 4]"),
        ((torch.zeros(8), 0.9), {}, "probs must be [B, V], got shape [8]"),
        ((torch.zeros(2, 8, dtype=torch.float64), 0.9), {}, "probs must be float32, got torch.float64"),
        ((torch.zeros(2, 8, dtype=torch.bfloat16), 0.9), {}, "probs must be float32, got torch.bfloat16"),
        ((torch.zeros(2, 8), 0.0), {}, "top_p must be a number in (0, 1], got 0.0"),
        ((torch.zeros(2, 8), 1.5), {}, "top_p must be a number in (0, 1], got 1.5"),
        ((torch.zeros(2, 8), float("nan")), {}, "got nan"),
        ((torch.zeros(2, 8), True), {}, "got True"),
        ((torch.zeros(2, 8), "0.9"), {}, "got '0.9'"),
        ((torch.zeros(2, 8), 0.9, 1), {}, "ways must be an int in 2..16, got 1"),
        ((torch.zeros(2, 8), 0.9, 17), {}, "ways must be an int in 2..16, got 17"),
        ((torch.zeros(2, 8), 0.9, 8.0), {}, "ways must be an int in 2..16, got 8.0"),
        ((torch.zeros(2, 8), 0.9), dict(block=100), "block must be a power of two >= 16, got 100"),
        ((torch.zeros(2, 8), 0.9), dict(block=8), "block must be a power of two >= 16, got 8"),
        ((torch.zeros(2, 8), 0.9), dict(block=64.0), "got 64.0"),
        ((torch.zeros(1, 65536 * 16 + 1), 0.9), dict(block=16), "into 65537 chunks, more than 65535"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_value(args, kw, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        top_p_keep_kernel(*args, **kw)


def test_bad_argument_type():
    with pytest.raises(TypeError, match="probs must be a tensor, got list"):
        top_p_keep_kernel([[0.5, 0.5]], 0.9)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(tps, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CPU tensors run only under Triton's interpreter"):
        top_p_keep_kernel(torch.zeros(2, 8), 0.9)


def test_module_imports_without_triton(monkeypatch):
    mod = load_without_triton(monkeypatch, tps, "top_p_search_no_triton")
    with pytest.raises(RuntimeError, match="needs triton"):
        mod._build()


AOT = r"""
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("top_p_search_aot", sys.argv[1])
tps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tps)
(max_kernel, pass_kernel), interpreted = tps._build()
assert not interpreted
target = GPUTarget("cuda", 90, 32)
# what the JIT sees for aligned tensors and V and a row stride that are multiples of 16 (V = 151936 is)
aligned = lambda idx: {(i,): [["tt.divisibility", 16]] for i in idx}
consts = dict(BLOCK=8192)
sig = dict(bits_ptr="*i32", pmax_ptr="*i32", V="i32", C="i32", stride_b="i32", BLOCK="constexpr")
try:
    src = ASTSource(fn=max_kernel, signature=sig, constexprs=consts, attrs=aligned([0, 1, 2, 4]))
except TypeError:
    print("SKIP: this triton's ASTSource takes other arguments"); sys.exit(0)
ptx = triton.compile(src, target=target, options=dict(num_warps=8)).asm["ptx"]
assert "ld.global.v4" in ptx, "the row is not read in 16-byte vectors"
names = ["bits_ptr", "pmax_ptr", "mass_in_ptr", "mass_out_ptr", "br_in_ptr", "br_out_ptr", "out_ptr", "top_p", "V",
         "C", "stride_b"]
types = ["*i32", "*i32", "*fp32", "*fp32", "*i64", "*i64", "*u8", "fp32", "i32", "i32", "i32"]
for ways, first, final in [(8, True, False), (8, False, False), (8, False, True), (16, False, False), (3, True, False)]:
    c = dict(WAYS=ways, WP=tps._next_pow2(ways - 1), BLOCK=8192, CB=32, FIRST=first, FINAL=final)
    sig = dict(zip(names, types), **{n: "constexpr" for n in c})
    src = ASTSource(fn=pass_kernel, signature=sig, constexprs=c, attrs=aligned([*range(7), 8, 10]))
    ptx = triton.compile(src, target=target, options=dict(num_warps=8)).asm["ptx"]
    assert "ld.global.v4" in ptx, "the row is not read in 16-byte vectors"
print("OK")
"""


def test_kernels_compile_for_hopper():
    """No GPU needed: Triton compiles both kernels (first, middle and final passes; 3, 8 and 16 ways) to sm_90
    code with 16-byte row loads (the interpreter does not run the GPU front end); in a subprocess, interpreter
    off."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's warning
    p = subprocess.run([sys.executable, "-c", AOT, tps.__file__], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    if "SKIP:" in p.stdout:
        pytest.skip(p.stdout.strip())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
