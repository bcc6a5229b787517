"""kvagents.fused_gemv against the eager ops of kvagents.static_cache, on CPU through Triton's interpreter.

float32: equal up to the fp32 summation order. bfloat16: the prologues and the epilogue round exactly as eager
PyTorch (identity-weight cases are bit-equal); the products differ by at most 1 ulp where the different summation
order lands on the other side of a rounding boundary (1 element in ~7,700 in 30 seeds of [257, 384]). M rows: each
row is bit-identical to that row alone (the interpreter here; the AOT test pins the GPU's register layouts).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton's interpreter must be on before Triton is first imported (importing kvagents imports it, through torch's
# compile stack): turn it on here when this module is the first to get there, and not on a GPU machine (it would
# turn Inductor's GPU kernels into interpreted ones for the rest of the session).
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

import torch.nn.functional as F  # noqa: E402

from kvagents import fused_gemv  # noqa: E402
from kvagents.fused_gemv import gemv, resolve_config  # noqa: E402
from kvagents.static_cache import _rms, attn_post  # noqa: E402

EPS = 1e-6


@pytest.fixture(scope="module")
def interp():
    """CPU tensors through Triton's interpreter; when Triton was imported without it (another test module came
    first, or a GPU machine), test_kernel_tests_in_a_subprocess runs these tests instead."""
    pytest.importorskip("triton")
    if not INTERPRETER:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1: test_kernel_tests_in_a_subprocess runs them")


def test_kernel_tests_in_a_subprocess():
    pytest.importorskip("triton")
    if INTERPRETER:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 units in the last place (monotone integer view of the bits)."""

    def key(t):
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (key(a) - key(b)).abs()


def check(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        u = ulps(y, ref)
        assert u.max().item() <= 1, f"max ulp difference {u.max().item()}"
        assert (u > 0).float().mean().item() <= 0.02, f"{(u > 0).sum().item()} of {u.numel()} elements differ"


def data(n: int, k: int, dt: torch.dtype, seed: int = 0, m: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dt)

    return dict(x=r(m, k), x2=r(m, 2 * k), w=r(n, k, scale=k**-0.5), g=r(k, scale=0.1, shift=1.0), b=r(n),
                res=r(m, n))  # fmt: skip


def eager(d: dict, k: int, prologue: str, epilogue: str) -> torch.Tensor:
    """The eager ops of kvagents.static_cache for ``data(...)``."""
    x = d["x2"] if prologue == "swiglu" else d["x"]
    if prologue == "rms":
        x = _rms(x, d["g"], EPS)
    elif prologue == "swiglu":
        x = F.silu(x[:, :k]) * x[:, k:]
    y = F.linear(x, d["w"], d["b"] if epilogue != "none" else None)
    return d["res"] + y if epilogue != "none" else y


def fused(d: dict, prologue: str, epilogue: str, config: dict, rows=slice(None)) -> torch.Tensor:
    """:func:`gemv` of ``data(...)`` (its rows ``rows``)."""
    x = d["x2"] if prologue == "swiglu" else d["x"]
    b, res = (d["b"], d["res"][rows]) if epilogue != "none" else (None, None)
    return gemv(x[rows], d["w"], bias=b, rms_weight=d["g"] if prologue == "rms" else None, eps=EPS,
                swiglu=prologue == "swiglu", residual=res, config=config)  # fmt: skip


SHAPES = [(64, 64), (100, 200), (257, 384)]  # (N, K): the last two are not multiples of the blocks
CFG = dict(BLOCK_N=8, BLOCK_K=128, num_warps=4, num_stages=2)
CFG_ROWS = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=2)  # fewer programs: the interpreter is slow
# (M, N, K): one row on every shape, 3 rows on every shape, 8 rows on one (each row costs interpreter time)
ROW_SHAPES = [(1, n, k) for n, k in SHAPES] + [(3, n, k) for n, k in SHAPES] + [(8, 100, 200)]


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,n,k", ROW_SHAPES)
@pytest.mark.parametrize("prologue", ["none", "rms", "swiglu"])
@pytest.mark.parametrize("epilogue", ["none", "bias+residual"])
def test_gemv_matches_eager_ops(interp, dt, m, n, k, prologue, epilogue):
    d = data(n, k, dt, seed=n + k + m, m=m)
    y = fused(d, prologue, epilogue, CFG if m == 1 else CFG_ROWS)
    assert y.shape == (m, n)
    check(y, eager(d, k, prologue, epilogue))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prologue", ["none", "rms", "swiglu"])
def test_rows_are_bit_identical_to_each_row_alone(interp, dt, prologue):
    """Batch invariance: with the same launch configuration, each of 8 rows equals that row computed alone bit for
    bit (every row runs the one-row code: the same accumulation order), whatever the other rows hold."""
    n, k, m = 100, 200, 8  # not multiples of the blocks
    d = data(n, k, dt, seed=7, m=m)
    d["x"][5] *= 1e4  # a loud neighbour (its own RMSNorm scale) must not change the other rows
    d["x2"][5] *= 10
    y = fused(d, prologue, "bias+residual", CFG_ROWS)
    for i in range(m):
        assert torch.equal(y[i : i + 1], fused(d, prologue, "bias+residual", CFG_ROWS, rows=slice(i, i + 1))), i
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    d["x"], d["x2"], d["res"] = d["x"][perm], d["x2"][perm], d["res"][perm]
    assert torch.equal(fused(d, prologue, "bias+residual", CFG_ROWS), y[perm])  # rows in any order


def test_strided_rows_of_x_are_read_in_place(interp):
    """Rows of x with a padded row stride (a slice of a wider buffer) need no copy."""
    d = data(40, 64, torch.float32, seed=8, m=3)
    big = torch.randn(3, 96)
    big[:, :64] = d["x"]
    x = big[:, :64]
    assert not x.is_contiguous()
    check(gemv(x, d["w"], rms_weight=d["g"], eps=EPS), F.linear(_rms(d["x"], d["g"], EPS), d["w"]))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_prologues_round_like_eager(interp, dt):
    """With an identity weight the product is the prologue itself: no summation order, so the rounded dtypes are
    bit-equal; float32 differs by an ulp or two (the sum of squares' order; numpy's exp vs torch's)."""
    k = 200
    d = data(k, k, dt, seed=1)
    eye = torch.eye(k, dtype=dt)
    x2 = d["x2"]
    pairs = [(gemv(x2, eye, swiglu=True), F.silu(x2[:, :k]) * x2[:, k:]),
             (gemv(d["x"], eye, rms_weight=d["g"], eps=EPS), _rms(d["x"], d["g"], EPS))]  # fmt: skip
    for y, ref in pairs:
        if dt == torch.float32:
            torch.testing.assert_close(y, ref, rtol=3e-7, atol=1e-30)
        else:
            assert torch.equal(y, ref)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bias_before_one_rounding_and_residual_after(interp, dt):
    """Bias joins the float32 accumulator (as F.linear with a bias), the residual adds the rounded product; halves
    of bfloat16 sums are frequent, so this pins round-to-nearest-even too."""
    k = 256
    d = data(k, k, dt, seed=2)
    eye = torch.eye(k, dtype=dt)
    x = d["x"]
    assert torch.equal(gemv(x, eye, bias=d["x"][0].flip(0)), (x.float() + x[0].flip(0).float()).to(dt))
    assert torch.equal(gemv(x, eye, bias=d["x"][0].flip(0)), F.linear(x, eye, x[0].flip(0)))
    assert torch.equal(gemv(x, eye, residual=d["res"][:, :k]), d["res"][:, :k] + x)


def test_lm_head_variant_is_rounded_then_float(interp):
    d = data(300, 128, torch.bfloat16, seed=3)
    y = gemv(d["x"], d["w"], rms_weight=d["g"], eps=EPS, out_dtype=torch.float32, config=CFG)
    assert y.dtype == torch.float32
    assert torch.equal(y.to(torch.bfloat16).float(), y)  # every value is a bfloat16 value
    check(y.to(torch.bfloat16), F.linear(_rms(d["x"], d["g"], EPS), d["w"]))


def test_one_dimensional_x_gives_one_dimensional_y(interp):
    d = data(50, 64, torch.float32)
    y = gemv(d["x"][0], d["w"], residual=d["res"][0])
    assert y.shape == (50,)
    check(y, d["res"][0] + F.linear(d["x"], d["w"])[0])


@pytest.mark.parametrize("block_n,block_k", [(1, 16), (4, 32), (32, 1024), (16, 64)])
def test_any_block_shape(interp, block_n, block_k):
    d = data(77, 96, torch.float32, seed=4)
    y = gemv(d["x"], d["w"], rms_weight=d["g"], residual=d["res"],
             config=dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=2, num_stages=1))  # fmt: skip
    check(y, d["res"] + F.linear(_rms(d["x"], d["g"], EPS), d["w"]))


def test_padded_rows_weight(interp):
    """A weight whose rows are padded (stride(0) > K) is read in place."""
    d = data(40, 64, torch.float32, seed=5)
    big = torch.randn(40, 80)
    big[:, :64] = d["w"]
    check(gemv(d["x"], big[:, :64]), F.linear(d["x"], d["w"]))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 3])
def test_decoder_layer_from_fused_gemvs_matches_attn_post(interp, dt, m):
    """attn_post (o_proj + residual, norm, gate/up, SwiGLU, down + residual) as three fused GEMVs; the next norm is
    the next projection's prologue (qkv or the LM head)."""
    D, inter, seed = 96, 160, 6
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(dt)

    h, a = r(m, D), r(m, D)
    o_w, o_b, ln2 = r(D, D, scale=D**-0.5), r(D, scale=0.1), r(D, scale=0.1, shift=1.0)
    gu_w, gu_b, down_w = r(2 * inter, D, scale=D**-0.5), r(2 * inter, scale=0.1), r(D, inter, scale=inter**-0.5)
    nxt, head_w = r(D, scale=0.1, shift=1.0), r(50, D, scale=D**-0.5)
    ref_h, ref_x = attn_post(h, a, o_w, o_b, ln2, gu_w, gu_b, down_w, None, nxt, EPS, inter)
    h1 = gemv(a, o_w, bias=o_b, residual=h)
    gu = gemv(h1, gu_w, bias=gu_b, rms_weight=ln2, eps=EPS)
    h2 = gemv(gu, down_w, swiglu=True, residual=h1)
    logits = gemv(h2, head_w, rms_weight=nxt, eps=EPS, out_dtype=torch.float32)
    if dt == torch.float32:
        torch.testing.assert_close(h2, ref_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, F.linear(ref_x, head_w), rtol=1e-5, atol=1e-5)
    else:  # 1-ulp differences of the products propagate through the norm and SwiGLU: a few ulps at most
        assert ulps(h2, ref_h).max().item() <= 4
        torch.testing.assert_close(logits, F.linear(ref_x, head_w).float(), rtol=0.02, atol=0.02)


def test_fast_path_steps_with_fused_gemvs_equal_the_eager_engine(interp, monkeypatch):
    """The whole decode step through the fused GEMVs (KVAGENTS_GEMV=fused; Qwen2: q/k/v bias), one row then two
    prompts at once: greedy tokens and KV-CoE scores equal the eager engine's (float32 tiny model; the interpreter
    is slow: few tokens)."""
    from tiny import ByteTokenizer, tiny_model

    from kvagents import SamplingParams
    from kvagents.engine import DecodeEngine
    from kvagents.fast_decode import FastDecodeEngine
    from kvagents.scoring import LayerCoE

    monkeypatch.setenv("KVAGENTS_GEMV", "fused")
    # 64-row blocks: the interpreter runs one program at a time (~8x faster than the default's 8-row blocks here)
    monkeypatch.setattr(fused_gemv, "default_config", lambda n, k: dict(BLOCK_N=64, BLOCK_K=128, num_warps=4,
                                                                        num_stages=1))  # fmt: skip
    model = tiny_model("qwen2")
    fast = FastDecodeEngine(model, ByteTokenizer(), bucket=8, sync_every=4)
    rows = fused_gemv.MAX_ROWS
    assert fast.lm.fused_gemv_for(1) and fast.lm.fused_gemv_for(rows) and not fast.lm.fused_gemv_for(rows + 1)
    eager = DecodeEngine(model, ByteTokenizer())
    params = SamplingParams(max_new_tokens=8, temperature=0)
    for prompts in ([[5, 9, 14, 3, 77, 120]], [list(range(40, 52)), [7, 8, 9]]):
        want = eager.generate(prompts, params, [LayerCoE()]).flat
        got = fast.generate(prompts, params, [LayerCoE()]).flat
        assert len(got) == len(want) == len(prompts)
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids
            a, b = g.outputs["kv_coe_layer"], w.outputs["kv_coe_layer"]
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5) for k in a)


# -- arguments ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.zeros(9, 8)), "x has 9 rows; gemv takes 1 to MAX_ROWS = 8"),
        (dict(x=torch.zeros(0, 8)), "x has 0 rows"),
        (dict(x=torch.zeros(1, 9)), r"shape \[M, 8\] or \[8\]"),
        (dict(x=torch.zeros(2, 2, 8)), r"shape \[M, 8\] or \[8\]"),
        (dict(x=torch.zeros(1, 8), swiglu=True), "swiglu doubles K"),
        (dict(x=torch.zeros(1, 8, dtype=torch.float64)), "dtype"),
        (dict(w=torch.zeros(4, 8, dtype=torch.float64), x=torch.zeros(1, 8, dtype=torch.float64)), "w's dtype"),
        (dict(w=torch.zeros(8, 4).t()), "unit stride"),
        (dict(bias=torch.zeros(5)), r"bias must have shape \[4\]"),
        (dict(rms_weight=torch.zeros(8, dtype=torch.bfloat16)), "rms_weight must have x's dtype"),
        (dict(residual=torch.zeros(2, 4)), r"residual must have shape \[1, 4\] or \[4\]"),
        (dict(x=torch.zeros(3, 8), residual=torch.zeros(1, 4)), r"residual must have shape \[3, 4\] \(x's rows"),
        (dict(x=torch.zeros(3, 8), residual=torch.zeros(4)), r"residual must have shape \[3, 4\]"),
        (dict(x=torch.zeros(1, 16), swiglu=True, rms_weight=torch.zeros(8)), "exclusive"),
        (dict(out_dtype=torch.float16), "out_dtype"),
        (dict(config=dict(BLOCK_M=4)), "unknown keys"),
        (dict(config=dict(BLOCK_N=6)), "power of two, got 6"),
        (dict(config=dict(num_warps=0)), "num_warps must be a positive int, got 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    args = dict(x=torch.zeros(1, 8), w=torch.zeros(4, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gemv(args.pop("x"), args.pop("w"), **args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gemv(torch.zeros(1, 8), torch.zeros(4, 8))


def test_config_lookup_and_clamping(monkeypatch):
    assert resolve_config(4000, 4096) == fused_gemv.default_config(4000, 4096)  # not tuned
    assert resolve_config(4096, 4096) == fused_gemv.CONFIGS[(4096, 4096)]  # tuned
    monkeypatch.setitem(fused_gemv.CONFIGS, (4096, 4096), dict(BLOCK_N=16, num_warps=8))
    assert resolve_config(4096, 4096) == dict(BLOCK_N=16, BLOCK_K=512, num_warps=8, num_stages=3)
    assert resolve_config(4096, 4096, dict(num_stages=1))["num_stages"] == 1
    small = resolve_config(3, 20, dict(BLOCK_N=32, BLOCK_K=1024))
    assert small == dict(BLOCK_N=4, BLOCK_K=32, num_warps=4, num_stages=3)


def test_rows_config_is_tuned_per_m_else_fitted_to_the_registers(monkeypatch):
    """(N, K, M) first; else the one-row (N, K) entry (or the default) with BLOCK_K halved (down to 64, then
    BLOCK_N) until M accumulators of BLOCK_N x BLOCK_K / (32 x num_warps) floats fit ACC_PER_THREAD."""
    monkeypatch.setitem(fused_gemv.CONFIGS, (6144, 4096), dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=1))
    assert resolve_config(6144, 4096, m=1)["BLOCK_K"] == 1024
    assert resolve_config(6144, 4096, m=2) == dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=1)  # 64 fit
    assert resolve_config(6144, 4096, m=3)["BLOCK_K"] == 512
    assert resolve_config(6144, 4096, m=8) == dict(BLOCK_N=4, BLOCK_K=256, num_warps=4, num_stages=1)
    for m in range(1, fused_gemv.MAX_ROWS + 1):  # every default fits
        c = resolve_config(6144, 4096, m=m)
        assert m * c["BLOCK_N"] * c["BLOCK_K"] <= fused_gemv.ACC_PER_THREAD * 32 * c["num_warps"]
    assert fused_gemv.fit_rows(dict(BLOCK_N=64, BLOCK_K=128, num_warps=1, num_stages=1), 8)["BLOCK_N"] == 4
    tuned = dict(BLOCK_N=8, BLOCK_K=512, num_warps=8, num_stages=2)  # tuned for 8 rows: used as is
    monkeypatch.setitem(fused_gemv.CONFIGS, (6144, 4096, 8), tuned)
    assert resolve_config(6144, 4096, m=8) == tuned
    assert resolve_config(6144, 4096, dict(BLOCK_K=128), m=8) == dict(tuned, BLOCK_K=128)  # config still wins
    assert resolve_config(6144, 4096, m=7)["BLOCK_K"] == 256  # other M: fitted from the one-row entry
    assert resolve_config(100, 64, m=8)["BLOCK_K"] == 64  # clamped to the shape
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match=f"m must be an int from 1 to MAX_ROWS = 8, got {bad!r}"):
            resolve_config(64, 64, m=bad)


def test_load_configs_reads_one_row_and_per_m_rows(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(fused_gemv, "CONFIGS", {})
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps([[64, 32, {"BLOCK_N": 4}], [64, 32, 1, {"BLOCK_N": 8}], [64, 32, 8, {"BLOCK_N": 2}]]))
    fused_gemv.load_configs(p)
    assert fused_gemv.CONFIGS == {(64, 32): {"BLOCK_N": 8}, (64, 32, 8): {"BLOCK_N": 2}}
    for rows, match in [([[64, 32, 9, {}]], "M must be 1 to MAX_ROWS = 8, got 9"), ([[64, {}]], "expected rows"),
                        ([[64, "a", {}]], "must be ints"), ([[64, 32, []]], "expected rows")]:  # fmt: skip
        p.write_text(json.dumps(rows))
        with pytest.raises(ValueError, match=match):
            fused_gemv.load_configs(p)


def test_module_imports_without_triton(monkeypatch):
    """A machine without Triton imports the module; available() is False and gemv says what is missing."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("fused_gemv_no_triton", fused_gemv.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.available() is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="needs triton"):
        mod.gemv(torch.zeros(1, 8), torch.zeros(4, 8))


AOT = r"""
import importlib.util, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("fused_gemv_aot", sys.argv[1])
fg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fg)
kernel, interpreted = fg._build()
assert not interpreted
names = ["x_ptr", "w_ptr", "bias_ptr", "rmsw_ptr", "res_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn", "eps"]


def reduce_layouts(ttgir):
    # the register layouts of every tt.reduce operand: they fix the float32 summation order
    defs = dict(re.findall(r"^(#[\w]+) = (#ttg[.][\w]+<.*>)$", ttgir, re.M))
    ops = re.findall(r"[}][)] : [(](tensor<[^>]*>)[)]", ttgir)
    return {re.sub(r"#[\w]+", lambda m: defs.get(m.group(0), m.group(0)), t) for t in ops}


for flags, out, bn, bk in [((0, 1, 0, 0), "fp32", 8, 512), ((1, 0, 1, 1), "bf16", 8, 512),
                           ((0, 0, 0, 1), "bf16", 8, 512), ((0, 1, 0, 0), "bf16", 4, 256),
                           ((1, 0, 1, 1), "bf16", 16, 64)]:
    layouts = {}
    for rows in (1, 8):
        consts = dict(zip(["HAS_BIAS", "HAS_RMS", "SWIGLU", "HAS_RES"], map(bool, flags)), ROWS=rows, BLOCK_N=bn,
                      BLOCK_K=bk, XBLOCK=2048, NUM_STAGES=1, EVEN_K=True, EMU_BF16=False)
        sig = dict(zip(names, ["*bf16"] * 5 + [f"*{out}", "i32", "i32", "i32", "i32", "fp32"]),
                   **{k: "constexpr" for k in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(10)}  # what the JIT sees for aligned tensors
        try:
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        except TypeError:
            print("SKIP: this triton's ASTSource takes other arguments"); sys.exit(0)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
        loads = [ln for ln in k.asm["ptx"].splitlines() if "ld.global" in ln and "evict_first" in ln]
        assert loads and all(".v4.b32" in ln for ln in loads), f"ROWS={rows}: the weight is not read in 16-byte vectors"
        layouts[rows] = reduce_layouts(k.asm["ttgir"])
    # batch invariance on the GPU: the 8-row kernel sums each row as the one-row kernel does
    assert layouts[1] and layouts[1] == layouts[8], (flags, layouts)
print("OK", triton.__version__)
"""


def test_kernel_compiles_for_hopper_with_16_byte_weight_loads():
    """No GPU needed: Triton compiles the kernel to sm_90 PTX (the interpreter does not run the GPU front end),
    for one row and for 8 rows, in a subprocess, where the interpreter is off. The 8-row kernel reads the weight in
    16-byte vectors too and reduces with the one-row kernel's register layouts (each row bit-identical to that row
    alone). The GPU runs triton 3.6: run AOT by hand with it too (python -c "$AOT" kvagents/fused_gemv.py)."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", AOT, fused_gemv.__file__], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    if "SKIP:" in p.stdout:
        pytest.skip(p.stdout.strip())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
