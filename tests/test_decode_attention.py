"""kvagents.kernels.decode_attention against the decode step's SDPA attention (kvagents.engine.static_cache.attend with the
additive attention_mask), on CPU through Triton's interpreter.

The cases: float32 (equal up to the float32 summation order) and bfloat16 / float16 (within an ulp of SDPA, and
equal to the float32 attention rounded once); grouped-query factors 1, 4 and 3 (not a power of two); one row and
five rows with their own ``start`` (0, ``== col``: one column, large), ``col < length - 1``, ``length`` not a
multiple of the chunk, many splits; finished rows (exact zeros). K/V hold NaN everywhere a live row must not look
(left padding, past ``col``, past ``length``, the finished rows): none reaches an output, so none is read. The
cache is the layer view ``K[i]`` of a 5-d ``[L, B, H_kv, cap, d]`` buffer. Then the split plan and configuration,
the argument errors, the import without Triton, and (without a GPU) an sm_90 compilation of both kernels.
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

from kvagents.engine.static_cache import attend, attention_mask  # noqa: E402
from kvagents.kernels import decode_attention as da  # noqa: E402
from kvagents.kernels.decode_attention import decode_attention, plan, resolve_config  # noqa: E402

NAN = float("nan")
SMALL = dict(BLOCK_N=16, CHUNK=16)  # many splits on small caches


def test_kernel_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)


def reference(q, k, v, start, col, length: int, scale: float) -> torch.Tensor:
    """The decode step's attention: SDPA over the first ``length`` columns with the additive mask."""
    cols = torch.arange(k.shape[2])
    mask = attention_mask(col, start, cols[:length], q.dtype)
    return attend(q, k[:, :, :length], v[:, :, :length], mask, scale, k.shape[1])


class Case:
    """A ``[2, B, H_kv, cap, d]`` cache (layer 1 is attended), queries, and the rows' ranges."""

    def __init__(self, b, hkv, g, d, cap, length, col, starts, live=None, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.K = torch.randn(2, b, hkv, cap, d, generator=gen).to(dtype)
        self.V = torch.randn(2, b, hkv, cap, d, generator=gen).to(dtype)
        self.q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
        self.start = torch.tensor(starts, dtype=torch.long)
        self.col = torch.tensor([col])
        self.live = torch.ones(b, dtype=torch.bool) if live is None else torch.tensor(live)
        self.length, self.scale, self.dtype = length, d**-0.5, dtype

    def poisoned(self):
        """Copies of K and V with NaN wherever a live row must not look, and all over the dead rows."""
        K, V = self.K.clone(), self.V.clone()
        cap = K.shape[3]
        cols = torch.arange(cap)
        for b in range(K.shape[1]):
            outside = (cols < self.start[b]) | (cols > self.col[0]) if self.live[b] else torch.ones(cap, dtype=bool)
            K[:, b, :, outside] = NAN
            V[:, b, :, outside] = NAN
        K[0], V[0] = NAN, NAN  # the other layer
        return K, V

    def run(self, K=None, V=None, config=None):
        K, V = (self.K, self.V) if K is None else (K, V)
        return decode_attention(self.q, K[1], V[1], self.start, self.col, self.live, self.scale, self.length,
                                config=config)  # fmt: skip

    def check(self, config=None) -> torch.Tensor:
        """The kernels on the poisoned cache against SDPA on the clean one: live rows equal (within the dtype's
        tolerance), dead rows exactly zero."""
        want = reference(self.q, self.K[1], self.V[1], self.start, self.col, self.length, self.scale)
        got = self.run(*self.poisoned(), config=config)
        assert got.dtype == self.dtype and got.shape == want.shape
        assert not got.isnan().any()
        assert bool((got[~self.live] == 0).all())
        live = self.live
        if self.dtype == torch.float32:
            torch.testing.assert_close(got[live], want[live], rtol=1e-5, atol=1e-5)
        else:
            # within an ulp of SDPA, and the float32 attention rounded once (the kernels' contract), nearly exactly
            torch.testing.assert_close(got[live].float(), want[live].float(), rtol=1e-2, atol=1e-2)
            f = lambda t: t.float()  # noqa: E731
            exact = reference(f(self.q), f(self.K[1]), f(self.V[1]), self.start, self.col, self.length, self.scale)
            exact = exact.to(self.dtype)[live].float()
            ulp = exact.abs().clamp_min(1e-3) * torch.finfo(self.dtype).eps
            assert bool(((got[live].float() - exact).abs() <= ulp).all())
        return got


# -- against SDPA ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("g", [1, 4, 3])
@pytest.mark.parametrize("b", [1, 5])
def test_matches_sdpa_with_row_ranges_and_many_splits(interp, dtype, g, b):
    """cap 48, length 45 (three chunks of 16, the last partial), col 37; rows: start 0, start == col (one column),
    a middle start, a dead row, a start in the last chunk."""
    starts, live = ([5], [True]) if b == 1 else ([0, 37, 13, 2, 33], [True, True, True, False, True])
    case = Case(b, 2, g, 32, cap=48, length=45, col=37, starts=starts, live=live, dtype=dtype, seed=b * 10 + g)
    case.check(SMALL)


def test_default_plan_and_unaligned_blocks(interp):
    """The default configuration (3 splits of 128 at B * H_kv = 2), and 32-column blocks over ranges that start
    and end mid-block."""
    case = Case(2, 1, 4, 64, cap=320, length=300, col=290, starts=[0, 77], seed=1)
    assert resolve_config(2, 1, 300, 64)["CHUNK"] == 128
    case.check()
    case.check(dict(BLOCK_N=32, CHUNK=64, num_warps=2, num_stages=1))


def test_float16(interp):
    case = Case(3, 2, 2, 16, cap=40, length=40, col=39, starts=[0, 39, 20], dtype=torch.float16, seed=2)
    case.check(SMALL)


def test_dead_rows_read_nothing_and_give_zeros(interp):
    """Every row finished, K/V all NaN: zeros; a live row with no column (start > col) gives zeros too."""
    case = Case(3, 2, 4, 16, cap=32, length=32, col=20, starts=[0, 5, 25], live=[False, False, True], seed=3)
    out = case.run(torch.full_like(case.K, NAN), torch.full_like(case.V, NAN), config=SMALL)
    assert torch.equal(out, torch.zeros_like(out))
    case.live[:] = False
    out = case.run(torch.full_like(case.K, NAN), torch.full_like(case.V, NAN))
    assert torch.equal(out, torch.zeros_like(out))


def test_one_column_cache_and_batch_zero(interp):
    Case(2, 1, 1, 16, cap=4, length=1, col=0, starts=[0, 0], seed=4).check()
    q = torch.zeros(0, 4, 16)
    kv = torch.zeros(0, 2, 8, 16)
    idx = torch.zeros(0, dtype=torch.long)
    out = decode_attention(q, kv, kv, idx, torch.tensor([3]), idx.bool(), 0.25, 8)
    assert out.shape == (0, 64)


def test_query_and_cache_strides(interp):
    """A query with padded rows and K/V with their own strides (a cache whose head axis comes first)."""
    case = Case(2, 2, 2, 16, cap=24, length=20, col=17, starts=[3, 0], seed=5)
    want = reference(case.q, case.K[1], case.V[1], case.start, case.col, 20, case.scale)
    qp = torch.zeros(2, 4, 32)
    qp[..., :16] = case.q
    k = case.K[1].transpose(0, 1).contiguous().transpose(0, 1)  # [B, H, cap, d] view of an [H, B, cap, d] buffer
    assert not k.is_contiguous()
    got = decode_attention(qp[..., :16], k, case.V[1], case.start, case.col, case.live, case.scale, 20, config=SMALL)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Recorder:
    """A kernel whose launches record their grid."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_sizes_and_grids_follow_shapes_not_values(interp, monkeypatch):
    """No host synchronisation: scratch, output and grids are the same for any start / col / live."""
    sizes, grids = [], []
    real_empty, real_kernels = torch.empty, da._kernels

    def spy(*shape, **kw):
        if sys._getframe(1).f_globals.get("__name__") == da.__name__:
            sizes.append(tuple(shape[0]))
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    monkeypatch.setattr(da, "_kernels", lambda: tuple(_Recorder(k, grids) for k in real_kernels()))
    for col, starts, live in [(30, [0, 0], [True, True]), (3, [3, 1], [False, True]), (10, [10, 0], [True, False])]:
        Case(2, 2, 3, 16, cap=40, length=33, col=col, starts=starts, live=live, seed=col).check(SMALL)
    assert sizes == [(2, 96), (4, 3, 3), (4, 3, 3), (4, 3, 3, 16)] * 3, sizes
    assert grids == [(4, 3), (12,)] * 3, grids


# -- the split plan and the configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("gemv", ["torch", "fused"])
def test_fast_path_with_range_attention_equals_the_eager_engine(interp, monkeypatch, gemv):
    """The whole fast path with KVAGENTS_ATTN=triton (float32 tiny Qwen3, CPU): mixed prompt lengths, n = 2, rows
    finishing early on a stop token (from then on they read no K/V), components on: the same tokens, finish
    reasons and component outputs as the eager engine (which keeps computing finished rows)."""
    from test_fast_decode import assert_same_results, comps
    from tiny import ByteTokenizer, tiny_model

    from kvagents import SamplingParams
    from kvagents.engine.decode import DecodeEngine
    from kvagents.engine.fast_decode import FastDecodeEngine

    monkeypatch.setenv("KVAGENTS_ATTN", "triton")
    monkeypatch.setenv("KVAGENTS_GEMV", gemv)
    model = tiny_model("qwen3")
    fast = FastDecodeEngine(model, ByteTokenizer(), bucket=8, sync_every=3)
    assert fast.lm.attention_for(6) == "triton"
    eager = DecodeEngine(model, ByteTokenizer())
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
    free = eager.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0)).flat
    stops = [free[0].token_ids[2], free[2].token_ids[6]]  # rows finish at different steps
    params = SamplingParams(max_new_tokens=12, temperature=0, n=2, stop_token_ids=stops)
    want = eager.generate(prompts, params, comps())
    assert {s.finish_reason for s in want.flat} >= {"stop", "length"}
    assert_same_results(want, fast.generate(prompts, params, comps()))


def test_plan_fills_the_gpu_without_tiny_chunks():
    assert plan(1, 8, 4096) == (128, 32)  # 256 programs
    assert plan(8, 8, 4096) == (832, 5)  # 320
    assert plan(32, 8, 4096) == (2048, 2)  # 512
    assert plan(1, 8, 384) == (128, 3)  # short: chunks of MIN_CHUNK
    assert plan(64, 8, 4096) == (4096, 1)  # enough rows already
    assert plan(1, 1, 10) == (64, 1)
    for b, hkv, n in [(1, 8, 100000), (3, 2, 7777), (5, 4, 1025), (1, 1, 1)]:
        chunk, splits = plan(b, hkv, n)
        assert chunk % 64 == 0 and (splits - 1) * chunk < n <= splits * chunk
        assert b * hkv * splits >= 0.75 * da.TARGET_PROGRAMS or chunk == da.MIN_CHUNK or splits == 1


def test_config_overrides_and_clamping():
    assert resolve_config(1, 8, 4096, 128) == dict(BLOCK_N=64, num_warps=4, num_stages=2, CHUNK=128)
    assert resolve_config(1, 8, 20, 16)["BLOCK_N"] == 32  # clamped to the columns
    assert resolve_config(1, 8, 4096, 128, dict(CHUNK=48))["BLOCK_N"] == 16  # the largest power of two in 48
    cfg = resolve_config(2, 2, 1000, 64, dict(BLOCK_N=32, CHUNK=96, num_warps=8, num_stages=3))
    assert cfg == dict(BLOCK_N=32, num_warps=8, num_stages=3, CHUNK=96)


@pytest.mark.parametrize(
    "config,match",
    [(dict(CHUNKS=16), "unknown keys"), (dict(BLOCK_N=24), "BLOCK_N must be a power of two, got 24"),
     (dict(BLOCK_N=8), "BLOCK_N must be at least 16"), (dict(num_warps=3), "num_warps must be a power of two"),
     (dict(CHUNK=40, BLOCK_N=16), "CHUNK must be a multiple of BLOCK_N=16, got 40"),
     (dict(CHUNK=24), "multiple of BLOCK_N=16, got 24"), (dict(num_stages=0), "num_stages must be a positive int"),
     (dict(CHUNK=16.0), "CHUNK must be a positive int, got 16.0"), (dict(BLOCK_N=True), "BLOCK_N")],
)  # fmt: skip
def test_bad_config(config, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        resolve_config(2, 2, 100, 32, config)


# -- arguments ------------------------------------------------------------------------------------------------------
def _args(**over):
    b, hkv, g, d, cap = 2, 2, 2, 16, 8
    args = dict(q=torch.zeros(b, hkv * g, d), k=torch.zeros(b, hkv, cap, d), v=torch.zeros(b, hkv, cap, d),
                start=torch.zeros(b, dtype=torch.long), col=torch.tensor([3]), live=torch.ones(b, dtype=torch.bool),
                scale=0.25, length=8)  # fmt: skip
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(q=torch.zeros(2, 64)), "q must be [B, H_q, d], got shape [2, 64]"),
        (dict(q=torch.zeros(2, 4, 16, dtype=torch.float64)), "q's dtype must be one of"),
        (dict(q=torch.zeros(2, 4, 24), k=torch.zeros(2, 2, 8, 24)), "power of two >= 16, got 24"),
        (dict(q=torch.zeros(2, 4, 8)), "power of two >= 16, got 8"),
        (dict(k=torch.zeros(3, 2, 8, 16)), "k must be [B=2, H_kv, cap, d=16], got shape [3, 2, 8, 16]"),
        (dict(v=torch.zeros(2, 2, 8, 32)), "v must be [B=2, H_kv, cap, d=16]"),
        (dict(k=torch.zeros(2, 2, 8, 16).bfloat16()), "k must have q's dtype torch.float32, got torch.bfloat16"),
        (dict(v=torch.zeros(2, 2, 8, 16, device="meta")), "v is on meta, q on cpu"),
        (dict(k=torch.zeros(2, 2, 8, 32)[..., ::2]), "k must have unit stride along d"),
        (dict(v=torch.zeros(2, 2, 9, 16)), "k and v must have the same shape"),
        (dict(k=torch.zeros(2, 3, 8, 16), v=torch.zeros(2, 3, 8, 16)), "H_q=4 must be a multiple of H_kv=3"),
        (dict(length=9), "length must be an int in 1..cap=8, got 9"),
        (dict(length=0), "got 0"),
        (dict(length=4.0), "got 4.0"),
        (dict(scale=float("nan")), "scale must be a finite float, got nan"),
        (dict(start=torch.zeros(3, dtype=torch.long)), "start must have shape [2], got [3]"),
        (dict(start=torch.zeros(2, dtype=torch.int32)), "start must have dtype torch.int64, got torch.int32"),
        (dict(col=torch.tensor([3, 4])), "col must have shape [1], got [2]"),
        (dict(col=torch.tensor([3], device="meta")), "col is on meta, q on cpu"),
        (dict(live=torch.ones(2, dtype=torch.long)), "live must have dtype torch.bool, got torch.int64"),
        (dict(config=dict(BLOCK_N=20)), "BLOCK_N must be a power of two, got 20"),
    ],
)
def test_bad_arguments_name_the_value(over, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        decode_attention(**_args(**over))


def test_bad_argument_types():
    with pytest.raises(TypeError, match="k must be a tensor, got list"):
        decode_attention(**_args(k=[1.0]))
    with pytest.raises(TypeError, match="live must be a tensor, got list"):
        decode_attention(**_args(live=[True, True]))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(da, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CPU tensors run only under Triton's interpreter"):
        decode_attention(**_args())


def test_module_imports_without_triton(monkeypatch):
    mod = load_without_triton(monkeypatch, da, "decode_attention_no_triton")
    with pytest.raises(RuntimeError, match="needs triton"):
        mod._build()


AOT = r"""
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("decode_attention_aot", sys.argv[1])
da = importlib.util.module_from_spec(spec)
spec.loader.exec_module(da)
(split, merge), interpreted = da._build()
assert not interpreted
names = ["q_ptr", "k_ptr", "v_ptr", "start_ptr", "col_ptr", "live_ptr", "m_ptr", "l_ptr", "acc_ptr", "length",
         "scale_log2", "H_KV", "G", "S", "CHUNK", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kn",
         "stride_vb", "stride_vh", "stride_vn"]
# what the JIT sees for aligned tensors and strides that are multiples of 16
aligned = {(i,): [["tt.divisibility", 16]] for i in list(range(9)) + list(range(15, 23))}
for dt, g in [("bf16", 4), ("fp16", 1), ("fp32", 7)]:
    c1 = dict(D=128, GP=max(16, da._next_pow2(g)), BLOCK_N=64, NUM_STAGES=2, EMU=False)
    types = [f"*{dt}"] * 3 + ["*i64", "*i64", "*u8"] + ["*fp32"] * 3 + ["i32", "fp32"] + ["i32"] * 12
    sig = dict(zip(names, types), **{n: "constexpr" for n in c1})
    try:
        src = ASTSource(fn=split, signature=sig, constexprs=c1, attrs=aligned)
    except TypeError:
        print("SKIP: this triton's ASTSource takes other arguments"); sys.exit(0)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2)).asm["ptx"]
    assert dt == "fp32" or "mma" in ptx, "stage 1 does not use tensor cores"
    loads = [ln for ln in ptx.splitlines() if "cp.async.cg.shared.global" in ln or "ld.global.v4" in ln]
    assert loads and all("0x10" in ln or ".v4" in ln for ln in loads), "K/V are not read in 16-byte vectors"
    c2 = dict(D=128, SP=32, SBLOCK=16, EMU=False)
    sig = dict(zip(["m_ptr", "l_ptr", "acc_ptr", "live_ptr", "out_ptr", "H_Q", "G", "S"],
                   ["*fp32"] * 3 + ["*u8", f"*{dt}", "i32", "i32", "i32"]), **{n: "constexpr" for n in c2})
    triton.compile(ASTSource(fn=merge, signature=sig, constexprs=c2, attrs={}), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=4))
print("OK")
"""


def test_kernels_compile_for_hopper():
    """No GPU needed: Triton compiles both kernels to sm_90 code (the interpreter does not run the GPU front end:
    the bfloat16 / float16 tensor-core products, the pipelined K/V loads); in a subprocess, interpreter off."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's warning
    p = subprocess.run([sys.executable, "-c", AOT, da.__file__], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    if "SKIP:" in p.stdout:
        pytest.skip(p.stdout.strip())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
