"""The part of a decode step between the q/k/v projection and attention, in one Triton kernel.

:func:`kvagents.engine.static_cache.rope_write` splits the projected ``qkv`` ``[B, (H_q + 2 H_kv) d]`` into heads, applies
the q/k RMSNorms (Qwen3; Llama / Qwen2 have none), rotates queries and keys (RoPE) and writes the keys and values
into column ``col`` of a layer's static cache. Compiled with ``torch.compile`` it costs seconds of warm-up per batch
size; :func:`rope_write_kernel` computes the same thing in one hand-written kernel (Triton's JIT: a fraction of a
second), with the same arguments and result.

Method: grid ``(B, H_q + H_kv)``; program ``(b, j)`` takes one head of row ``b``: query head ``j`` when ``j < H_q``,
else kv head ``j - H_q`` (its key and its value). The head's ``d`` values start at column ``j * d`` of the row in
both cases (the keys follow the queries); the program loads them and their rotate-half partners ``x[(i + d/2) %
d]`` (a second, permuted load of the same row, the first half negated: ``rotate_half(x) = cat(-x[d/2:], x[:d/2])``),
then rounds op for op as eager PyTorch does in the model dtype ``dt``:

- RMSNorm over ``d`` (when the weights are given): ``var`` the float32 mean of ``x * x``, ``inv = rsqrt(var +
  eps)``; ``y = w * (x * inv).to(dt)``: the float32 product rounded to ``dt``, times the weight, rounded again.
  The partners are normed with the same ``inv`` and their own weights.
- RoPE: ``y * cos + rotate_half(y) * sin``: each product rounded to ``dt``, their float32 sum rounded to ``dt``.
- queries go to a new ``[B, H_q, d]`` tensor, keys to ``k_cache[b, h, col]``; the value (the ``d`` values at
  column ``(j + H_kv) * d``) is copied unchanged to ``v_cache[b, h, col]``.

``col`` is read in the kernel (no host synchronisation) and the grid follows the shapes only, so the launch can be
captured in a CUDA graph. The kernel is compiled without floating-point contraction (``enable_fp_fusion=False``),
so float32 sums of products are not fused into FMAs that eager PyTorch does not use. The only difference left from
eager PyTorch is the float32 summation order of the variance (and, on the GPU, the approximate ``rsqrt`` that
Inductor and eager CUDA use too): bfloat16 results are equal or, rarely, one unit in the last place apart.

Preconditions that cannot be checked without a host sync: ``0 <= col < cap``. On CPU tensors the kernel runs only
under Triton's interpreter, for tests (``TRITON_INTERPRET=1`` before Triton is first imported; see
:mod:`kvagents.kernels.fused_gemv`); there bfloat16 rounding is emulated with integer ops (the interpreter truncates float32
-> bfloat16 casts; the GPU rounds to nearest even).

Example:
    >>> import torch
    >>> from kvagents.kernels import fused_rope
    >>> B, hq, hkv, d, cap = 2, 32, 8, 128, 512
    >>> qkv = torch.randn(B, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> K = torch.zeros(36, B, hkv, cap, d, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> V = torch.zeros_like(K)  # doctest: +SKIP
    >>> cos, sin = (torch.rand(B, 1, d, device="cuda", dtype=torch.bfloat16) for _ in "cs")  # doctest: +SKIP
    >>> qn_w = kn_w = torch.ones(d, device="cuda", dtype=torch.bfloat16)  # Qwen3 (None: Llama)  # doctest: +SKIP
    >>> col = torch.tensor([17], device="cuda")  # doctest: +SKIP
    >>> q = fused_rope.rope_write_kernel(qkv, qn_w, kn_w, cos, sin, K[3], V[3], col, 1e-6, hq, hkv,
    ...                                  d)  # doctest: +SKIP
    >>> # == static_cache.rope_write(...) on the same arguments: q [2, 32, 128]; K[3][:, :, 17], V[3][:, :, 17] written

Measured against FlashInfer (``bench/flashinfer_bench.py``, H100, 2026-12-07, 32 rows of the Qwen3-8B shape): 2.1 µs
for this kernel against 17.7 µs for FlashInfer 0.5.3's ``rmsnorm`` on q and k, ``apply_rope_pos_ids_inplace`` and the
two cache writes (61.3 µs for the eager torch ops), each replayed as a CUDA graph.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

# absolute: the kernel tests and benches also load this module from its file, outside the package
from kvagents.kernels.triton_support import check_device as _check_device
from kvagents.kernels.triton_support import check_tensor as _check_tensor
from kvagents.kernels.triton_support import interpreting as _interpreting
from kvagents.kernels.triton_support import kernel_scope as _kernel_scope
from kvagents.kernels.triton_support import runnable as _runnable
from kvagents.kernels.triton_support import same_mode as _same_mode

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    """True when :func:`rope_write_kernel` can run here: Triton imports and there is a CUDA device (or Triton's
    interpreter is on, ``TRITON_INTERPRET=1``, for CPU tensors).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _runnable()


# the rounding jit helper the kernels call: set by _build() (triton_support.kernel_scope), where Triton looks for it
_round = None


def _kernel():
    return _same_mode(_build(), "the rope kernel was")


@functools.lru_cache(maxsize=1)
def _build():
    """Define the kernel on first use (so ``TRITON_INTERPRET`` is read then, and the module imports without
    Triton); returns ``(kernel, interpreted)``."""
    triton, tl = _kernel_scope("kvagents.kernels.fused_rope", globals())  # publishes _round

    @triton.jit
    def rope_kernel(
        qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, col_ptr, q_ptr,
        stride_xb, stride_cb, stride_sb, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, eps,
        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_NORM: tl.constexpr, EMU_BF16: tl.constexpr,
    ):  # fmt: skip
        """Head ``j`` of row ``b``: a query head (``j < HQ``) or kv head ``j - HQ``: norm, RoPE, store."""
        DT: tl.constexpr = qkv_ptr.dtype.element_ty
        HALF: tl.constexpr = D // 2
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        i = tl.arange(0, D)
        p = (i + HALF) % D  # the rotate-half partner of element i
        row = qkv_ptr + b * stride_xb + j * D  # query head j, or key head j - HQ: the keys follow the queries
        x = tl.load(row + i).to(tl.float32)
        xp = tl.load(row + p).to(tl.float32)
        if HAS_NORM:
            if j < HQ:
                w = tl.load(qn_ptr + i).to(tl.float32)
                wp = tl.load(qn_ptr + p).to(tl.float32)
            else:
                w = tl.load(kn_ptr + i).to(tl.float32)
                wp = tl.load(kn_ptr + p).to(tl.float32)
            inv = tl.math.rsqrt(tl.sum(x * x, axis=0) * (1.0 / D) + eps)  # D a power of two: exact scaling
            x = _round(w * _round(x * inv, DT, EMU_BF16), DT, EMU_BF16)
            xp = _round(wp * _round(xp * inv, DT, EMU_BF16), DT, EMU_BF16)
        rot = tl.where(i < HALF, -xp, xp)
        c = tl.load(cos_ptr + b * stride_cb + i).to(tl.float32)
        s = tl.load(sin_ptr + b * stride_sb + i).to(tl.float32)
        y = _round(_round(x * c, DT, EMU_BF16) + _round(rot * s, DT, EMU_BF16), DT, EMU_BF16)
        if j < HQ:
            tl.store(q_ptr + (b * HQ + j) * D + i, y.to(DT))
        else:
            h = j - HQ
            col = tl.load(col_ptr)
            tl.store(kc_ptr + b * stride_kb + h * stride_kh + col * stride_kn + i, y.to(kc_ptr.dtype.element_ty))
            v = tl.load(row + HKV * D + i)  # the value: H_kv heads after the key
            tl.store(vc_ptr + b * stride_vb + h * stride_vh + col * stride_vn + i, v)

    return rope_kernel, _interpreting()


def _check_int(name: str, v, least: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < least:
        raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    return v


def rope_write_kernel(
    qkv: torch.Tensor,
    qn_w: torch.Tensor | None,
    kn_w: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    col: torch.Tensor,
    eps: float,
    hq: int,
    hkv: int,
    d: int,
) -> torch.Tensor:
    """:func:`kvagents.engine.static_cache.rope_write` in one kernel: split ``qkv`` into heads, q/k RMSNorms (when the
    weights are given), RoPE, write the keys and values into column ``col`` of the cache; returns the rotated
    queries. Rounds op for op as the eager function (see the module docstring).

    Args:
        qkv: ``[B, (hq + 2 hkv) d]`` (queries, keys, values), bfloat16 / float16 / float32, unit stride along the
            last axis (rows may be strided: a column slice of a wider tensor).
        qn_w, kn_w: ``[d]`` q/k RMSNorm weights in qkv's dtype (Qwen3), or both ``None`` (no q/k norm).
        cos, sin: ``[B, 1, d]`` in qkv's dtype.
        k_cache, v_cache: ``[B, hkv, cap, d]`` in qkv's dtype with unit stride along ``d``, written in place (a
            layer view ``K[i]`` of a ``[L, B, hkv, cap, d]`` cache is written in place); only column ``col``
            changes.
        col: ``[1]`` long, the column to write (``0 <= col < cap``: not checked, that would need a host sync).
        eps: the RMSNorm epsilon.
        hq, hkv: query and kv heads; d: the head size, a power of two.

    Returns: the rotated queries ``[B, hq, d]``, a new contiguous tensor in qkv's dtype.

    Example:
        >>> q = rope_write_kernel(qkv, qn, kn, cos, sin, K[i], V[i], col, 1e-6, 32, 8, 128)  # doctest: +SKIP
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a tensor, got {type(qkv).__name__}")
    hq, hkv, d = _check_int("hq", hq, 1), _check_int("hkv", hkv, 1), _check_int("d", d, 2)
    if d & (d - 1):
        raise ValueError(f"the head size d must be a power of two, got {d}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    width = (hq + 2 * hkv) * d
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(
            f"qkv must be [B, (hq + 2 hkv) d] = [B, {width}] for hq={hq}, hkv={hkv}, d={d}, got shape {list(qkv.shape)}"
        )
    if qkv.dtype not in DTYPES:
        raise ValueError(f"qkv's dtype must be one of {DTYPES}, got {qkv.dtype}")
    bsz = qkv.shape[0]
    if (qn_w is None) != (kn_w is None):
        raise ValueError(
            "qn_w and kn_w must both be given (q/k norms) or both be None, got "
            f"qn_w={'None' if qn_w is None else 'a tensor'} and kn_w={'None' if kn_w is None else 'a tensor'}"
        )
    if qn_w is not None:
        qn_w = _check_tensor("qn_w", qn_w, (d,), qkv, "qkv").contiguous()
        kn_w = _check_tensor("kn_w", kn_w, (d,), qkv, "qkv").contiguous()
    cos = _check_tensor("cos", cos, (bsz, 1, d), qkv, "qkv")
    sin = _check_tensor("sin", sin, (bsz, 1, d), qkv, "qkv")
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4 or tuple(t.shape[:2]) != (bsz, hkv) or t.shape[3] != d or t.shape[2] < 1:
            raise ValueError(f"{name} must be [B={bsz}, hkv={hkv}, cap, d={d}], got shape {list(t.shape)}")
        _check_tensor(name, t, tuple(t.shape), qkv, "qkv")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along d (it is written in place), got strides {t.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {list(k_cache.shape)} and "
                         f"{list(v_cache.shape)}")  # fmt: skip
    col = _check_tensor("col", col, (1,), qkv, "qkv", torch.long)
    _check_device(qkv.device, _interpreting())
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty((bsz, hq, d), dtype=qkv.dtype, device=qkv.device)
    kernel = _kernel()
    if bsz == 0:
        return out
    has_norm = qn_w is not None
    kernel[(bsz, hq + hkv)](
        qkv, qn_w if has_norm else qkv, kn_w if has_norm else qkv, cos, sin, k_cache, v_cache, col, out,
        qkv.stride(0), cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), float(eps),
        HQ=hq, HKV=hkv, D=d, HAS_NORM=has_norm, EMU_BF16=_interpreting(),
        num_warps=1 if d <= 128 else 2, enable_fp_fusion=False,
    )  # fmt: skip
    return out
