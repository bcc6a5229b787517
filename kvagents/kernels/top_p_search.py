"""The nucleus (top-p) mask by a ``ways``-ary search over the probabilities' bit patterns: Triton kernels.

:func:`kvagents.engine.fast_sampling.top_p_keep` keeps token ``v`` of a row iff ``bits_v >= hi``, where ``bits`` are the
float32 bit patterns of ``probs`` read as int32 (non-negative floats order like their bits) and ``hi`` ends a
search: the bracket ``(lo, hi]`` starts at ``lo = 0``, ``hi = max(bits)``, and each pass tests the ``ways - 1``
thresholds ``mid_j = lo + ((hi - lo) * j) // ways`` (``j = 1 .. ways - 1``) by the mass above each, ``mass_j =
sum(probs[bits > mid_j])``: with ``ok_j = mass_j <= top_p``, ``lo = max_j (ok_j ? lo : mid_j)`` and ``hi = min_j
(ok_j ? mid_j : hi)``. Passes repeat while ``span > 1``, ``span = ceil(span / ways)`` from ``2**31`` (11 passes for 8
ways). There each pass is a torch reduction; :func:`top_p_keep_kernel` runs the same search (the same brackets, pass
by pass) as a fixed sequence of Triton launches, all on the device, no host synchronisation (CUDA-graph capturable):

- the row is cut into ``C = ceil(V / block)`` chunks; every launch has grid ``(B, C)``;
- launch 0, ``max_kernel``: each program writes its chunk's largest bits, ``[B, C]`` int32 scratch;
- launches 1 .. P, ``pass_kernel`` (``P`` passes): each program first settles its row's bracket: the first pass
  reduces the ``C`` partial maxima (``lo = 0, hi = max``); a later one reads the previous pass's bracket
  (``[B, 2]`` int64) and partial masses (``[B, C, ways - 1]`` float32), sums the masses over ``C`` in a fixed order
  (every program of a row runs the same code on the same data: the same bracket, bit for bit) and narrows the
  bracket as above. Then it writes the ``ways - 1`` masses of its own chunk above the new thresholds, and the
  chunk-0 program writes the new bracket. The masses and brackets ping-pong between two scratch buffers (a launch
  reads one and writes the other);
- launch P + 1, ``pass_kernel`` with ``FINAL``: each program settles the last bracket the same way and writes its
  chunk of the bool mask ``bits >= hi``.

``P + 2`` launches (13 for 8 ways), each reading the row once (at B = 8, V = 151936 the rows, 4.9 MB, fit in an
H100's 50 MB L2 between passes).

Exactness: the masses are float32 sums in another order than the torch passes (a tree within a chunk, then over
the chunks), so where a mass lies within rounding of ``top_p`` (a knife edge) the decision, and the kept set, may
differ by the tokens at that threshold. On random data it equals both the torch search and the sort-and-cumsum
rule of :func:`kvagents.engine.sampling.process_logits` (tests/test_top_p_search.py); on tied probabilities the search keeps
all of the tied tokens or none (the sort keeps some of them). ``top_p = 1`` is such a knife edge
(the total mass against 1): it may drop the least probable tokens. Zeros are never kept unless the whole row is
zero (then everything is). ``probs`` must be non-negative (not checked: that would need a host sync); a NaN bit
pattern sorts above every number, as in the torch search.

Chunks (:func:`plan`): ``block`` (a power of two) defaults to about :data:`TARGET_PROGRAMS` programs per launch,
between :data:`MIN_BLOCK` and :data:`MAX_BLOCK` elements (not tuned on a GPU yet). On CPU tensors the kernels run
only under Triton's interpreter, for tests (``TRITON_INTERPRET=1`` before Triton is first imported; see
:mod:`kvagents.kernels.fused_gemv`).

Example:
    >>> import torch
    >>> from kvagents.kernels.top_p_search import top_p_keep_kernel
    >>> p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], device="cuda")  # doctest: +SKIP
    >>> top_p_keep_kernel(p, 0.7).tolist()  # doctest: +SKIP
    [[True, True, False, False]]

Against FlashInfer (``bench/flashinfer_bench.py --only sampling --rows 32``, H100, 2026-12-07, flashinfer 0.5.3,
32 x 151936, T=0.7, p=0.9): this search alone 114.8 µs vs FlashInfer's ``top_p_renorm_probs`` 167.9 µs; the whole
draw in the fast path's compiled sampling head (temperature, softmax, this search, hash noise, argmax) 295.1 µs vs
FlashInfer's softmax + ``top_p_sampling_from_probs`` 153.2 µs (eager). FlashInfer's draw is kept out because it
takes one ``(seed, offset)`` per call from a host ``torch.Generator``: no per-row seeds (a scheduled request's
samples must equal its alone run), no CUDA-graph capture ("Cannot construct a new CUDAGeneratorImpl during CUDA
graph capture"), and no replay of a rolled-back window; the 0.14 ms it would save is 1.3 % of an 8B step at 32 rows.
"""

from __future__ import annotations

import functools
import numbers

import torch

# absolute: the kernel tests and benches also load this module from its file, outside the package
from kvagents.kernels.triton_support import check_device as _check_device
from kvagents.kernels.triton_support import interpreting as _interpreting
from kvagents.kernels.triton_support import kernel_scope as _kernel_scope
from kvagents.kernels.triton_support import next_pow2 as _next_pow2
from kvagents.kernels.triton_support import runnable as _runnable
from kvagents.kernels.triton_support import same_mode as _same_mode

#: programs per launch aimed at by the default block: twice the SMs of an H100
TARGET_PROGRAMS = 2 * 132
#: the default block's bounds (elements of a row per program)
MIN_BLOCK, MAX_BLOCK = 1024, 8192
#: the least ``block`` accepted
SMALLEST_BLOCK = 16
#: the most chunks per row (CUDA's limit on the grid's second axis)
MAX_CHUNKS = 65535
#: the chunks' partial masses (maxima) are summed over ``C`` in tiles of at most this many chunks, tile by tile
REDUCE_TILE = 64


def available() -> bool:
    """True when :func:`top_p_keep_kernel` can run here: Triton imports and there is a CUDA device (or Triton's
    interpreter is on, ``TRITON_INTERPRET=1``, for CPU tensors).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _runnable()


def n_passes(ways: int) -> int:
    """The search's passes for ``ways`` (as :func:`kvagents.engine.fast_sampling.top_p_keep`): ``span = ceil(span / ways)``
    from ``2**31`` until it is 1.

    Example:
        >>> [n_passes(w) for w in (2, 3, 8, 16)]
        [31, 20, 11, 8]
    """
    span, n = 1 << 31, 0
    while span > 1:
        span = -(-span // ways)
        n += 1
    return n


def default_block(b: int, v: int) -> int:
    """The default chunk: ``B * V / TARGET_PROGRAMS`` elements rounded up to a power of two, clamped to
    ``[MIN_BLOCK, MAX_BLOCK]`` and to the row (not less than :data:`SMALLEST_BLOCK`).

    Example:
        >>> default_block(1, 151936), default_block(8, 151936), default_block(32, 151936), default_block(2, 300)
        (1024, 8192, 8192, 512)
    """
    block = _next_pow2(-(-max(1, b) * v // TARGET_PROGRAMS))
    block = min(max(block, MIN_BLOCK), MAX_BLOCK)
    return max(SMALLEST_BLOCK, min(block, _next_pow2(v)))


def plan(b: int, v: int, ways: int = 8, block: int | None = None) -> tuple[int, int, int]:
    """``(block, chunks, passes)`` for ``b`` rows of ``v`` probabilities: ``chunks = ceil(v / block)`` programs per
    row, ``passes + 2`` launches in all.

    Example:
        >>> plan(8, 151936), plan(1, 3000, 2, 256)
        ((8192, 19, 11), (256, 12, 31))
    """
    block = default_block(b, v) if block is None else block
    return block, -(-v // block), n_passes(ways)


def _kernels():
    return _same_mode(_build(), "the top-p search kernels were")


@functools.lru_cache(maxsize=1)
def _build():
    """Define the kernels on first use (so ``TRITON_INTERPRET`` is read then, and the module imports without
    Triton); returns ``((max_kernel, pass_kernel), interpreted)``."""
    triton, tl = _kernel_scope("kvagents.kernels.top_p_search", globals())

    @triton.jit
    def max_kernel(bits_ptr, pmax_ptr, V, C, stride_b, BLOCK: tl.constexpr):
        """The largest bit pattern of chunk ``c`` of row ``b``."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        bits = tl.load(bits_ptr + b.to(tl.int64) * stride_b + offs, mask=offs < V, other=-2147483648)
        tl.store(pmax_ptr + b.to(tl.int64) * C + c, tl.max(bits, axis=0))

    @triton.jit
    def pass_kernel(
        bits_ptr, pmax_ptr, mass_in_ptr, mass_out_ptr, br_in_ptr, br_out_ptr, out_ptr,
        top_p, V, C, stride_b,
        WAYS: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr,
        FIRST: tl.constexpr, FINAL: tl.constexpr,
    ):  # fmt: skip
        """One pass for chunk ``c`` of row ``b``: the row's bracket from the previous pass (or the row maximum),
        then this chunk's masses above the new thresholds (or, ``FINAL``, its part of the mask)."""
        W1: tl.constexpr = WAYS - 1
        b = tl.program_id(0)
        c = tl.program_id(1)
        row = b.to(tl.int64) * C  # the row's first chunk in the [B, C, ...] scratch
        if FIRST:  # lo = 0, hi = the row's largest bits: the C partial maxima, reduced in a fixed order
            m = tl.full([CB], -2147483648, tl.int32)
            for c0 in range(0, C, CB):
                cc = c0 + tl.arange(0, CB)
                m = tl.maximum(m, tl.load(pmax_ptr + row + cc, mask=cc < C, other=-2147483648))
            hi = tl.max(m, axis=0).to(tl.int64)
            lo = hi * 0
        else:  # the previous bracket narrowed by the previous masses, summed over the chunks in a fixed order
            lo0 = tl.load(br_in_ptr + b * 2)
            hi0 = tl.load(br_in_ptr + b * 2 + 1)
            jj = tl.arange(0, WP)
            acc = tl.zeros([CB, WP], tl.float32)
            for c0 in range(0, C, CB):
                cc = c0 + tl.arange(0, CB)
                ptrs = mass_in_ptr + (row + cc)[:, None] * W1 + jj[None, :]
                acc += tl.load(ptrs, mask=(cc < C)[:, None] & (jj < W1)[None, :], other=0.0)
            mass = tl.sum(acc, axis=0)  # [WP]
            mids = lo0 + ((hi0 - lo0) * (jj + 1).to(tl.int64)) // WAYS
            ok = mass <= top_p
            valid = jj < W1
            lo = tl.max(tl.where(valid & ~ok, mids, lo0), axis=0)
            hi = tl.min(tl.where(valid & ok, mids, hi0), axis=0)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        inside = offs < V
        bits = tl.load(bits_ptr + b.to(tl.int64) * stride_b + offs, mask=inside, other=-2147483648)
        if FINAL:
            tl.store(out_ptr + b.to(tl.int64) * V + offs, (bits.to(tl.int64) >= hi).to(tl.uint8), mask=inside)
        else:
            tl.store(br_out_ptr + b * 2, lo, mask=c == 0)
            tl.store(br_out_ptr + b * 2 + 1, hi, mask=c == 0)
            p = bits.to(tl.float32, bitcast=True)
            base = mass_out_ptr + (row + c) * W1
            for j in tl.static_range(1, WAYS):
                mid = (lo + ((hi - lo) * j) // WAYS).to(tl.int32)  # in [0, 2**31): bits compare as int32
                tl.store(base + (j - 1), tl.sum(tl.where(bits > mid, p, 0.0), axis=0))

    return (max_kernel, pass_kernel), _interpreting()


def _check(probs, top_p, ways, block) -> None:
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a tensor, got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"probs must be [B, V], got shape {list(probs.shape)}")
    if probs.dtype != torch.float32:
        raise ValueError(f"probs must be float32, got {probs.dtype}")
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not isinstance(ways, numbers.Integral) or isinstance(ways, bool) or not 2 <= ways <= 16:
        raise ValueError(f"ways must be an int in 2..16, got {ways!r}")
    if block is not None:
        if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < SMALLEST_BLOCK:
            raise ValueError(f"block must be a power of two >= {SMALLEST_BLOCK}, got {block!r}")
        if block & (block - 1):
            raise ValueError(f"block must be a power of two >= {SMALLEST_BLOCK}, got {block}")


def top_p_keep_kernel(probs: torch.Tensor, top_p: float, ways: int = 8, *, block: int | None = None) -> torch.Tensor:
    """The nucleus ``[B, V]`` (bool) of :func:`kvagents.engine.fast_sampling.top_p_keep`: token ``v`` kept iff the mass of
    the tokens more probable than it is at most ``top_p``; the same ``ways``-ary search, as ``passes + 2`` Triton
    launches with no host synchronisation (see the module docstring).

    Args:
        probs: ``[B, V]`` float32, non-negative (a softmax); any row stride (a column stride other than 1 is
            copied).
        top_p: in ``(0, 1]``; compared with the float32 masses as float32.
        ways: thresholds per pass + 1, in ``2..16`` (8: 11 passes; 16: 8).
        block: elements of a row per program, a power of two >= 16 (default :func:`default_block`).

    Returns: ``[B, V]`` bool on probs' device.

    Example:
        >>> keep = top_p_keep_kernel(torch.softmax(logits, -1), 0.95)  # doctest: +SKIP
    """
    _check(probs, top_p, ways, block)
    bsz, v = probs.shape
    block, chunks, passes = plan(bsz, v, int(ways), None if block is None else int(block))
    if chunks > MAX_CHUNKS:
        raise ValueError(f"block={block} cuts rows of V={v} into {chunks} chunks, more than {MAX_CHUNKS}")
    _check_device(probs.device, _interpreting())
    out = torch.empty((bsz, v), dtype=torch.bool, device=probs.device)
    if bsz == 0 or v == 0:
        return out
    if probs.stride(1) != 1:
        probs = probs.contiguous()
    bits = probs.view(torch.int32)
    w1 = int(ways) - 1
    pmax = torch.empty((bsz, chunks), dtype=torch.int32, device=probs.device)
    mass = torch.empty((2, bsz, chunks, w1), dtype=torch.float32, device=probs.device)
    brackets = torch.empty((2, bsz, 2), dtype=torch.int64, device=probs.device)
    out8 = out.view(torch.uint8)
    max_kernel, pass_kernel = _kernels()
    warps = 4 if block <= 2048 else 8
    grid = (bsz, chunks)
    stride_b = bits.stride(0)
    max_kernel[grid](bits, pmax, v, chunks, stride_b, BLOCK=block, num_warps=warps)
    cb = min(_next_pow2(chunks), REDUCE_TILE)
    top_p = float(top_p)
    for k in range(passes + 1):  # k = passes: the mask
        src, dst = mass[(k + 1) % 2], mass[k % 2]
        pass_kernel[grid](
            bits, pmax, src, dst, brackets[(k + 1) % 2], brackets[k % 2], out8,
            top_p, v, chunks, stride_b,
            WAYS=int(ways), WP=_next_pow2(w1), BLOCK=block, CB=cb, FIRST=k == 0, FINAL=k == passes,
            num_warps=warps,
        )  # fmt: skip
    return out
