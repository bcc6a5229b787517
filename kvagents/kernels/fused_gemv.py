"""One-row matrix-vector product (decode at batch 1) with the small ops around it fused in: a Triton kernel.

At ``M = 1`` every projection of a decode step is a GEMV that reads its weight once; the RMSNorm before it, the
SiLU * up product before ``down_proj``, the bias and the residual add after it are each a separate small kernel in
the eager / Inductor step (:mod:`kvagents.engine.static_cache`). :func:`gemv` does

    y = F.linear(prologue(x), w, bias)          # fp32 accumulation, rounded to the model dtype
    y = residual + y                            # when residual is given, rounded as eager ``residual + y``

in one kernel, where the prologue is nothing, the RMSNorm of :func:`kvagents.engine.static_cache._rms` (``rms_weight``),
or SwiGLU ``silu(x[:, :K]) * x[:, K:]`` (``swiglu=True``), each rounded op for op as eager PyTorch rounds it:

- RMSNorm: float32 sum of squares over ``K`` / ``K`` (+ ``eps``), ``rsqrt`` in float32, ``x * rsqrt`` rounded to
  the model dtype, times the weight rounded again (``w * (xf * rsqrt(var + eps)).to(dt)``).
- SwiGLU: ``silu(g) = g / (1 + exp(-g))`` in float32 rounded to the dtype, times ``u`` rounded to the dtype.
- Bias: added to the float32 accumulator before the one rounding, as cuBLAS does for ``F.linear(x, w, b)`` (beta = 1
  on a copy of the bias, or the cublasLt bias epilogue): not ``F.linear(x, w) + b`` (two roundings).
- ``out_dtype=torch.float32`` stores the model-dtype result as float32: ``F.linear(x, head_w).float()``.

Every program (a block of ``BLOCK_N`` output rows) recomputes its prologue over all of ``K`` (the RMSNorm's sum of
squares included): ``x`` is a few KiB and stays in L2, and no second kernel is needed. The grid covers ``N`` in
blocks of ``BLOCK_N`` rows; each program walks ``K`` in ``BLOCK_K`` chunks (``tl.range(..., num_stages=...)``),
keeping a ``[BLOCK_N, BLOCK_K]`` float32 accumulator that is summed once at the end. The launch configuration comes
from the ``config`` argument, else :data:`CONFIGS` keyed by ``(N, K)`` (``K`` the reduced length: the half width
of a SwiGLU input), else :func:`default_config`.

Triton is optional: this module imports without it and :func:`available` says whether :func:`gemv` can run. On CPU
tensors it runs only under Triton's interpreter, for tests: ``TRITON_INTERPRET=1`` must be in the environment before
Triton is first imported (importing torch's compile stack, hence kvagents, imports it); there bfloat16 rounding is
emulated with integer ops because the interpreter truncates float32 -> bfloat16 casts (the GPU rounds to nearest
even).

Example:
    >>> import torch
    >>> from kvagents import fused_gemv
    >>> if fused_gemv.available() and torch.cuda.is_available():  # doctest: +SKIP
    ...     x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ...     w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    ...     g = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    ...     y = fused_gemv.gemv(x, w, rms_weight=g, eps=1e-6)  # == F.linear(_rms(x, g, 1e-6), w)
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

# absolute: the kernel tests and benches also load this module from its file, outside the package
from kvagents.kernels.triton_support import check_device as _check_device
from kvagents.kernels.triton_support import interpreting as _interpreting
from kvagents.kernels.triton_support import kernel_scope as _kernel_scope
from kvagents.kernels.triton_support import next_pow2 as _next_pow2
from kvagents.kernels.triton_support import runnable as _runnable
from kvagents.kernels.triton_support import same_mode as _same_mode

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Best launch configuration per (N, K), from bench/fused_gemv_bench.py on the GPU (paste its printed dict here).
CONFIGS: dict[tuple[int, int], dict[str, int]] = {
    # Qwen3-8B shapes, H100 80GB HBM3, triton 3.6 (bench/fused_gemv_bench.py, 2026-11-25)
    (6144, 4096): {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    (4096, 4096): {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
    (24576, 4096): {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 3},
    (4096, 12288): {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
    (151936, 4096): {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 4},
    # Qwen2.5-0.5B shapes, same device and day
    (1152, 896): {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    (896, 896): {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    (9728, 896): {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1},
    (896, 4864): {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 4},
    (151936, 896): {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 2, "num_stages": 1},
}


# Several rows (2..16, the tensor-core kernel with its rows padded to 16): best launch configuration per (N, K),
# same source, tuned at 8 rows; 17..MAX_ROWS rows (padded to 32: twice the shared memory) take default_row_config.
ROW_CONFIGS: dict[tuple[int, int], dict[str, int]] = {
    # Qwen3-8B shapes, H200, triton 3.6 (bench/fused_gemv_bench.py --rows 8, 2026-11-25, SwiGLU computed before)
    (6144, 4096): {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
    (4096, 4096): {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 2, "num_stages": 5},
    (24576, 4096): {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    (4096, 12288): {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 4},
    (151936, 4096): {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
}

#: the most rows one call takes (the tensor-core kernel pads the rows to 16 or 32)
MAX_ROWS = 32


def load_configs(path: str | os.PathLike) -> None:
    """Add the configurations of a JSON file written by ``bench/fused_gemv_bench.py --write-configs`` to
    :data:`CONFIGS` (``[[N, K, {...}], ...]``). Read at import from ``KVAGENTS_GEMV_CONFIGS`` when set."""
    import json

    with open(path) as f:
        rows = json.load(f)
    try:
        for row in rows:  # [N, K, config] (one row), or [N, K, config, "rows"] (the several-row kernel)
            n, k, cfg = row[:3]
            table = ROW_CONFIGS if row[3:] == ["rows"] else CONFIGS
            table[(int(n), int(k))] = dict(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected [[N, K, {{config}}(, \"rows\")], ...] as written by "
                         "fused_gemv_bench.py") from e


if os.environ.get("KVAGENTS_GEMV_CONFIGS"):
    load_configs(os.environ["KVAGENTS_GEMV_CONFIGS"])

_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def default_row_config(n: int, k: int) -> dict[str, int]:
    """The several-row kernel's configuration when :data:`ROW_CONFIGS` has no entry for ``(n, k)`` (not tuned).

    Example:
        >>> default_row_config(4096, 4096)
        {'BLOCK_N': 32, 'BLOCK_K': 256, 'num_warps': 4, 'num_stages': 4}
    """
    return {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}


def default_config(n: int, k: int) -> dict[str, int]:
    """The configuration used when :data:`CONFIGS` has no entry for ``(n, k)`` (not tuned: a common GEMV shape,
    8 rows x 512 columns = 8 KiB of bfloat16 weight per iteration over 128 threads, 16 bytes each per row).

    Example:
        >>> default_config(4096, 12288)
        {'BLOCK_N': 8, 'BLOCK_K': 512, 'num_warps': 4, 'num_stages': 3}
    """
    return {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}


def available() -> bool:
    """True when :func:`gemv` can run here: Triton imports and there is a CUDA device (or Triton's interpreter is
    on, ``TRITON_INTERPRET=1``, for CPU tensors).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _runnable()


def resolve_config(n: int, k: int, config: dict | None = None, rows: int = 1) -> dict[str, int]:
    """The launch configuration for an ``[N, K]`` weight and ``rows`` activation rows: ``config``, else
    ``CONFIGS[(n, k)]`` (one row) or ``ROW_CONFIGS[(n, k)]`` (2..16 rows), else the default (the several-row kernel
    takes :func:`default_row_config` for 17..32 rows); blocks are clamped to the (power-of-two padded) matrix so small
    shapes work (the several-row kernel keeps ``BLOCK_N >= 16``, ``tl.dot``'s least).

    Example:
        >>> resolve_config(100, 64, {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1})
        {'BLOCK_N': 32, 'BLOCK_K': 64, 'num_warps': 2, 'num_stages': 1}
    """
    if not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"rows must be an int in 1..{MAX_ROWS} (MAX_ROWS), got {rows!r}")
    several = rows > 1
    cfg = dict(default_row_config(n, k) if several else default_config(n, k))
    cfg.update((ROW_CONFIGS if several else CONFIGS).get((n, k), {}) if rows <= 16 else {})
    if config:
        bad = sorted(set(config) - set(_KEYS))
        if bad:
            raise ValueError(f"config has unknown keys {bad}; expected some of {list(_KEYS)}")
        cfg.update(config)
    for key in _KEYS:
        v = cfg[key]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config {key} must be a positive int, got {v!r}")
    for key in ("BLOCK_N", "BLOCK_K", "num_warps"):
        if cfg[key] & (cfg[key] - 1):
            raise ValueError(f"config {key} must be a power of two, got {cfg[key]}")
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], _next_pow2(n))) if several else min(cfg["BLOCK_N"], _next_pow2(n))
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], _next_pow2(k)))
    return cfg


# the rounding jit helper the kernels call: set by _build() (triton_support.kernel_scope), where Triton looks for it
_round = None


def _kernel():
    return _same_mode(_build(), "the gemv kernels were")


@functools.lru_cache(maxsize=1)
def _build():
    """Define the kernel on first use (so ``TRITON_INTERPRET`` is read then, and the module imports without
    Triton); returns ``(kernel, interpreted)``."""
    triton, tl = _kernel_scope("kvagents.kernels.fused_gemv", globals())  # publishes _round

    @triton.jit
    def _load(ptrs, mask, EVEN: tl.constexpr, POLICY: tl.constexpr):
        """float32 of ``ptrs`` (masked to 0 unless ``EVEN``)."""
        if EVEN:
            v = tl.load(ptrs, eviction_policy=POLICY)
        else:
            v = tl.load(ptrs, mask=mask, other=0.0, eviction_policy=POLICY)
        return v.to(tl.float32)

    # Triton resolves the names a kernel calls in its module's globals (not in this closure): publish the helper
    globals().update(_load=_load)

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, bias_ptr, rmsw_ptr, res_ptr, y_ptr,
        N, K, stride_wn, eps,
        HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XBLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
        EVEN_K: tl.constexpr, EMU_BF16: tl.constexpr,
    ):  # fmt: skip
        DT: tl.constexpr = w_ptr.dtype.element_ty
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        # rows past N load row N - 1 (no mask on the weight stream); their results are not stored
        w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
        if HAS_RMS:
            ss = tl.zeros([XBLOCK], dtype=tl.float32)
            for k0 in tl.range(0, K, XBLOCK):
                rx = k0 + tl.arange(0, XBLOCK)
                xs = tl.load(x_ptr + rx, mask=rx < K, other=0.0).to(tl.float32)
                ss += xs * xs
            inv = tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            # the weight is read once: do not let it push x (re-read by every program) out of L2
            wt = _load(w_rows + rk[None, :], kmask[None, :], EVEN_K, "evict_first")
            if SWIGLU:
                g = _load(x_ptr + rk, kmask, EVEN_K, "")
                u = _load(x_ptr + K + rk, kmask, EVEN_K, "")
                s = _round(g / (1.0 + tl.exp(-g)), DT, EMU_BF16)
                xv = _round(s * u, DT, EMU_BF16)
            elif HAS_RMS:
                xs = _load(x_ptr + rk, kmask, EVEN_K, "")
                gw = _load(rmsw_ptr + rk, kmask, EVEN_K, "")
                xv = _round(gw * _round(xs * inv, DT, EMU_BF16), DT, EMU_BF16)
            else:
                xv = _load(x_ptr + rk, kmask, EVEN_K, "")
            acc += wt * xv[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y = _round(y, DT, EMU_BF16)
        if HAS_RES:
            y = _round(tl.load(res_ptr + rn, mask=nmask, other=0.0).to(tl.float32) + y, DT, EMU_BF16)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def rows_kernel(
        x_ptr, w_ptr, bias_ptr, rmsw_ptr, res_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_rm, stride_ym, eps,
        HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XBLOCK: tl.constexpr,
        NUM_STAGES: tl.constexpr, EVEN_K: tl.constexpr, EMU_BF16: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """``gemv_kernel`` for ``M`` (2..BLOCK_M) rows: the tile product on tensor cores (``tl.dot`` of the
        prologue's rounded ``[BLOCK_M, BLOCK_K]`` rows with the ``[BLOCK_N, BLOCK_K]`` weight tile), rows past
        ``M`` masked to zero and not stored. No SwiGLU prologue: :func:`gemv` computes it first."""
        DT: tl.constexpr = w_ptr.dtype.element_ty
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rm = tl.arange(0, BLOCK_M)
        mmask = rm < M
        w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        if HAS_RMS:
            ss = tl.zeros([BLOCK_M, XBLOCK], dtype=tl.float32)
            for k0 in tl.range(0, K, XBLOCK):
                rx = k0 + tl.arange(0, XBLOCK)
                xs = tl.load(x_rows + rx[None, :], mask=mmask[:, None] & (rx < K)[None, :], other=0.0)
                xs = xs.to(tl.float32)
                ss += xs * xs
            inv = tl.math.rsqrt(tl.sum(ss, axis=1) / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            xmask = mmask[:, None] & kmask[None, :]
            if EVEN_K:
                wt = tl.load(w_rows + rk[None, :], eviction_policy="evict_first")
            else:
                wt = tl.load(w_rows + rk[None, :], mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
            if HAS_RMS:
                xs = tl.load(x_rows + rk[None, :], mask=xmask, other=0.0).to(tl.float32)
                gw = _load(rmsw_ptr + rk, kmask, EVEN_K, "")
                xv = _round(gw[None, :] * _round(xs * inv[:, None], DT, EMU_BF16), DT, EMU_BF16)
            else:
                xv = tl.load(x_rows + rk[None, :], mask=xmask, other=0.0).to(tl.float32)
            # xv holds values of DT already (rounded): the cast is exact
            if EMU_BF16:  # the interpreter's dot mishandles bfloat16: the same exact products in float32
                acc += tl.dot(xv, tl.trans(wt.to(tl.float32)), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(xv.to(DT), tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xv.to(DT), tl.trans(wt))
        y = acc
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        y = _round(y, DT, EMU_BF16)
        omask = mmask[:, None] & nmask[None, :]
        if HAS_RES:
            rv = tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=omask, other=0.0)
            y = _round(rv.to(tl.float32) + y, DT, EMU_BF16)
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=omask)

    return (gemv_kernel, rows_kernel), _interpreting()


def _check_vec(name: str, t: torch.Tensor, n: int, x: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """``t`` checked against ``x``'s dtype and device: ``[n]`` (or ``[1, n]``) flattened to ``[n]``; with ``rows``
    > 1, ``[rows, n]`` with unit stride along ``n``."""
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if rows > 1:
        if tuple(t.shape) != (rows, n):
            raise ValueError(f"{name} must have shape [{rows}, {n}], got {list(t.shape)}")
        return t if t.stride(-1) == 1 else t.contiguous()
    if t.numel() != n or (t.dim() == 2 and t.shape[0] != 1) or t.dim() > 2:
        raise ValueError(f"{name} must have shape [{n}] or [1, {n}], got {list(t.shape)}")
    return t.reshape(n).contiguous()


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    rms_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``F.linear(prologue(x), w, bias)`` (+ ``residual``) for a few rows ``x`` ``[M, K]`` (or one row ``[K]``),
    in one kernel.

    One row runs the GEMV kernel (fused multiply-adds, each weight element read once); 2..:data:`MAX_ROWS` rows
    run the tensor-core kernel (``tl.dot`` of the rows, padded to 16 or 32, with each weight tile, read once for
    all rows; a SwiGLU prologue is computed eagerly before it). The prologue and epilogue round as eager PyTorch in
    both.

    Args:
        x: ``[M, K]`` or ``[K]`` (``[M, 2K]`` / ``[2K]`` with ``swiglu``: gate then up), unit stride along K, the
            dtype of ``w`` (bfloat16, float16 or float32); ``M <= MAX_ROWS``.
        w: ``[N, K]`` with unit stride along ``K`` (rows may be padded).
        bias: ``[N]``, added to the float32 accumulator before rounding (as cuBLAS in ``F.linear``).
        rms_weight: ``[K]``: ``x`` is first normed by :func:`kvagents.engine.static_cache._rms` with ``eps``.
        swiglu: ``x`` is ``silu(x[:, :K]) * x[:, K:]`` first (not together with ``rms_weight``).
        residual: ``[M, N]`` (or ``[N]`` for one row): returns ``residual + y``, rounded as eager PyTorch.
        out_dtype: ``None`` (x's dtype) or ``torch.float32``: the result, rounded to x's dtype, stored as float32
            (``F.linear(x, head_w).float()``).
        config: ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages`` overrides (see :func:`resolve_config`).

    Returns: ``[M, N]`` when ``x`` is 2-D, else ``[N]``.

    Example:
        >>> y = gemv(x, qkv_w, bias=qkv_b, rms_weight=ln1, eps=1e-6)  # doctest: +SKIP
        >>> h = gemv(a, o_w, residual=h)  # doctest: +SKIP
    """
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError(f"x and w must be tensors, got {type(x).__name__} and {type(w).__name__}")
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(
            f"w must be a 2-D [N, K] matrix with unit stride along K, got shape {list(w.shape)} strides {w.stride()}"
        )
    if w.dtype not in DTYPES:
        raise ValueError(f"w's dtype must be one of {DTYPES}, got {w.dtype}")
    if x.dtype != w.dtype:
        raise ValueError(f"x must have w's dtype {w.dtype}, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device}, w on {w.device}")
    n, k = w.shape
    kx = 2 * k if swiglu else k
    if x.dim() not in (1, 2) or x.shape[-1] != kx:
        what = f"[M, {kx}] or [{kx}]" + (" (gate then up: swiglu doubles K)" if swiglu else "")
        raise ValueError(f"x must have shape {what} for w {list(w.shape)}, got {list(x.shape)}")
    m = x.shape[0] if x.dim() == 2 else 1
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x has {m} rows; gemv takes 1..{MAX_ROWS} (MAX_ROWS): use F.linear for more")
    if swiglu and rms_weight is not None:
        raise ValueError("swiglu and rms_weight are exclusive prologues; got both")
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be None, {x.dtype} or torch.float32, got {out_dtype}")
    b = _check_vec("bias", bias, n, x) if bias is not None else None
    g = _check_vec("rms_weight", rms_weight, k, x) if rms_weight is not None else None
    r = _check_vec("residual", residual, n, x, rows=m) if residual is not None else None
    cfg = resolve_config(n, k, config, rows=m)
    _check_device(w.device, _interpreting())
    out = torch.empty((m, n) if x.dim() == 2 else (n,), dtype=out_dtype or x.dtype, device=x.device)
    one_row, several_rows = _kernel()
    grid = ((n + cfg["BLOCK_N"] - 1) // cfg["BLOCK_N"],)
    if m == 1:
        xf = x.reshape(kx).contiguous()
        xblock = min(_next_pow2(k), 16 * 32 * cfg["num_warps"])
        one_row[grid](
            xf, w, b if b is not None else xf, g if g is not None else xf, r if r is not None else xf, out,
            n, k, w.stride(0), float(eps),
            HAS_BIAS=b is not None, HAS_RMS=g is not None, SWIGLU=bool(swiglu), HAS_RES=r is not None,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], XBLOCK=xblock, NUM_STAGES=cfg["num_stages"],
            EVEN_K=k % cfg["BLOCK_K"] == 0, EMU_BF16=_interpreting(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        return out
    if swiglu:
        # SwiGLU first, eagerly (exactly the reference's rounding): each of the 100+ programs re-reading the
        # [M, 2K] input and recomputing its SwiGLU made the 8B down_proj 120 us against 50 unfused at 8 rows
        x = F.silu(x[:, :k]) * x[:, k:]
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_m = 16 if m <= 16 else 32
    xblock = max(16, min(_next_pow2(k), 4096 // block_m))
    several_rows[grid](
        x, w, b if b is not None else x, g if g is not None else x, r if r is not None else x, out,
        m, n, k, x.stride(0), w.stride(0), r.stride(0) if r is not None else 0, out.stride(0), float(eps),
        HAS_BIAS=b is not None, HAS_RMS=g is not None, HAS_RES=r is not None,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], XBLOCK=xblock,
        NUM_STAGES=cfg["num_stages"], EVEN_K=k % cfg["BLOCK_K"] == 0, EMU_BF16=_interpreting(),
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
