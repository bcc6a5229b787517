"""Matrix-vector products of decode (1 to 8 activation rows) with the small ops around them fused in: a Triton
kernel.

At batch ``M <= 8`` every projection of a decode step is a GEMV-like product whose cost is reading its weight once;
the RMSNorm before it, the SiLU * up product before ``down_proj``, the bias and the residual add after it are each a
separate small kernel in the eager / Inductor step (:mod:`kvagents.static_cache`). :func:`gemv` does, for every row
of ``x``,

    y = F.linear(prologue(x), w, bias)          # fp32 accumulation, rounded to the model dtype
    y = residual + y                            # when residual is given, rounded as eager ``residual + y``

in one kernel, where the prologue is nothing, the RMSNorm of :func:`kvagents.static_cache._rms` (``rms_weight``),
or SwiGLU ``silu(x[:, :K]) * x[:, K:]`` (``swiglu=True``), each rounded op for op as eager PyTorch rounds it:

- RMSNorm: float32 sum of squares over ``K`` / ``K`` (+ ``eps``), ``rsqrt`` in float32, ``x * rsqrt`` rounded to
  the model dtype, times the weight rounded again (``w * (xf * rsqrt(var + eps)).to(dt)``); per row.
- SwiGLU: ``silu(g) = g / (1 + exp(-g))`` in float32 rounded to the dtype, times ``u`` rounded to the dtype.
- Bias: added to the float32 accumulator before the one rounding, as cuBLAS does for ``F.linear(x, w, b)`` (beta = 1
  on a copy of the bias, or the cublasLt bias epilogue): not ``F.linear(x, w) + b`` (two roundings).
- ``out_dtype=torch.float32`` stores the model-dtype result as float32: ``F.linear(x, head_w).float()``.

Every program (a block of ``BLOCK_N`` output rows) recomputes its prologue over all of ``K`` (the RMSNorm's sum of
squares included): ``x`` is a few KiB per row and stays in L2, and no second kernel is needed. The grid covers ``N``
in blocks of ``BLOCK_N`` rows; each program walks ``K`` in ``BLOCK_K`` chunks (``tl.range(..., num_stages=...)``),
loads each weight tile once and multiplies it into one ``[BLOCK_N, BLOCK_K]`` float32 accumulator per row of ``x``
(rows unrolled at compile time: ``ROWS = M`` is a ``tl.constexpr``), each summed once at the end. Every row runs the
one-row code with its register layout, so a row's result is bit-identical to computing that row alone with the
same launch configuration: the batch is invariant to the other rows (a 3-D ``[M, BLOCK_N, BLOCK_K]`` tile would
take ~15 % fewer registers, but Triton gives it another layout, hence another summation order).

The launch configuration comes from the ``config`` argument, else :data:`CONFIGS` keyed by ``(N, K, M)`` (tuned for
``M`` rows), else ``(N, K)`` (tuned for one row; ``K`` the reduced length: the half width of a SwiGLU input) or
:func:`default_config`, fitted to ``M > 1`` rows by :func:`fit_rows` (``M`` accumulators per thread must fit in
registers: ``BLOCK_K`` shrinks). At most :data:`MAX_ROWS` rows.

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
    ...     x8 = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)  # 8 rows, the weight read once
    ...     y8 = fused_gemv.gemv(x8, w, rms_weight=g, eps=1e-6)  # [8, 6144]; y8[i] == gemv(x8[i:i+1], ...)[0]
"""

from __future__ import annotations

import functools
import os

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ROWS = 8  # rows of x one call takes: every row keeps a float32 accumulator tile in registers
ACC_PER_THREAD = 64  # float32 accumulators per thread that fit_rows keeps the M > 1 default to

# Best launch configuration per (N, K) for one row, and per (N, K, M) for M rows (looked up first), from
# bench/fused_gemv_bench.py on the GPU (paste its printed dict here). M > 1 without an entry: fit_rows.
CONFIGS: dict[tuple[int, ...], dict[str, int]] = {
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


def load_configs(path: str | os.PathLike) -> None:
    """Add the configurations of a JSON file written by ``bench/fused_gemv_bench.py --write-configs`` to
    :data:`CONFIGS`: rows ``[N, K, M, {...}]`` (tuned for ``M`` rows; ``M = 1`` is stored under ``(N, K)``) or
    the older one-row ``[N, K, {...}]``. Read at import from ``KVAGENTS_GEMV_CONFIGS`` when set.

    Example:
        >>> import json, tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        ...     json.dump([[64, 32, {"BLOCK_N": 4}], [64, 32, 8, {"BLOCK_N": 2}]], f)
        >>> load_configs(f.name)
        >>> CONFIGS.pop((64, 32)), CONFIGS.pop((64, 32, 8))
        ({'BLOCK_N': 4}, {'BLOCK_N': 2})
    """
    import json

    with open(path) as f:
        rows = json.load(f)
    new: dict[tuple[int, ...], dict[str, int]] = {}
    for row in rows if isinstance(rows, list) else [rows]:
        if not isinstance(row, list) or len(row) not in (3, 4) or not isinstance(row[-1], dict):
            raise ValueError(
                f"{path}: expected rows [N, K, M, {{config}}] or [N, K, {{config}}] as written by "
                f"fused_gemv_bench.py, got {row!r}"
            )
        try:
            n, k, m = int(row[0]), int(row[1]), int(row[2]) if len(row) == 4 else 1
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: N, K and M must be ints, got {row[:-1]!r}") from e
        if not 1 <= m <= MAX_ROWS:
            raise ValueError(f"{path}: M must be 1 to MAX_ROWS = {MAX_ROWS}, got {m} in {row!r}")
        new[(n, k) if m == 1 else (n, k, m)] = dict(row[-1])
    CONFIGS.update(new)


if os.environ.get("KVAGENTS_GEMV_CONFIGS"):
    load_configs(os.environ["KVAGENTS_GEMV_CONFIGS"])

_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def default_config(n: int, k: int) -> dict[str, int]:
    """The configuration used when :data:`CONFIGS` has no entry for ``(n, k)`` (not tuned: a common GEMV shape,
    8 rows x 512 columns = 8 KiB of bfloat16 weight per iteration over 128 threads, 16 bytes each per row).

    Example:
        >>> default_config(4096, 12288)
        {'BLOCK_N': 8, 'BLOCK_K': 512, 'num_warps': 4, 'num_stages': 3}
    """
    return {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - depends on the machine
        return None
    return triton, tl


def _interpreting() -> bool:
    tt = _triton()
    if tt is not None:
        knobs = getattr(tt[0], "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when :func:`gemv` can run here: Triton imports and there is a CUDA device (or Triton's interpreter is
    on, ``TRITON_INTERPRET=1``, for CPU tensors).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _triton() is not None and (torch.cuda.is_available() or _interpreting())


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def fit_rows(cfg: dict[str, int], m: int) -> dict[str, int]:
    """``cfg`` (tuned for one row) with its tile shrunk until ``m`` rows' float32 accumulators fit in registers:
    ``m x BLOCK_N x BLOCK_K / (32 x num_warps) <= ACC_PER_THREAD``, halving ``BLOCK_K`` down to 64 first (a
    thread keeps its 16-byte weight vector; a row's slice stays one 128-byte line), then ``BLOCK_N``. The default
    of ``m > 1`` rows where :data:`CONFIGS` has no ``(N, K, m)`` entry (untuned: run bench/fused_gemv_bench.py
    ``--rows 1,8`` on the GPU for measured ones).

    ``ACC_PER_THREAD = 64``: at 8 rows a thread keeps 8 weights per iteration (one 16-byte bfloat16 vector) and
    8 x 8 accumulators; such kernels compile for sm_90 to ~115-165 registers without spills (16 weights per
    thread: ~170-230 registers, fewer resident warps to hide the weight stream's latency).

    Example:
        >>> fit_rows({"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3}, 8)
        {'BLOCK_N': 4, 'BLOCK_K': 256, 'num_warps': 4, 'num_stages': 3}
        >>> fit_rows({"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}, 3)
        {'BLOCK_N': 16, 'BLOCK_K': 128, 'num_warps': 4, 'num_stages': 3}
    """
    cfg = dict(cfg)
    budget = ACC_PER_THREAD * 32 * cfg["num_warps"]
    while m * cfg["BLOCK_N"] * cfg["BLOCK_K"] > budget:
        if cfg["BLOCK_K"] > 64:
            cfg["BLOCK_K"] //= 2
        elif cfg["BLOCK_N"] > 1:
            cfg["BLOCK_N"] //= 2
        else:
            break
    return cfg


def _checked(cfg: dict, what: str) -> dict[str, int]:
    bad = sorted(set(cfg) - set(_KEYS))
    if bad:
        raise ValueError(f"{what} has unknown keys {bad}; expected some of {list(_KEYS)}")
    for key in _KEYS:
        v = cfg.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} {key} must be a positive int, got {v!r}")
    for key in ("BLOCK_N", "BLOCK_K", "num_warps"):
        v = cfg.get(key, 1)
        if v & (v - 1):
            raise ValueError(f"{what} {key} must be a power of two, got {v}")
    return cfg


def resolve_config(n: int, k: int, config: dict | None = None, m: int = 1) -> dict[str, int]:
    """The launch configuration for an ``[N, K]`` weight and ``m`` rows: ``CONFIGS[(n, k, m)]`` when tuned for
    ``m`` rows, else ``CONFIGS[(n, k)]`` (tuned for one row) or :func:`default_config`, passed through
    :func:`fit_rows` when ``m > 1``; then ``config`` overrides. Blocks are clamped to the (power-of-two padded)
    matrix so small shapes work.

    Rows of one call are bit-identical to each row alone under the same configuration; a different ``m`` can
    resolve to a different configuration (another accumulation order, last-bit differences): pass ``config``
    to pin one for every ``m``.

    Example:
        >>> resolve_config(100, 64, {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1})
        {'BLOCK_N': 32, 'BLOCK_K': 64, 'num_warps': 2, 'num_stages': 1}
        >>> resolve_config(4096, 4096, m=8)  # the one-row (4096, 4096) entry, fitted to 8 rows
        {'BLOCK_N': 4, 'BLOCK_K': 256, 'num_warps': 4, 'num_stages': 3}
    """
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_ROWS:
        raise ValueError(f"m must be an int from 1 to MAX_ROWS = {MAX_ROWS}, got {m!r}")
    cfg = dict(default_config(n, k))
    tuned = CONFIGS.get((n, k, m))
    if tuned is not None:
        cfg.update(_checked(dict(tuned), f"CONFIGS[{(n, k, m)}]"))
    else:
        cfg.update(_checked(dict(CONFIGS.get((n, k), {})), f"CONFIGS[{(n, k)}]"))
        if m > 1:
            cfg = fit_rows(cfg, m)
    if config:
        cfg.update(_checked(dict(config), "config"))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _next_pow2(n))
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], _next_pow2(k)))
    return cfg


def _kernel():
    kernel, interpreted = _build()
    if interpreted != _interpreting():
        raise RuntimeError(
            f"the gemv kernel was built with TRITON_INTERPRET={int(interpreted)} and is now called "
            f"with TRITON_INTERPRET={int(not interpreted)}: one mode per process"
        )
    return kernel


@functools.lru_cache(maxsize=1)
def _build():
    """Define the kernel on first use (so ``TRITON_INTERPRET`` is read then, and the module imports without
    Triton); returns ``(kernel, interpreted)``."""
    tt = _triton()
    if tt is None:
        raise RuntimeError("kvagents.fused_gemv needs triton (pip install triton); available() is False")
    triton, tl = tt

    @triton.jit
    def _round(v, DT: tl.constexpr, EMU_BF16: tl.constexpr):
        """float32 ``v`` rounded (nearest even) to ``DT``, returned as float32."""
        if DT == tl.float32:
            r = v
        elif DT == tl.bfloat16 and EMU_BF16:
            # the interpreter truncates float32 -> bfloat16: round to nearest even on the bits instead
            b = v.to(tl.uint32, bitcast=True)
            b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
            r = b.to(tl.float32, bitcast=True)
        else:
            r = v.to(DT).to(tl.float32)
        return r

    @triton.jit
    def _load(ptrs, mask, EVEN: tl.constexpr, POLICY: tl.constexpr):
        """float32 of ``ptrs`` (masked to 0 unless ``EVEN``)."""
        if EVEN:
            v = tl.load(ptrs, eviction_policy=POLICY)
        else:
            v = tl.load(ptrs, mask=mask, other=0.0, eviction_policy=POLICY)
        return v.to(tl.float32)

    @triton.jit
    def _row_inv(x_row, K, eps, XBLOCK: tl.constexpr, ON: tl.constexpr):
        """The RMSNorm scale ``rsqrt(mean(x_row ** 2) + eps)`` of one row in float32 (``eps`` unless ``ON``:
        a placeholder for a row or a prologue that is not there)."""
        inv = eps
        if ON:
            ss = tl.zeros([XBLOCK], dtype=tl.float32)
            for k0 in tl.range(0, K, XBLOCK):
                rx = k0 + tl.arange(0, XBLOCK)
                xs = tl.load(x_row + rx, mask=rx < K, other=0.0).to(tl.float32)
                ss += xs * xs
            inv = tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)
        return inv

    @triton.jit
    def _row_x(x_row, gw, inv, rk, kmask, K, HAS_RMS: tl.constexpr, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr,
               DT: tl.constexpr, EMU_BF16: tl.constexpr):  # fmt: skip
        """Columns ``rk`` of one row of ``x`` after the prologue, float32 (``gw``: the RMSNorm weight there)."""
        if SWIGLU:
            g = _load(x_row + rk, kmask, EVEN_K, "")
            u = _load(x_row + K + rk, kmask, EVEN_K, "")
            s = _round(g / (1.0 + tl.exp(-g)), DT, EMU_BF16)
            xv = _round(s * u, DT, EMU_BF16)
        elif HAS_RMS:
            xs = _load(x_row + rk, kmask, EVEN_K, "")
            xv = _round(gw * _round(xs * inv, DT, EMU_BF16), DT, EMU_BF16)
        else:
            xv = _load(x_row + rk, kmask, EVEN_K, "")
        return xv

    @triton.jit
    def _row_out(acc, b, res_row, y_row, rn, nmask, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                 DT: tl.constexpr, EMU_BF16: tl.constexpr):  # fmt: skip
        """Reduce one row's accumulator, add the bias ``b``, round, add the residual, store."""
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += b
        y = _round(y, DT, EMU_BF16)
        if HAS_RES:
            y = _round(tl.load(res_row + rn, mask=nmask, other=0.0).to(tl.float32) + y, DT, EMU_BF16)
        tl.store(y_row + rn, y.to(y_row.dtype.element_ty), mask=nmask)

    # Triton resolves the names a kernel calls in its module's globals (not in this closure): publish the helpers
    globals().update(_round=_round, _load=_load, _row_inv=_row_inv, _row_x=_row_x, _row_out=_row_out)

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, bias_ptr, rmsw_ptr, res_ptr, y_ptr,
        N, K, stride_xm, stride_wn, eps,
        HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XBLOCK: tl.constexpr,
        NUM_STAGES: tl.constexpr, EVEN_K: tl.constexpr, EMU_BF16: tl.constexpr,
    ):  # fmt: skip
        # ROWS (1..8) rows of x share each weight tile. Every row runs the one-row code on its own [BLOCK_N,
        # BLOCK_K] accumulator (unrolled below, not a [ROWS, BLOCK_N, BLOCK_K] tile: Triton gives a 3-D tile
        # another register layout, hence another summation order, and converts the weight tile through shared
        # memory), so a row's result is bit-identical to that row alone. Rows past ROWS compile away.
        DT: tl.constexpr = w_ptr.dtype.element_ty
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        # rows past N load row N - 1 (no mask on the weight stream); their results are not stored
        w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
        inv0 = _row_inv(x_ptr, K, eps, XBLOCK, HAS_RMS)
        inv1 = _row_inv(x_ptr + 1 * stride_xm, K, eps, XBLOCK, HAS_RMS and ROWS > 1)
        inv2 = _row_inv(x_ptr + 2 * stride_xm, K, eps, XBLOCK, HAS_RMS and ROWS > 2)
        inv3 = _row_inv(x_ptr + 3 * stride_xm, K, eps, XBLOCK, HAS_RMS and ROWS > 3)
        inv4 = _row_inv(x_ptr + 4 * stride_xm, K, eps, XBLOCK, HAS_RMS and ROWS > 4)
        inv5 = _row_inv(x_ptr + 5 * stride_xm, K, eps, XBLOCK, HAS_RMS and ROWS > 5)
        inv6 = _row_inv(x_ptr + 6 * stride_xm, K, eps, XBLOCK, HAS_RMS and ROWS > 6)
        inv7 = _row_inv(x_ptr + 7 * stride_xm, K, eps, XBLOCK, HAS_RMS and ROWS > 7)
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc4 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc5 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc6 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc7 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            # the weight is read once for all rows: do not let it push x (re-read by every program) out of L2
            wt = _load(w_rows + rk[None, :], kmask[None, :], EVEN_K, "evict_first")
            gw = eps  # the RMSNorm weight, shared by the rows
            if HAS_RMS:
                gw = _load(rmsw_ptr + rk, kmask, EVEN_K, "")
            acc0 += wt * _row_x(x_ptr, gw, inv0, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT, EMU_BF16)[None, :]
            if ROWS > 1:
                acc1 += wt * _row_x(x_ptr + 1 * stride_xm, gw, inv1, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT,
                                    EMU_BF16)[None, :]  # fmt: skip
            if ROWS > 2:
                acc2 += wt * _row_x(x_ptr + 2 * stride_xm, gw, inv2, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT,
                                    EMU_BF16)[None, :]  # fmt: skip
            if ROWS > 3:
                acc3 += wt * _row_x(x_ptr + 3 * stride_xm, gw, inv3, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT,
                                    EMU_BF16)[None, :]  # fmt: skip
            if ROWS > 4:
                acc4 += wt * _row_x(x_ptr + 4 * stride_xm, gw, inv4, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT,
                                    EMU_BF16)[None, :]  # fmt: skip
            if ROWS > 5:
                acc5 += wt * _row_x(x_ptr + 5 * stride_xm, gw, inv5, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT,
                                    EMU_BF16)[None, :]  # fmt: skip
            if ROWS > 6:
                acc6 += wt * _row_x(x_ptr + 6 * stride_xm, gw, inv6, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT,
                                    EMU_BF16)[None, :]  # fmt: skip
            if ROWS > 7:
                acc7 += wt * _row_x(x_ptr + 7 * stride_xm, gw, inv7, rk, kmask, K, HAS_RMS, SWIGLU, EVEN_K, DT,
                                    EMU_BF16)[None, :]  # fmt: skip
        b = eps
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        _row_out(acc0, b, res_ptr, y_ptr, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)
        if ROWS > 1:
            _row_out(acc1, b, res_ptr + 1 * N, y_ptr + 1 * N, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)
        if ROWS > 2:
            _row_out(acc2, b, res_ptr + 2 * N, y_ptr + 2 * N, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)
        if ROWS > 3:
            _row_out(acc3, b, res_ptr + 3 * N, y_ptr + 3 * N, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)
        if ROWS > 4:
            _row_out(acc4, b, res_ptr + 4 * N, y_ptr + 4 * N, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)
        if ROWS > 5:
            _row_out(acc5, b, res_ptr + 5 * N, y_ptr + 5 * N, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)
        if ROWS > 6:
            _row_out(acc6, b, res_ptr + 6 * N, y_ptr + 6 * N, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)
        if ROWS > 7:
            _row_out(acc7, b, res_ptr + 7 * N, y_ptr + 7 * N, rn, nmask, HAS_BIAS, HAS_RES, DT, EMU_BF16)

    return gemv_kernel, _interpreting()


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def _check_vec(name: str, t: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    _check_like(name, t, x)
    if t.numel() != n or (t.dim() == 2 and t.shape[0] != 1) or t.dim() > 2:
        raise ValueError(f"{name} must have shape [{n}] or [1, {n}], got {list(t.shape)}")
    return t.reshape(n).contiguous()


def _check_rows(name: str, t: torch.Tensor, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    """``[m, n]`` (``[n]`` also when ``m == 1``), contiguous."""
    _check_like(name, t, x)
    if t.shape != (m, n) and not (m == 1 and t.shape == (n,)):
        what = f"[{m}, {n}]" + (f" or [{n}]" if m == 1 else "")
        raise ValueError(f"{name} must have shape {what} (x's rows by w's rows), got {list(t.shape)}")
    return t.reshape(m, n).contiguous()


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
    """``F.linear(prologue(x), w, bias)`` (+ ``residual``) for ``M <= 8`` rows ``x`` ``[M, K]`` (or one row
    ``[K]``), in one kernel that reads each weight tile once for all the rows.

    Args:
        x: ``[M, K]`` with ``1 <= M <= MAX_ROWS``, or ``[K]`` (``[M, 2K]`` / ``[2K]`` with ``swiglu``: gate then
            up), the dtype of ``w`` (bfloat16, float16 or float32); rows need unit stride (else copied).
        w: ``[N, K]`` with unit stride along ``K`` (rows may be padded).
        bias: ``[N]``, added to the float32 accumulator before rounding (as cuBLAS in ``F.linear``).
        rms_weight: ``[K]``: each row of ``x`` is first normed by :func:`kvagents.static_cache._rms` with ``eps``.
        swiglu: ``x`` is ``silu(x[:, :K]) * x[:, K:]`` first (not together with ``rms_weight``).
        residual: ``[M, N]`` (``[N]`` too when ``M == 1``): returns ``residual + y``, rounded as eager PyTorch.
        out_dtype: ``None`` (x's dtype) or ``torch.float32``: the result, rounded to x's dtype, stored as float32
            (``F.linear(x, head_w).float()``).
        config: ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages`` overrides (see :func:`resolve_config`).

    Returns: ``[M, N]`` when ``x`` is 2-D, else ``[N]``. Each row is bit-identical to that row alone under the
    same launch configuration (the same accumulation order: the batch is invariant to its other rows).

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
        raise ValueError(
            f"x has {m} rows; gemv takes 1 to MAX_ROWS = {MAX_ROWS} rows (the accumulators of every row stay in "
            f"registers): use F.linear for more"
        )
    if swiglu and rms_weight is not None:
        raise ValueError("swiglu and rms_weight are exclusive prologues; got both")
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be None, {x.dtype} or torch.float32, got {out_dtype}")
    xf = x.reshape(m, kx)
    if xf.stride(1) != 1:
        xf = xf.contiguous()
    b = _check_vec("bias", bias, n, x) if bias is not None else None
    g = _check_vec("rms_weight", rms_weight, k, x) if rms_weight is not None else None
    r = _check_rows("residual", residual, m, n, x) if residual is not None else None
    cfg = resolve_config(n, k, config, m=m)
    if w.device.type == "cpu" and not _interpreting():
        raise ValueError(
            "CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1 before triton is "
            "imported); use CUDA tensors"
        )
    out = torch.empty((m, n) if x.dim() == 2 else (n,), dtype=out_dtype or x.dtype, device=x.device)
    xblock = min(_next_pow2(k), 16 * 32 * cfg["num_warps"])
    grid = ((n + cfg["BLOCK_N"] - 1) // cfg["BLOCK_N"],)
    _kernel()[grid](
        xf, w, b if b is not None else xf, g if g is not None else xf, r if r is not None else xf, out,
        n, k, xf.stride(0), w.stride(0), float(eps),
        HAS_BIAS=b is not None, HAS_RMS=g is not None, SWIGLU=bool(swiglu), HAS_RES=r is not None,
        ROWS=m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], XBLOCK=xblock,
        NUM_STAGES=cfg["num_stages"], EVEN_K=k % cfg["BLOCK_K"] == 0, EMU_BF16=_interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
