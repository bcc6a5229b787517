"""kvagents.kernels.fused_rope against the eager kvagents.engine.static_cache.rope_write, on CPU through Triton's interpreter.

The reference runs eagerly on clones of the inputs. Without q/k norms every op is elementwise: bit-equal in float32
and bfloat16. With them the only difference is the float32 summation order of the variance: float32 within 1e-6;
bfloat16 bit-equal but for rare elements whose normed input rounds the other way (4 in 409,600 over 40 seeds at
d = 128: 1, 2, 2 and 32 ulps, the last after cancellation in the RoPE sum; test_bfloat16_equality_rate), checked
against the bound such a one-ulp input can make (Case.check). The cases: with and without q/k norm weights,
H_q / H_kv = 4/2, 8/8, 6/2, d = 16 and 32, B = 1 and 5; ``qkv`` a column slice of a wider tensor (strided rows,
unaligned start); the cache the layer view ``K[1]`` of a 5-d ``[3, B, H_kv, cap, d]`` buffer, of which only column
``col`` of layer 1 may change. Then float16, the edge columns, no host use of tensor values, the argument errors,
the import without Triton, and (without a GPU) an sm_90 compilation of the kernel without FMA contraction.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

# before kvagents: turns Triton's interpreter on when this process can have it (see tests/triton_interpreter.py)
from triton_interpreter import load_without_triton, rerun_under_interpreter, ulps  # noqa: E402

from kvagents.engine.static_cache import _rms, _rotate_half, rope_write  # noqa: E402
from kvagents.kernels import fused_rope as fr  # noqa: E402
from kvagents.kernels.fused_rope import rope_write_kernel  # noqa: E402

EPS = 1e-6
LAYER = 1


def test_kernel_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)


class Case:
    """Inputs of one call: ``qkv`` sliced out of a wider tensor, a ``[3, B, H_kv, cap, d]`` cache (layer 1 is
    written), per-row cos/sin of random angles, q/k norm weights around 1 (or none)."""

    def __init__(self, b, hq, hkv, d, norm, dtype=torch.float32, cap=12, col=None, seed=0, strided=True):
        gen = torch.Generator().manual_seed(seed)
        width = (hq + 2 * hkv) * d
        wide = (torch.randn(b, width + 8, generator=gen) * 2).to(dtype)
        self.qkv = wide[:, 3 : 3 + width] if strided else wide[:, :width].contiguous()
        self.qn = (torch.rand(d, generator=gen) + 0.5).to(dtype) if norm else None
        self.kn = (torch.rand(d, generator=gen) + 0.5).to(dtype) if norm else None
        ang = torch.rand(b, 1, d, generator=gen) * 20
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)
        self.K = torch.randn(3, b, hkv, cap, d, generator=gen).to(dtype)
        self.V = torch.randn(3, b, hkv, cap, d, generator=gen).to(dtype)
        self.col = torch.tensor([seed * 5 % cap if col is None else col])
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype

    def args(self, K, V, qkv=None):
        qkv = self.qkv if qkv is None else qkv
        return (qkv, self.qn, self.kn, self.cos, self.sin, K[LAYER], V[LAYER], self.col, EPS, self.hq, self.hkv,
                self.d)  # fmt: skip

    def run(self):
        """The kernel on the case's cache and the eager function on clones: ``(q, want_q, K, want_K, V, want_V)``."""
        K0, V0 = self.K.clone(), self.V.clone()
        qkv0 = self.qkv.clone()
        wk, wv = self.K.clone(), self.V.clone()
        want = rope_write(*self.args(wk, wv, qkv=self.qkv.clone()))
        got = rope_write_kernel(*self.args(self.K, self.V))
        assert torch.equal(self.qkv, qkv0), "qkv was modified"
        assert got.shape == (self.qkv.shape[0], self.hq, self.d) and got.dtype == self.dtype
        assert got.is_contiguous()
        # only column col of the written layer changes, in K and in V
        keep = torch.ones(self.K.shape[:4], dtype=torch.bool)
        keep[LAYER, :, :, self.col[0]] = False
        assert torch.equal(self.K[keep], K0[keep]) and torch.equal(self.V[keep], V0[keep])
        assert torch.equal(wk[keep], K0[keep]) and torch.equal(wv[keep], V0[keep])  # the reference's too
        return got, want, self.K, wk, self.V, wv

    def terms(self) -> list[torch.Tensor]:
        """For the queries and for the keys: ``|y * cos| + |rotate_half(y) * sin|`` per element (eager, float32 of the
        dtype's values), ``y`` the normed heads: the scale of what a one-ulp change of the normed inputs moves."""
        b, hq, hkv, d = self.qkv.shape[0], self.hq, self.hkv, self.d
        q, k, _ = self.qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        out = []
        for x, w, h in ((q, self.qn, hq), (k, self.kn, hkv)):
            y = x.reshape(b, h, d)
            y = _rms(y, w, EPS) if w is not None else y
            out.append((y * self.cos).float().abs() + (_rotate_half(y) * self.sin).float().abs())
        return out

    def check(self):
        """The kernel against eager: values copied exactly; q and k bit-equal without the norms. With them, float32
        within 1e-6; bfloat16 / float16 nearly all bit-equal, the rest within what a one-ulp different normed input
        (the variance summed in another order rounds it the other way) can make of the RoPE: ``y * cos`` and
        ``rot * sin`` each off by up to two ulps, the sum by one more (many ulps of a small sum after cancellation).
        Returns the (kernel, eager) pairs of q and of the new k column."""
        got, want, K, wk, V, wv = self.run()
        assert torch.equal(V, wv)  # values copied unchanged
        c = self.col[0]
        pairs = [(got, want), (K[LAYER, :, :, c], wk[LAYER, :, :, c])]
        for (g, w), t in zip(pairs, self.terms()):
            if self.qn is None:  # no reduction: every op is elementwise, rounded as eager
                assert torch.equal(g, w), (g - w).abs().max()
            elif self.dtype == torch.float32:
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
            else:
                bound = torch.finfo(self.dtype).eps * (2 * t + w.float().abs())
                assert bool(((g.float() - w.float()).abs() <= bound).all()), (g.float() - w.float()).abs().max()
                assert float((g == w).float().mean()) >= 0.97  # a wrong rounding would miss about half
        return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", [True, False], ids=["qknorm", "nonorm"])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 8), (6, 2)])
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("b", [1, 5])
def test_matches_eager_rope_write(interp, dtype, norm, hq, hkv, d, b):
    Case(b, hq, hkv, d, norm, dtype, seed=b + 3 * hq + d).check()


def test_bfloat16_equality_rate(interp):
    """With q/k norms in bfloat16 (d = 128): almost every element bit-equal to eager; the rest differ where the
    variance, summed in another float32 order, is one float32 ulp off and rounds a normed input the other way (one
    ulp, or more after cancellation in the RoPE sum: see Case.check). Seed 5 has two such elements, a rotate-half
    pair: 1 and 32 ulps (0.02734375 against 0.03125); 40 seeds: 4 of 409,600 elements differ."""
    equal = total = one_ulp = 0
    for seed in range(6):
        for g, w in Case(4, 16, 4, 128, True, torch.bfloat16, cap=4, seed=seed).check():
            equal += int((g == w).sum())
            one_ulp += int((ulps(g, w) == 1).sum())
            total += g.numel()
    rate = equal / total
    print(f"bfloat16 with q/k norms: {equal}/{total} equal ({rate:.6f}), {one_ulp} one ulp apart")
    assert rate >= 0.999


def test_float16_contiguous_qkv(interp):
    Case(3, 4, 2, 32, True, torch.float16, seed=7, strided=False).check()
    Case(3, 4, 2, 32, False, torch.float16, seed=8, strided=False).check()


@pytest.mark.parametrize("col", [0, 11])
def test_first_and_last_column(interp, col):
    Case(2, 4, 2, 16, True, cap=12, col=col, seed=col).check()


def test_batch_zero(interp):
    K = torch.zeros(0, 2, 4, 16)
    q = rope_write_kernel(torch.zeros(0, 128), None, None, torch.zeros(0, 1, 16), torch.zeros(0, 1, 16), K, K,
                          torch.tensor([1]), EPS, 4, 2, 16)  # fmt: skip
    assert q.shape == (0, 4, 16)


class _Recorder:
    """A kernel whose launches record their grid and run nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *a, **k: None


def test_no_host_use_of_tensor_values(monkeypatch):
    """The wrapper reads shapes, dtypes and strides only (CUDA-graph capturable): no .item(), bool(), int(),
    tolist() of a tensor; the grid is (B, H_q + H_kv) whatever col holds."""
    grids = []
    monkeypatch.setattr(fr, "_kernel", lambda: _Recorder(grids))
    monkeypatch.setattr(fr, "_interpreting", lambda: True)
    case = Case(5, 6, 2, 16, True)

    def boom(*a, **k):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for col in (0, 7):
        case.col = torch.tensor([col])
        rope_write_kernel(*case.args(case.K, case.V))
    assert grids == [(5, 8), (5, 8)]


# -- arguments ------------------------------------------------------------------------------------------------------
def _args(**over):
    b, hq, hkv, d, cap = 2, 4, 2, 16, 8
    args = dict(qkv=torch.zeros(b, (hq + 2 * hkv) * d), qn_w=torch.ones(d), kn_w=torch.ones(d),
                cos=torch.ones(b, 1, d), sin=torch.zeros(b, 1, d), k_cache=torch.zeros(b, hkv, cap, d),
                v_cache=torch.zeros(b, hkv, cap, d), col=torch.tensor([3]), eps=EPS, hq=hq, hkv=hkv, d=d)  # fmt: skip
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (
            dict(qkv=torch.zeros(2, 120)),
            "qkv must be [B, (hq + 2 hkv) d] = [B, 128] for hq=4, hkv=2, d=16, got shape [2, 120]",
        ),
        (dict(qkv=torch.zeros(128)), "got shape [128]"),
        (dict(qkv=torch.zeros(2, 128, dtype=torch.float64)), "qkv's dtype must be one of"),
        (dict(d=12, qkv=torch.zeros(2, 96)), "the head size d must be a power of two, got 12"),
        (dict(d=1), "d must be an int >= 2, got 1"),
        (dict(hq=0), "hq must be an int >= 1, got 0"),
        (dict(hkv=2.0), "hkv must be an int >= 1, got 2.0"),
        (dict(hq=True), "hq must be an int >= 1, got True"),
        (dict(eps=float("nan")), "eps must be a finite float >= 0, got nan"),
        (dict(eps=-1e-6), "got -1e-06"),
        (dict(eps=None), "got None"),
        (
            dict(kn_w=None),
            "qn_w and kn_w must both be given (q/k norms) or both be None, got qn_w=a tensor and kn_w=None",
        ),
        (dict(qn_w=torch.ones(32)), "qn_w must have shape [16], got [32]"),
        (dict(kn_w=torch.ones(16).bfloat16()), "kn_w must have qkv's dtype torch.float32, got torch.bfloat16"),
        (dict(kn_w=torch.ones(16, device="meta")), "kn_w is on meta, qkv on cpu"),
        (dict(cos=torch.ones(2, 16)), "cos must have shape [2, 1, 16], got [2, 16]"),
        (dict(sin=torch.zeros(3, 1, 16)), "sin must have shape [2, 1, 16], got [3, 1, 16]"),
        (dict(sin=torch.zeros(2, 1, 16).half()), "sin must have qkv's dtype torch.float32, got torch.float16"),
        (dict(k_cache=torch.zeros(2, 3, 8, 16)), "k_cache must be [B=2, hkv=2, cap, d=16], got shape [2, 3, 8, 16]"),
        (dict(v_cache=torch.zeros(2, 2, 8)), "v_cache must be [B=2, hkv=2, cap, d=16], got shape [2, 2, 8]"),
        (dict(k_cache=torch.zeros(2, 2, 8, 16).bfloat16()), "k_cache must have qkv's dtype torch.float32"),
        (dict(v_cache=torch.zeros(2, 2, 8, 16, device="meta")), "v_cache is on meta, qkv on cpu"),
        (dict(k_cache=torch.zeros(2, 2, 8, 32)[..., ::2]), "k_cache must have unit stride along d"),
        (dict(v_cache=torch.zeros(2, 2, 9, 16)), "k_cache and v_cache must have the same shape"),
        (dict(col=torch.tensor([3, 4])), "col must have shape [1], got [2]"),
        (dict(col=torch.tensor(3)), "col must have shape [1], got []"),
        (dict(col=torch.tensor([3], dtype=torch.int32)), "col must have dtype torch.int64, got torch.int32"),
        (dict(col=torch.tensor([3], device="meta")), "col is on meta, qkv on cpu"),
    ],
)
def test_bad_arguments_name_the_value(over, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        rope_write_kernel(**_args(**over))


def test_bad_argument_types():
    with pytest.raises(TypeError, match="qkv must be a tensor, got list"):
        rope_write_kernel(**_args(qkv=[0.0]))
    with pytest.raises(TypeError, match="v_cache must be a tensor, got NoneType"):
        rope_write_kernel(**_args(v_cache=None))
    with pytest.raises(TypeError, match="col must be a tensor, got int"):
        rope_write_kernel(**_args(col=3))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(fr, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CPU tensors run only under Triton's interpreter"):
        rope_write_kernel(**_args())


def test_module_imports_without_triton(monkeypatch):
    mod = load_without_triton(monkeypatch, fr, "fused_rope_no_triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="needs triton"):
        mod.rope_write_kernel(**_args())


AOT = r"""
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("fused_rope_aot", sys.argv[1])
fr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fr)
kernel, interpreted = fr._build()
assert not interpreted
names = ["qkv_ptr", "qn_ptr", "kn_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr", "col_ptr", "q_ptr", "stride_xb",
         "stride_cb", "stride_sb", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "eps"]
aligned = {(i,): [["tt.divisibility", 16]] for i in range(18)}  # what the JIT sees for aligned tensors and strides
for dt, norm in [("bf16", True), ("bf16", False), ("fp16", True), ("fp32", True)]:
    consts = dict(HQ=32, HKV=8, D=128, HAS_NORM=norm, EMU_BF16=False)
    types = [f"*{dt}"] * 7 + ["*i64", f"*{dt}"] + ["i32"] * 9 + ["fp32"]
    sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
    try:
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=aligned)
    except TypeError:
        print("SKIP: this triton's ASTSource takes other arguments"); sys.exit(0)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=1, enable_fp_fusion=False)).asm["ptx"]
    assert "fma.rn" not in ptx, "float32 products were contracted into FMAs (eager rounds each product)"
    if dt == "bf16":
        assert "cvt.rn.bf16" in ptx, "bfloat16 is not rounded to nearest"
    if norm:
        assert "rsqrt" in ptx
print("OK")
"""


def test_kernel_compiles_for_hopper():
    """No GPU needed: Triton compiles the kernel to sm_90 PTX (the interpreter does not run the GPU front end),
    without FMA contraction; in a subprocess, where the interpreter is off."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", AOT, fr.__file__], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    if "SKIP:" in p.stdout:
        pytest.skip(p.stdout.strip())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
