"""kvagents.kernels.topk_values: the two-stage Triton top-k equals torch.topk(x, k, dim=-1).values exactly.

The kernels run on CPU tensors through Triton's interpreter (as tests/test_fused_gemv.py): random rows of odd
widths, ties, -inf / inf / NaN rows, configurations with many small chunks and groups (every stage-1 chunk and
stage-2 gather path), bfloat16 / float16, strided and N-d inputs; then the fallbacks, the custom op under
torch.compile, the argument errors, and (without a GPU) an sm_90 compilation of both kernels.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

# before kvagents: turns Triton's interpreter on when this process can have it (see tests/triton_interpreter.py)
from triton_interpreter import rerun_under_interpreter  # noqa: E402

from kvagents.kernels import topk_values as tv  # noqa: E402
from kvagents.kernels.topk_values import topk_values  # noqa: E402

INF = float("inf")
# many chunks and groups on small rows: (BLOCK, GROUP); GROUP == BLOCK is one group a chunk
SMALL = [dict(BLOCK=256, GROUP=4), dict(BLOCK=64, GROUP=64), dict(BLOCK=32, GROUP=1)]


def test_kernel_tests_in_a_subprocess():
    rerun_under_interpreter(__file__)


@pytest.fixture
def kernel_only(monkeypatch):
    """Fail if topk_values would fall back to torch.topk: these tests are about the kernels."""
    monkeypatch.setattr(tv.torch, "topk", _no_topk)


def _no_topk(*args, **kwargs):
    raise AssertionError("torch.topk was called: the kernel path was expected")


def ref_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    return TORCH_TOPK(x, k, dim=-1).values


TORCH_TOPK = torch.topk


def check(x: torch.Tensor, k: int, config: dict | None = None) -> None:
    """The kernels' values equal torch.topk's: same dtype and shape, element for element (the same multiset, both
    sorted descending), NaN where torch has NaN."""
    want = ref_topk(x, k)
    got = topk_values(x, k, config=config)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    ok = got.isnan() | (got == want)
    assert bool(ok.all()), f"first mismatch at {(~ok).nonzero()[0].tolist()}: {got} vs {want}"


# -- random rows ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 20, 64])
@pytest.mark.parametrize("v,b", [(1000, 1), (1000, 8), (5003, 3)])
def test_random_normal_rows(interp, kernel_only, v, b, k):
    g = torch.Generator().manual_seed(v + b + k)
    check(torch.randn(b, v, generator=g), k)


@pytest.mark.parametrize("config", SMALL, ids=lambda c: f"B{c['BLOCK']}G{c['GROUP']}")
@pytest.mark.parametrize("k", [1, 20, 64])
def test_random_rows_many_chunks(interp, kernel_only, config, k):
    g = torch.Generator().manual_seed(k)
    check(torch.randn(3, 1003, generator=g), k, config)


def test_vocabulary_width(interp, kernel_only):
    """Qwen's V = 151936 with the default configuration (38 chunks of 4096), logits-like rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 151936, generator=g) * 3
    x[1, 151000:] = -INF  # a masked tail
    check(x, 20)


# -- ties, infinities, NaN ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, *SMALL], ids=["default", "B256G4", "B64G64", "B32G1"])
@pytest.mark.parametrize("k", [1, 7, 20, 64])
def test_ties_keep_their_multiplicity(interp, kernel_only, config, k):
    """Integers from a small range: most of the top-k are ties, and so is the threshold."""
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-3, 4, (3, 777), generator=g).float()
    x[1] = torch.randint(0, 2, (777,), generator=g).float()  # two values only
    x[2] = 5.0  # all equal
    check(x, k, config)


@pytest.mark.parametrize("config", [None, SMALL[0]], ids=["default", "B256G4"])
def test_top_values_crowded_in_one_group_or_chunk(interp, kernel_only, config):
    """The whole top-k in one group (elements g, g + G, ... of a chunk) and in the last, partial chunk: the gather
    of stage 2 takes all of that group's elements; a sorted row puts the top-k at the end."""
    v = 5000
    cfg = tv.resolve_config(v, 20, config)
    n_groups = cfg["BLOCK"] // cfg["GROUP"]
    x = torch.randn(3, v, generator=torch.Generator().manual_seed(1))
    x[0, 3 + n_groups * torch.arange(cfg["GROUP"])] = 100.0 + torch.arange(cfg["GROUP"]).float()
    x[1] = torch.arange(v).float()  # ascending: the top-k is the end of the row
    x[2] = torch.arange(v).float().flip(0)
    check(x, 20, config)
    check(x, 64, config)


@pytest.mark.parametrize("config", [None, SMALL[0]], ids=["default", "B256G4"])
def test_infinite_rows(interp, kernel_only, config):
    x = torch.full((5, 900), -INF)
    x[0, [3, 500, 899]] = torch.tensor([1.0, -2.0, 7.0])  # fewer than k finite values
    x[2, :] = INF  # all +inf
    x[3, ::2] = INF  # k of them and more
    x[4, 10] = INF
    x[4, 11] = -1e38
    x[4, 12] = 0.0  # row 1 stays all -inf
    check(x, 20, config)
    check(x, 1, config)


def test_nan_sorts_first_as_in_torch(interp, kernel_only):
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    x[0, [5, 700]] = float("nan")
    x[1, :] = float("nan")
    x[2, 0] = -float("nan")  # the sign bit set: still NaN, still first
    x[2, 1] = INF
    check(x, 20)


def test_signed_zeros_and_subnormals(interp, kernel_only):
    x = torch.tensor([[0.0, -0.0, -1e-45, 1e-45, 1e-40, -1e-40] * 10])
    check(x, 20)
    assert topk_values(x, 1).item() == x[0, 4].item() > 0  # subnormals compare exactly (integer keys: no flush)


# -- dtypes and shapes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_keep_their_dtype(interp, kernel_only, dt):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 2000, generator=g) * 4).to(dt)  # bfloat16 ties are frequent
    x[2] = -INF
    x[2, 7] = 1.0
    check(x, 20)


def test_shapes_strides_and_small_rows(interp, kernel_only):
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(4, 1200, generator=g)
    check(wide[:, 100:1100], 9)  # rows with a stride of 1200, read in place
    check(wide.t().contiguous().t()[:, :300], 9)  # a column-major view: made contiguous
    check(torch.randn(700, generator=g), 5)  # one row, 1-D
    check(torch.randn(2, 3, 500, generator=g), 11)  # leading dimensions
    check(torch.randn(3, 5, generator=g), 5)  # k == V, V smaller than a group
    check(torch.randn(2, 1, generator=g), 1)
    assert topk_values(torch.zeros(0, 100), 4).shape == (0, 4)


def test_no_host_synchronisation_or_data_dependent_sizes(interp, monkeypatch):
    """The scratch and output sizes follow the shapes only: equal for rows that differ in every way."""
    sizes = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        if sys._getframe(1).f_globals.get("__name__") == tv.__name__:
            sizes.append((tuple(shape[0]), kw.get("dtype")))
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    rows = [torch.randn(2, 9000), torch.full((2, 9000), -INF), torch.randint(0, 2, (2, 9000)).float()]
    for x in rows:
        check(x, 20)
    # the output, then the int64 scratch: 20 packs for each of the 3 chunks of 4096
    assert sizes == [((2, 20), torch.float32), ((2, 60), torch.int64)] * 3, sizes


# -- fallbacks, the custom op, torch.compile ------------------------------------------------------------------------
def test_fallbacks_return_torch_topk(monkeypatch):
    """k > MAX_K, float64, a tensor that needs a gradient, or no backend for the device: torch.topk's values."""
    monkeypatch.setattr(tv, "_launch", _no_launch)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, generator=g)
    assert torch.equal(topk_values(x, 65), torch.topk(x, 65).values)
    assert torch.equal(topk_values(x.double(), 3), torch.topk(x.double(), 3).values)
    xg = x.clone().requires_grad_()
    y = topk_values(xg, 3)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.topk(x, 3).values) and xg.grad.sum().item() == 6
    monkeypatch.setattr(tv, "_backend", lambda is_cuda: False)  # a CPU tensor without the interpreter
    assert not tv.uses_kernel(x, 3)
    assert torch.equal(topk_values(x, 3), torch.topk(x, 3).values)


def _no_launch(*args, **kwargs):
    raise AssertionError("the kernels were launched: a fallback was expected")


def test_uses_kernel_follows_the_backend(interp):
    x = torch.zeros(2, 100)
    assert tv.available() and tv.uses_kernel(x, 20) and tv.uses_kernel(x.bfloat16(), 64)
    assert (
        not tv.uses_kernel(x, 65)
        and not tv.uses_kernel(x.double(), 2)
        and not tv.uses_kernel(x.half().requires_grad_(), 2)
    )
    with torch.no_grad():
        assert tv.uses_kernel(x.clone().requires_grad_(), 2)


def test_custom_op_under_torch_compile(interp, kernel_only):
    """Dynamo keeps the op opaque, in one graph (fullgraph), and the compiled function gives the same values."""
    from torch._dynamo.testing import CompileCounter

    def step(logits):
        return topk_values(logits.float() * 0.5, 20).softmax(-1)

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x = torch.randn(4, 3000, generator=torch.Generator().manual_seed(6))
    assert torch.equal(compiled(x), ref_topk(x * 0.5, 20).softmax(-1))
    assert counter.frame_count == 1
    eager = torch.compile(step, backend="eager")
    assert torch.equal(eager(x), compiled(x))


def test_op_schema_and_fake_tensor(interp):
    op = torch.ops.kvagents.topk_values.default
    assert "Tensor x, SymInt k" in str(op._schema) or "Tensor x, int k" in str(op._schema)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.empty(3, 2, 1000, dtype=torch.bfloat16))
        out = torch.ops.kvagents.topk_values(fx, 7, 4096, 16, 2, 4)
    assert out.shape == (3, 2, 7) and out.dtype == torch.bfloat16
    x = torch.randn(3, 1000)
    torch.library.opcheck(
        torch.ops.kvagents.topk_values, (x, 7, 256, 4, 2, 4), test_utils=("test_schema", "test_faketensor")
    )


# -- arguments ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 101, 2.0, True])
def test_bad_k_names_k_and_v(k):
    with pytest.raises(ValueError, match=rf"got k={re.escape(repr(k))} for V=100"):
        topk_values(torch.zeros(2, 100), k)


def test_bad_k_on_the_fallback_path_too(monkeypatch):
    monkeypatch.setattr(tv, "_backend", lambda is_cuda: False)
    with pytest.raises(ValueError, match=r"k=65 for V=64"):
        topk_values(torch.zeros(2, 64), 65)
    with pytest.raises(ValueError, match="at least one dimension"):
        topk_values(torch.tensor(1.0), 1)


@pytest.mark.parametrize(
    "config,match", [(dict(BLOCKS=4), "unknown keys"), (dict(GROUP=6), "GROUP must be a power of two, got 6"),
                     (dict(num_warps=0), "num_warps")],
)  # fmt: skip
def test_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        tv.resolve_config(1000, 20, config)


def test_config_defaults_and_clamping():
    assert tv.resolve_config(151936, 20) == tv.default_config(151936, 20)
    assert tv.resolve_config(1000, 20) == dict(BLOCK=1024, GROUP=16, num_warps=2, merge_warps=4)
    assert tv.resolve_config(3, 1, dict(GROUP=64))["GROUP"] == 16  # clamped to the (padded) row


def test_module_imports_without_triton(monkeypatch):
    """A machine without Triton imports the module; available() is False and topk_values is torch.topk's."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("topk_values_no_triton", tv.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.available() is False and not mod.uses_kernel(torch.zeros(2, 10), 3)
    x = torch.randn(2, 50)
    assert torch.equal(mod.topk_values(x, 3), torch.topk(x, 3).values)
    with pytest.raises(RuntimeError, match="needs triton"):
        mod._build()


AOT = r"""
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("topk_values_aot", sys.argv[1])
tv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tv)
(chunk, merge), interpreted = tv._build()
assert not interpreted
aligned = lambda n: {(i,): [["tt.divisibility", 16]] for i in range(n)}  # what the JIT sees for V = 151936
for dt, k in [("fp32", 20), ("bf16", 64), ("fp32", 1)]:
    cfg = tv.resolve_config(151936, k)
    c = -(-151936 // cfg["BLOCK"])
    c1 = dict(K=k, KP=tv._next_pow2(k), BLOCK=cfg["BLOCK"], GROUP=cfg["GROUP"])
    sig = dict(x_ptr=f"*{dt}", scr_ptr="*i64", V="i32", stride_xb="i32", **{n: "constexpr" for n in c1})
    try:
        src = ASTSource(fn=chunk, signature=sig, constexprs=c1, attrs=aligned(4))
    except TypeError:
        print("SKIP: this triton's ASTSource takes other arguments"); sys.exit(0)
    opts = dict(num_warps=cfg["num_warps"])
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    loads = [ln for ln in ptx.splitlines() if "ld.global" in ln]
    assert loads and all(".v4" in ln or dt == "bf16" for ln in loads), "the chunk is not read in 16-byte vectors"
    c2 = dict(K=k, KP=tv._next_pow2(k), NCP=tv._next_pow2(c * k), BLOCK=cfg["BLOCK"], GROUP=cfg["GROUP"])
    sig = dict(x_ptr=f"*{dt}", scr_ptr="*i64", out_ptr=f"*{dt}", V="i32", NC="i32", stride_xb="i32",
               stride_ob="i32", **{n: "constexpr" for n in c2})
    src = ASTSource(fn=merge, signature=sig, constexprs=c2, attrs=aligned(7))
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg["merge_warps"]))
print("OK")
"""


def test_kernels_compile_for_hopper():
    """No GPU needed: Triton compiles both kernels to sm_90 code (the interpreter does not run the GPU front end:
    int64 reductions, bitcasts, the strided gather); in a subprocess, where the interpreter is off."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's warning; the kernels have no float math
    p = subprocess.run([sys.executable, "-c", AOT, tv.__file__], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    if "SKIP:" in p.stdout:
        pytest.skip(p.stdout.strip())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
