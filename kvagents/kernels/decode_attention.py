"""Decode-time attention over a static KV cache, each row over its own columns: two Triton kernels.

The decode step of :mod:`kvagents.engine.static_cache` attends with

    attend(q, k[:, :, :L], v[:, :, :L], attention_mask(col, start, cols[:L], dtype), scale, hkv)

(SDPA with an additive mask): every row reads all ``L`` columns of its K/V, the left padding before ``start[b]``
and the rows that have finished included. :func:`decode_attention` returns the same ``[B, H_q * d]`` (scores and
softmax in float32, the output rounded once to the dtype) reading only the columns ``start[b] .. col`` of the rows
with ``live[b]``; a finished row reads no K/V at all and gets zeros. It has no host synchronisation and its grid
follows the shapes and ``length`` only, so it can be captured in a CUDA graph.

Method: split-K "flash decoding".

- stage 1, grid ``(B * H_kv, n_splits)``: program ``(b * H_kv + h, s)`` takes the columns ``[s * CHUNK, (s + 1) *
  CHUNK)`` cut to ``[start[b], col]`` and to ``length`` (nothing when the row is not live: the loop has no
  iteration, no K/V is read). It loads the ``G = H_q / H_kv`` query heads of kv head ``h`` as a ``[GP, d]`` tile
  (``GP`` = ``G`` padded to a power of two >= 16, ``tl.dot``'s least; the padding rows are zeros) and walks its
  columns in blocks of ``BLOCK_N``: scores ``q @ k^T`` on tensor cores (exact products, float32 sums; float32 inputs
  use ``input_precision="ieee"``), masked to ``-inf`` outside the range, an online softmax (running max ``m``, sum
  ``l``, float32 accumulator; base-2 exponentials with ``scale * log2(e)`` folded into the scores), and ``p @ v``.
  For bfloat16 / float16 the float32 ``p`` is split as ``p_hi + p_lo`` (each rounded to the dtype) and multiplied as
  two tensor-core products: ``p`` keeps ~16 bits (bf16) / ~22 bits (fp16) instead of the 8 / 11 of FlashAttention's
  single cast, far below the output's one rounding. It writes the partials ``(m, l, acc)``, float32 scratch of
  ``[B * H_kv, n_splits, G]`` (and ``[..., d]``); an empty program writes ``m = -inf, l = 0`` and no ``acc``.
- stage 2, grid ``(B * H_q,)``: one query head's splits combined by log-sum-exp (``M = max m_s``, weights
  ``2^(m_s - M)``; the ``acc`` of empty splits is not read), divided by ``L = sum w_s l_s`` and rounded once to the
  dtype. A dead row, or a live row with no column (``start > col``; the SDPA reference gives NaN there), gets zeros.

Splits (:func:`plan`): ``n_splits = ceil(TARGET_PROGRAMS / (B * H_kv))`` (``TARGET_PROGRAMS`` = 264, twice an
H100's 132 SMs), at most ``ceil(length / MIN_CHUNK)`` (``MIN_CHUNK`` = 128 columns); ``CHUNK = ceil(length /
n_splits)`` rounded up to a multiple of ``BLOCK_N``, and ``n_splits = ceil(length / CHUNK)``. The splits cut the
columns ``[0, length)``, not each row's range: a row whose range is short leaves most of its programs empty (they
exit at once). ``config`` overrides ``BLOCK_N``, ``CHUNK``, ``num_warps``, ``num_stages`` (see
:func:`resolve_config`; not tuned on a GPU yet).

Preconditions that cannot be checked without a host sync: ``0 <= start[b] <= col < length`` for the live rows
(columns outside ``[0, length)`` are never read whatever the values). On CPU tensors the kernels run only under
Triton's interpreter, for tests (``TRITON_INTERPRET=1`` before Triton is first imported; see
:mod:`kvagents.kernels.fused_gemv`); there bfloat16 rounding is emulated (the interpreter truncates float32 -> bfloat16)
and the products run in float32 on the same (exactly representable) operands.

Why a kernel of kvagents' own and not FlashInfer's (``bench/flashinfer_bench.py``, H100, 2026-12-07, 32 rows of
the Qwen3-8B shape): FlashInfer 0.5.3's tensor-core batch decode over the same memory took 1.04x / 0.95x / 0.89x
this kernel's time at 256 / 1024 / 4096 columns (its CUDA-core decode 3.4-3.7x), but its paged layout has no
per-row first column, so it cannot serve the left-padded rows (``start[b] > 0``) that the static cache and the
scheduler's slots use; at most 11 % at long contexts is not worth a paged cache of a second layout.

Example:
    >>> import torch
    >>> from kvagents.kernels.decode_attention import decode_attention
    >>> B, Hq, Hkv, cap, d = 2, 8, 2, 64, 128
    >>> K = torch.randn(4, B, Hkv, cap, d, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> V = torch.randn_like(K)  # doctest: +SKIP
    >>> q = torch.randn(B, Hq, d, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> start = torch.tensor([0, 20], device="cuda")  # row 1 is left-padded by 20 columns  # doctest: +SKIP
    >>> col = torch.tensor([40], device="cuda")  # doctest: +SKIP
    >>> live = torch.tensor([True, False], device="cuda")  # row 1 has finished: zeros, no K/V read  # doctest: +SKIP
    >>> a = decode_attention(q, K[3], V[3], start, col, live, d**-0.5, length=48)  # [2, 1024]  # doctest: +SKIP
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
from kvagents.kernels.triton_support import next_pow2 as _next_pow2
from kvagents.kernels.triton_support import runnable as _runnable
from kvagents.kernels.triton_support import same_mode as _same_mode

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: stage-1 programs aimed at: twice the SMs of an H100
TARGET_PROGRAMS = 2 * 132
#: the least number of columns a split takes by default (a program's chunk is not made smaller to add splits)
MIN_CHUNK = 128
_KEYS = ("BLOCK_N", "CHUNK", "num_warps", "num_stages")
_LOG2E = 1.4426950408889634


def available() -> bool:
    """True when :func:`decode_attention` can run here: Triton imports and there is a CUDA device (or Triton's
    interpreter is on, ``TRITON_INTERPRET=1``, for CPU tensors).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _runnable()


def default_config(d: int) -> dict[str, int]:
    """The launch configuration before :func:`resolve_config` fits it to the shapes (not tuned on a GPU yet): blocks
    of ``BLOCK_N`` columns (a ``[64, 128]`` bfloat16 K tile is 16 KiB), ``CHUNK`` chosen by :func:`plan`.

    Example:
        >>> default_config(128)
        {'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2}
    """
    return {"BLOCK_N": 64 if d <= 128 else 32, "num_warps": 4, "num_stages": 2}


def resolve_config(b: int, hkv: int, length: int, d: int = 128, config: dict | None = None) -> dict[str, int]:
    """The configuration for ``b`` rows, ``hkv`` kv heads, ``length`` columns and head size ``d``:
    :func:`default_config` updated by ``config``, ``BLOCK_N`` clamped to the columns (unless given), and ``CHUNK``
    from :func:`plan` (unless given; a given ``CHUNK`` must be a multiple of ``BLOCK_N``).

    Example:
        >>> resolve_config(1, 8, 4096)
        {'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2, 'CHUNK': 128}
        >>> resolve_config(32, 8, 4096)
        {'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2, 'CHUNK': 2048}
        >>> resolve_config(2, 2, 40, 32, {"CHUNK": 16})
        {'BLOCK_N': 16, 'num_warps': 4, 'num_stages': 2, 'CHUNK': 16}
    """
    config = dict(config or {})
    bad = sorted(set(config) - set(_KEYS))
    if bad:
        raise ValueError(f"config has unknown keys {bad}; expected some of {list(_KEYS)}")
    for key, val in config.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"config {key} must be a positive int, got {val!r}")
    for key in ("BLOCK_N", "num_warps"):
        val = config.get(key)
        if val is not None and val & (val - 1):
            raise ValueError(f"config {key} must be a power of two, got {val}")
    if config.get("BLOCK_N", 16) < 16:
        raise ValueError(f"config BLOCK_N must be at least 16 (tl.dot's least), got {config['BLOCK_N']}")
    cfg = default_config(d)
    if "BLOCK_N" in config:
        cfg["BLOCK_N"] = config["BLOCK_N"]
    else:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, _next_pow2(length)))
        if "CHUNK" in config:  # the largest power of two that divides CHUNK, when it is smaller
            cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], config["CHUNK"] & -config["CHUNK"]))
    for key in ("num_warps", "num_stages"):
        cfg[key] = config.get(key, cfg[key])
    if "CHUNK" in config:
        if config["CHUNK"] % cfg["BLOCK_N"]:
            raise ValueError(f"config CHUNK must be a multiple of BLOCK_N={cfg['BLOCK_N']}, got {config['CHUNK']}")
        cfg["CHUNK"] = config["CHUNK"]
    else:
        cfg["CHUNK"] = plan(b, hkv, length, cfg["BLOCK_N"])[0]
    return cfg


def plan(b: int, hkv: int, length: int, block_n: int = 64) -> tuple[int, int]:
    """``(CHUNK, n_splits)``: the columns ``[0, length)`` cut into ``n_splits`` chunks of ``CHUNK`` (a multiple of
    ``block_n``; the last one may be partial) so that ``b * hkv * n_splits`` is about :data:`TARGET_PROGRAMS`,
    with chunks of at least :data:`MIN_CHUNK` columns (or one chunk of the whole, when shorter).

    Example:
        >>> plan(1, 8, 4096), plan(8, 8, 1024), plan(1, 8, 384), plan(64, 8, 4096)
        ((128, 32), (256, 4), (128, 3), (4096, 1))
    """
    splits = -(-TARGET_PROGRAMS // max(1, b * hkv))
    splits = max(1, min(splits, -(-length // MIN_CHUNK)))
    chunk = -(-length // splits)
    chunk = -(-chunk // block_n) * block_n
    return chunk, -(-length // chunk)


# the rounding jit helper the kernels call: set by _build() (triton_support.kernel_scope), where Triton looks for it
_round = None


def _kernels():
    return _same_mode(_build(), "the decode attention kernels were")


@functools.lru_cache(maxsize=1)
def _build():
    """Define the kernels on first use (so ``TRITON_INTERPRET`` is read then, and the module imports without
    Triton); returns ``((split_kernel, merge_kernel), interpreted)``."""
    triton, tl = _kernel_scope("kvagents.kernels.decode_attention", globals())  # publishes _round

    @triton.jit
    def split_kernel(
        q_ptr, k_ptr, v_ptr, start_ptr, col_ptr, live_ptr, m_ptr, l_ptr, acc_ptr,
        length, scale_log2, H_KV, G, S, CHUNK,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        D: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
        EMU: tl.constexpr,
    ):  # fmt: skip
        """Stage 1: the partial softmax ``(m, l, acc)`` of kv head ``h``'s ``G`` query heads over one chunk."""
        DT: tl.constexpr = q_ptr.dtype.element_ty
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // H_KV
        h = bh % H_KV
        live = tl.load(live_ptr + b) != 0
        c0 = s * CHUNK
        lo = tl.maximum(tl.maximum(tl.load(start_ptr + b), c0), 0).to(tl.int32)
        hi = tl.minimum(tl.minimum(tl.load(col_ptr) + 1, c0 + CHUNK), length).to(tl.int32)
        hi = tl.where(live, hi, lo)  # a dead row: no column, no load
        g = tl.arange(0, GP)
        dd = tl.arange(0, D)
        gmask = g < G
        qmask = g < tl.where(live, G, 0)  # a dead row loads no query either
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + dd[None, :],
                    mask=qmask[:, None], other=0.0)  # fmt: skip
        if EMU:
            q = q.to(tl.float32)
        k_row = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_row = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < hi
            kt = tl.load(k_row + n.to(tl.int64)[None, :] * stride_kn + dd[:, None], mask=nmask[None, :], other=0.0)
            if EMU or DT == tl.float32:  # the interpreter's dot mishandles bfloat16: float32 on the same values
                sc = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            else:
                sc = tl.dot(q, kt)  # exact products, float32 sums
            sc = tl.where(nmask[None, :], sc * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))  # finite: the block has a column in range
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_row + n.to(tl.int64)[:, None] * stride_vn + dd[None, :], mask=nmask[:, None], other=0.0)
            if DT == tl.float32:
                pv = tl.dot(p, vt, input_precision="ieee")
            elif EMU:  # the GPU's two products below, on float32 copies of the same values
                p_hi = _round(p, DT, EMU)
                p_lo = _round(p - p_hi, DT, EMU)
                vf = vt.to(tl.float32)
                pv = tl.dot(p_hi, vf, input_precision="ieee") + tl.dot(p_lo, vf, input_precision="ieee")
            else:  # p = p_hi + p_lo, each in the dtype: ~2x its bits of p on tensor cores
                p_hi = p.to(DT)
                p_lo = (p - p_hi.to(tl.float32)).to(DT)
                pv = tl.dot(p_hi, vt) + tl.dot(p_lo, vt)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        part = (bh.to(tl.int64) * S + s) * G + g
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)
        tl.store(acc_ptr + part[:, None] * D + dd[None, :], acc, mask=(g < tl.where(hi > lo, G, 0))[:, None])

    @triton.jit
    def merge_kernel(
        m_ptr, l_ptr, acc_ptr, live_ptr, out_ptr, H_Q, G, S,
        D: tl.constexpr, SP: tl.constexpr, SBLOCK: tl.constexpr, EMU: tl.constexpr,
    ):  # fmt: skip
        """Stage 2: query head ``pid % H_Q`` of row ``pid // H_Q``: its splits combined by log-sum-exp."""
        DT: tl.constexpr = out_ptr.dtype.element_ty
        pid = tl.program_id(0)
        b = pid // H_Q
        bh = pid // G  # == b * H_kv + (pid % H_Q) // G
        g = pid % G
        live = tl.load(live_ptr + b) != 0
        base = bh.to(tl.int64) * S
        sp = tl.arange(0, SP)
        n_s = tl.where(live, S, 0)  # a dead row reads no partials
        smask = sp < n_s
        ms = tl.load(m_ptr + (base + sp) * G + g, mask=smask, other=float("-inf"))
        ls = tl.load(l_ptr + (base + sp) * G + g, mask=smask, other=0.0)
        big = tl.max(ms, axis=0)
        big = tl.where(big > float("-inf"), big, 0.0)  # no split with a column: every weight below is 0
        w = tl.where(ms > float("-inf"), tl.exp2(ms - big), 0.0)
        total = tl.sum(w * ls, axis=0)
        dd = tl.arange(0, D)
        acc = tl.zeros([D], tl.float32)
        for s0 in range(0, S, SBLOCK):
            si = s0 + tl.arange(0, SBLOCK)
            mi = tl.load(m_ptr + (base + si) * G + g, mask=si < n_s, other=float("-inf"))
            full = mi > float("-inf")  # an empty split wrote no acc
            wi = tl.where(full, tl.exp2(mi - big), 0.0)
            a = tl.load(acc_ptr + ((base + si) * G + g)[:, None] * D + dd[None, :], mask=full[:, None], other=0.0)
            acc += tl.sum(wi[:, None] * a, axis=0)
        out = acc / tl.where(total > 0, total, 1.0)  # no column (a dead row too): acc is 0
        out = _round(out, DT, EMU)
        tl.store(out_ptr + pid.to(tl.int64) * D + dd, out.to(DT))

    return (split_kernel, merge_kernel), _interpreting()


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    col: torch.Tensor,
    live: torch.Tensor,
    scale: float,
    length: int,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention of one query per row over the columns ``start[b] .. col`` of a static KV cache; rows with
    ``live[b] == False`` read no K/V and give zeros.

    Equal (up to float32 summation order) to ``attend(q, k[:, :, :length], v[:, :, :length], attention_mask(col,
    start, cols[:length], q.dtype), scale, H_kv)`` of :mod:`kvagents.engine.static_cache` on the live rows.

    Args:
        q: ``[B, H_q, d]`` queries, bfloat16 / float16 / float32; ``d`` a power of two >= 16.
        k, v: ``[B, H_kv, cap, d]`` in q's dtype, unit stride along ``d`` (other strides as given: a layer view
            ``K[i]`` of a ``[L, B, H_kv, cap, d]`` cache is read in place); ``H_q`` a multiple of ``H_kv``.
        start: ``[B]`` long, the first column of each row (left padding before it).
        col: ``[1]`` long, the newest column (the same for every row), ``< length``.
        live: ``[B]`` bool.
        scale: the softmax scale (``d ** -0.5``).
        length: columns ``>= length`` are never read (``1 <= length <= cap``); sets the grid with the shapes.
        config: ``BLOCK_N``, ``CHUNK``, ``num_warps``, ``num_stages`` overrides (see :func:`resolve_config`).

    Returns: ``[B, H_q * d]`` in q's dtype.

    Example:
        >>> a = decode_attention(q, K[i], V[i], start, col, live, d**-0.5, Lb)  # doctest: +SKIP
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H_q, d], got shape {list(q.shape)}")
    if q.dtype not in DTYPES:
        raise ValueError(f"q's dtype must be one of {DTYPES}, got {q.dtype}")
    bsz, hq, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"the head size d must be a power of two >= 16, got {d}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != bsz or t.shape[3] != d:
            raise ValueError(f"{name} must be [B={bsz}, H_kv, cap, d={d}], got shape {list(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along d, got strides {t.stride()}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    hkv, cap = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"H_q={hq} must be a multiple of H_kv={hkv}")
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= cap:
        raise ValueError(f"length must be an int in 1..cap={cap}, got {length!r}")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    start = _check_tensor("start", start, (bsz,), q, "q", torch.long).contiguous()
    col = _check_tensor("col", col, (1,), q, "q", torch.long).contiguous()
    live = _check_tensor("live", live, (bsz,), q, "q", torch.bool).contiguous()
    cfg = resolve_config(bsz, hkv, length, d, config)
    _check_device(q.device, _interpreting())
    if q.stride(-1) != 1:
        q = q.contiguous()
    g = hq // hkv
    out = torch.empty((bsz, hq * d), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    splits = -(-length // cfg["CHUNK"])
    m = torch.empty((bsz * hkv, splits, g), dtype=torch.float32, device=q.device)
    l_ = torch.empty((bsz * hkv, splits, g), dtype=torch.float32, device=q.device)
    acc = torch.empty((bsz * hkv, splits, g, d), dtype=torch.float32, device=q.device)
    live8 = live.view(torch.uint8)
    split_kernel, merge_kernel = _kernels()
    emu = _interpreting()
    split_kernel[(bsz * hkv, splits)](
        q, k, v, start, col, live8, m, l_, acc,
        length, float(scale) * _LOG2E, hkv, g, splits, cfg["CHUNK"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=d, GP=max(16, _next_pow2(g)), BLOCK_N=cfg["BLOCK_N"], NUM_STAGES=cfg["num_stages"], EMU=emu,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    sp = _next_pow2(splits)
    merge_kernel[(bsz * hq,)](
        m, l_, acc, live8, out, hq, g, splits,
        D=d, SP=sp, SBLOCK=min(sp, 16), EMU=emu, num_warps=4 if d >= 128 else 2,
    )  # fmt: skip
    return out
