"""Exact ``torch.topk(x, k, dim=-1).values`` for a wide last dimension and a small ``k``: two Triton kernels.

``torch.topk`` (radix select) costs 61 / 72 / 105 µs at 1 / 8 / 32 rows of ``V = 151936`` (``k = 20``, H100) in
the decode step's probability scores. :func:`topk_values` returns the same values (sorted descending, the same
multiset: ties, ``-inf``, ``inf`` and NaN included), with no host synchronisation and fixed-size scratch, so it
can be captured in a CUDA graph; it is the custom op ``torch.ops.kvagents.topk_values`` (opaque to Dynamo, an
extern kernel for Inductor).

Design. Every float is first mapped to an ``int32`` *key* whose integer order is the float order (flip the 31 low
bits of negatives; every NaN becomes ``INT32_MAX``, above ``inf``, as ``torch.topk`` puts NaN first; the padding
past ``V`` is ``INT32_MIN``, below ``-inf``): every comparison below is an exact integer one, and the keys map
back to the original bits. A row is cut into *groups* of ``GROUP`` (``W``) elements. Let ``T`` be the ``k``-th
largest of the row's group maxima (counted with repeats). Then:

1. At least ``k`` elements are ``>= T`` (those ``k`` group maxima), so the row's ``k``-th largest value is ``>= T``.
2. Every element ``> T`` lies in a group whose maximum is ``> T``, and there are at most ``k - 1`` such groups.

So the row's top-k is the top-k of (the elements ``> T`` of those ``<= k - 1`` groups, ``<= (k - 1) W`` values)
together with ``k`` copies of ``T`` (which fill the slots when fewer than ``k`` elements are ``> T``: ties at the
threshold, rows of ``-inf``, rows with fewer than ``k`` finite values). No size depends on the data, and there
is no fallback path for adversarial rows (all ties, all ``-inf``, the whole top-k in one group):

- stage 1, grid ``(B, C)``, ``C = ceil(V / BLOCK)``: a program loads its chunk of ``BLOCK`` elements as a
  ``[W, G]`` tile (``G = BLOCK / W``; group ``g`` is the elements ``g, g + G, ..., g + (W - 1) G`` of the chunk, so
  the loads are contiguous 16-byte vectors and each thread takes the maxima of its own columns, with no shuffles
  and no replicated maxima), and extracts the top ``k`` of its ``G`` group maxima by ``k`` rounds of ``m = max(p);
  p = where(p == m, MIN, p)`` over ``int64`` packs ``key << 32 | group index`` (unique, so a round removes exactly
  one group: one reduction per round, ties kept). It writes these ``k`` packs to an ``int64 [B, C * k]`` scratch.
  A group whose maximum is ``> T`` is among its chunk's top ``k`` (else ``k`` groups of the row would beat it), so
  the scratch holds every group that matters, and ``T`` is the ``k``-th largest pack key of the row's scratch.
- stage 2, one program per row: ``k`` rounds over the row's ``C * k`` packs (padded to a power of two) give the
  row's top ``k`` group maxima in order: ``T`` is the last one's key, the groups before it with a key ``> T`` are
  gathered (a ``[next_pow2(k), W]`` gather, from L2; all other slots and every element ``<= T`` become ``T``), and
  ``k`` more rounds over these ``next_pow2(k) * W`` keys packed with their slot give the answer.

Cost (reasoning and compiler output; not timed on a GPU yet). Extraction by rounds costs one block reduction per
round (in-thread, warp shuffles, then shared memory across warps). Doing the rounds over every element (the
plain two-stage design: per-chunk top-k of the elements, then of the candidates) is ~4-5 instructions per element
per round: at ``B = 32``, ``k = 20`` that is ~440 M thread instructions, ~30 µs of an H100's integer
compare/select throughput, twice that at ``B = 64``. Here the rounds run over the group maxima, ``W`` = 16 times
fewer: with the default configuration the sm_90 code of stage 1's round is ~50 instructions per thread (4 packs a
thread, 5 shuffles, 2 barriers), against ~64 loads-and-max instructions per thread for the chunk itself, so stage
1 should be bound by reading the rows (0.6 MB a row: ~6.5 µs at 32 rows from HBM) plus ``k`` reduction latencies
per program (~2 µs, overlapped across programs). Stage 2 is latency bound (``2k`` rounds, over ``C * k`` = 760 ->
1024 packs and then 512 keys, each round a few hundred cycles: ~5 µs) and does not grow with ``B`` while rows <=
SMs. ``BLOCK`` trades stage 1's parallelism (``B * C`` programs) against stage 2's first loop (``C * k`` packs);
``GROUP`` trades stage 1's rounds (``BLOCK / GROUP`` packs) against stage 2's gather (``next_pow2(k) * GROUP``).
:func:`default_config` is a starting point for tuning on the GPU. ``k`` is a constexpr: one compilation per
``k`` (and per ``next_pow2(C * k)``).

Fallbacks (:func:`topk_values` returns ``torch.topk(x, k, dim=-1).values`` instead of launching): Triton missing,
a CPU tensor without Triton's interpreter, ``k > MAX_K`` (64), a dtype other than float32 / bfloat16 / float16
(bfloat16 and float16 are read as they are and returned in their dtype, as ``torch.topk``: no upcast copy),
``V >= 2**31 - 2**20``, or ``x`` requiring a gradient with grad mode on (the op has no backward). ``k < 1`` or
``k > V`` is a ``ValueError`` on every path. The values returned are elements of ``x`` bit for bit, except that
every NaN comes back as the NaN ``0x7FFFFFFF`` (fp32 bits; NaNs come first and as many times as in ``torch.topk``),
and ``+0.0`` sorts above ``-0.0`` (``torch.topk`` treats them as equal and returns either for a tie of the two;
the values compare equal either way).

On CPU tensors the kernels run only under Triton's interpreter, for tests: ``TRITON_INTERPRET=1`` must be in the
environment before Triton is first imported (see :mod:`kvagents.kernels.fused_gemv`).

Example:
    >>> import torch
    >>> from kvagents.kernels.topk_values import topk_values
    >>> x = torch.tensor([[1.0, 5.0, 3.0, 5.0], [0.0, -float("inf"), 2.0, -1.0]])
    >>> topk_values(x, 3)  # the Triton kernels on CUDA, torch.topk's values otherwise
    tensor([[ 5.,  5.,  3.],
            [ 2.,  0., -1.]])
"""

from __future__ import annotations

import functools

import torch

# absolute: the kernel tests and benches also load this module from its file, outside the package
from kvagents.kernels.triton_support import interpreting as _interpreting
from kvagents.kernels.triton_support import next_pow2 as _next_pow2
from kvagents.kernels.triton_support import same_mode as _same_mode
from kvagents.kernels.triton_support import triton_modules as _triton

MAX_K = 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KEYS = ("BLOCK", "GROUP", "num_warps", "merge_warps")
_MAX_V = 2**31 - 2**20  # int32 offsets and group indices in the kernels


def available() -> bool:
    """True when :func:`topk_values` can use its Triton kernels here: Triton imports and there is a CUDA device
    (or Triton's interpreter is on, ``TRITON_INTERPRET=1``, for CPU tensors). When False it still works: it
    returns ``torch.topk``'s values.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _triton() is not None and (torch.cuda.is_available() or _interpreting())


def default_config(v: int, k: int) -> dict[str, int]:
    """The launch configuration for rows of ``v`` elements and ``k`` values (not tuned on a GPU yet): chunks of
    ``BLOCK`` elements in groups of ``GROUP``, ``num_warps`` for stage 1 and ``merge_warps`` for stage 2 (see the
    module docstring for the trade-offs).

    Example:
        >>> default_config(151936, 20)
        {'BLOCK': 4096, 'GROUP': 16, 'num_warps': 2, 'merge_warps': 4}
    """
    return {"BLOCK": 4096, "GROUP": 16, "num_warps": 2, "merge_warps": 4 if k <= 32 else 8}


def resolve_config(v: int, k: int, config: dict | None = None) -> dict[str, int]:
    """:func:`default_config` updated by ``config``; ``BLOCK`` is clamped to the row (padded to a power of two)
    and ``GROUP`` to ``BLOCK``.

    Example:
        >>> resolve_config(1000, 5, {"GROUP": 8})
        {'BLOCK': 1024, 'GROUP': 8, 'num_warps': 2, 'merge_warps': 4}
    """
    cfg = default_config(v, k)
    if config:
        bad = sorted(set(config) - set(_KEYS))
        if bad:
            raise ValueError(f"config has unknown keys {bad}; expected some of {list(_KEYS)}")
        cfg.update(config)
    for key in _KEYS:
        val = cfg[key]
        if not isinstance(val, int) or val < 1 or val & (val - 1):
            raise ValueError(f"config {key} must be a power of two, got {val!r}")
    cfg["BLOCK"] = min(cfg["BLOCK"], max(16, _next_pow2(v)))
    cfg["GROUP"] = min(cfg["GROUP"], cfg["BLOCK"])
    return cfg


def _kernels():
    return _same_mode(_build(), "the top-k kernels were")


@functools.lru_cache(maxsize=1)
def _build():
    """Define the kernels on first use (so ``TRITON_INTERPRET`` is read then, and the module imports without
    Triton); returns ``((chunk_kernel, merge_kernel), interpreted)``."""
    tt = _triton()
    if tt is None:
        raise RuntimeError("kvagents.kernels.topk_values needs triton (pip install triton); available() is False")
    triton, tl = tt

    @triton.jit
    def _key(v):
        """Order-preserving int32 key of float32 ``v``: NaN -> INT32_MAX (above inf, as torch.topk)."""
        b = v.to(tl.int32, bitcast=True)
        k = b ^ ((b >> 31) & 0x7FFFFFFF)
        return tl.where(v != v, 0x7FFFFFFF, k)

    @triton.jit
    def _unkey(k):
        """The float32 of a key (the inverse of ``_key``; INT32_MAX is the NaN 0x7FFFFFFF)."""
        b = k ^ ((k >> 31) & 0x7FFFFFFF)
        return b.to(tl.float32, bitcast=True)

    # Triton resolves the names a kernel calls in its module's globals (not in this closure): publish the helpers
    globals().update(_key=_key, _unkey=_unkey)

    @triton.jit
    def chunk_kernel(x_ptr, scr_ptr, V, stride_xb,
                     K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
        """Stage 1: the top K of one chunk's group maxima, as int64 packs ``key << 32 | group``."""
        G: tl.constexpr = BLOCK // GROUP
        b = tl.program_id(0)
        c = tl.program_id(1)
        C = tl.num_programs(1)
        g = tl.arange(0, G)
        # group g of the chunk: its elements g, g + G, ..., g + (GROUP - 1) G: loads along g are contiguous, and
        # the maxima (over axis 0) are taken inside each thread, leaving G maxima spread over the threads
        offs = c * BLOCK + tl.arange(0, GROUP)[:, None] * G + g[None, :]
        mask = offs < V
        v = tl.load(x_ptr + b.to(tl.int64) * stride_xb + offs, mask=mask, other=0.0).to(tl.float32)
        keys = tl.where(mask, _key(v), -2147483648)  # padding: below every real key (-inf included)
        gmax = tl.max(keys, axis=0)
        neg = tl.full([G], -2147483648, tl.int64) << 32  # INT64_MIN: removed (or padding group 0)
        p = (gmax.to(tl.int64) << 32) | (c * G + g).to(tl.int64)
        j = tl.arange(0, KP)
        top = tl.full([KP], 0, tl.int64)
        for i in range(K):
            m = tl.max(p, axis=0)
            top = tl.where(j == i, m, top)
            p = tl.where(p == m, neg, p)
        tl.store(scr_ptr + (b.to(tl.int64) * C + c) * K + j, top, mask=j < K)

    @triton.jit
    def merge_kernel(x_ptr, scr_ptr, out_ptr, V, NC, stride_xb, stride_ob,
                     K: tl.constexpr, KP: tl.constexpr, NCP: tl.constexpr, BLOCK: tl.constexpr,
                     GROUP: tl.constexpr):  # fmt: skip
        """Stage 2: the row's top K group maxima, the threshold T, the gather of the groups above it, the top K."""
        b = tl.program_id(0)
        n = tl.arange(0, NCP)
        neg = tl.full([NCP], -2147483648, tl.int64) << 32
        p = tl.load(scr_ptr + b.to(tl.int64) * NC + n, mask=n < NC, other=0)
        p = tl.where(n < NC, p, neg)
        j = tl.arange(0, KP)
        top = tl.full([KP], -2147483648, tl.int64) << 32
        for i in range(K):
            m = tl.max(p, axis=0)
            top = tl.where(j == i, m, top)
            p = tl.where(p == m, neg, p)
        tkey = (top >> 32).to(tl.int32)
        t = tl.max(tl.where(j == K - 1, tkey, -2147483648), axis=0)  # the K-th largest group maximum
        sel = tkey > t  # < K groups, the first ones of `top`; INT32_MIN entries (nothing) are never > t
        grp = top & 0xFFFFFFFF
        w = tl.arange(0, GROUP)
        G: tl.constexpr = BLOCK // GROUP
        offs = (grp // G * BLOCK + grp % G)[:, None] + w[None, :] * G
        mask = sel[:, None] & (offs < V)
        v = tl.load(x_ptr + b.to(tl.int64) * stride_xb + offs, mask=mask, other=0.0).to(tl.float32)
        keys = tl.where(mask, _key(v), t)
        keys = tl.maximum(keys, t)  # every slot >= T: the selected maxima and the T slots are >= KP >= K values
        pos = j[:, None] * GROUP + w[None, :]
        q = tl.reshape((keys.to(tl.int64) << 32) | pos.to(tl.int64), [KP * GROUP])
        neg2 = tl.full([KP * GROUP], -2147483648, tl.int64) << 32
        res = tl.full([KP], 0, tl.int32)
        for i in range(K):
            m = tl.max(q, axis=0)
            res = tl.where(j == i, (m >> 32).to(tl.int32), res)
            q = tl.where(q == m, neg2, q)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + j, _unkey(res).to(out_ptr.dtype.element_ty), mask=j < K)

    return (chunk_kernel, merge_kernel), _interpreting()


def _check(x: torch.Tensor, k: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (rows of V values), got shape {list(x.shape)}")
    v = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"k must be an int with 1 <= k <= V, got k={k!r} for V={v} (x of shape {list(x.shape)})")
    return v


def _launch(x: torch.Tensor, k: int, block: int, group: int, num_warps: int, merge_warps: int) -> torch.Tensor:
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, k), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*x.shape[:-1], k)
    chunk_kernel, merge_kernel = _kernels()
    kp = _next_pow2(k)
    c = -(-v // block)
    scratch = torch.empty((rows, c * k), dtype=torch.int64, device=x.device)
    chunk_kernel[(rows, c)](x2, scratch, v, x2.stride(0), K=k, KP=kp, BLOCK=block, GROUP=group, num_warps=num_warps)
    merge_kernel[(rows,)](x2, scratch, out, v, c * k, x2.stride(0), out.stride(0), K=k, KP=kp,
                          NCP=max(16, _next_pow2(c * k)), BLOCK=block, GROUP=group, num_warps=merge_warps)  # fmt: skip
    return out.reshape(*x.shape[:-1], k)


def _op_impl(x: torch.Tensor, k: int, block: int, group: int, num_warps: int, merge_warps: int) -> torch.Tensor:
    if x.dtype in DTYPES and k <= MAX_K and _triton() is not None and (x.is_cuda or _interpreting()):
        return _launch(x, k, block, group, num_warps, merge_warps)
    return torch.topk(x, k, dim=-1).values.contiguous()


def _op_fake(x: torch.Tensor, k: int, block: int, group: int, num_warps: int, merge_warps: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], k))


def _register():
    """``torch.ops.kvagents.topk_values(x, k, block, group, num_warps, merge_warps)``; once per process (a second
    copy of this module, as a test makes, finds it registered)."""
    try:
        return torch.ops.kvagents.topk_values
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("kvagents::topk_values", mutates_args=())(_op_impl)
    op.register_fake(_op_fake)
    return torch.ops.kvagents.topk_values


# custom_op reads the annotations: real types, not the strings of `from __future__ import annotations`
_op_impl.__annotations__ = _op_fake.__annotations__ = {
    "x": torch.Tensor, "k": int, "block": int, "group": int, "num_warps": int, "merge_warps": int,
    "return": torch.Tensor,
}  # fmt: skip
_OP = _register()


@torch.compiler.assume_constant_result
def _backend(is_cuda: bool) -> bool:
    """Whether the kernels can run for a tensor on CUDA (``is_cuda``) or the CPU: a constant to Dynamo (it reads
    Triton's knobs, which Dynamo would not trace), computed when a compiled function is traced."""
    return _triton() is not None and (is_cuda or _interpreting())


def uses_kernel(x: torch.Tensor, k: int) -> bool:
    """Whether :func:`topk_values` launches the Triton kernels for ``x`` and ``k`` (else it calls torch.topk).

    Example:
        >>> uses_kernel(torch.zeros(2, 10, dtype=torch.float64), 3)
        False
    """
    return (
        x.dtype in DTYPES
        and k <= MAX_K
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.shape[-1] <= _MAX_V
        and _backend(x.is_cuda)
    )


def topk_values(x: torch.Tensor, k: int, *, config: dict | None = None) -> torch.Tensor:
    """``torch.topk(x, k, dim=-1).values``: the ``k`` largest values of each row, largest first, exactly.

    Args:
        x: ``[..., V]`` float32, bfloat16 or float16 (other dtypes fall back to ``torch.topk``); rows may be
            strided, the last dimension is made contiguous if it is not.
        k: ``1 <= k <= V``; above :data:`MAX_K` (64) it falls back to ``torch.topk``.
        config: ``BLOCK``, ``GROUP``, ``num_warps``, ``merge_warps`` overrides (see :func:`resolve_config`).

    Returns: ``[..., k]`` in ``x``'s dtype.

    Example:
        >>> topk_values(torch.tensor([[3.0, 1.0, 3.0, 2.0]]), 2)
        tensor([[3., 3.]])
    """
    v = _check(x, k)
    if not uses_kernel(x, k):
        return torch.topk(x, k, dim=-1).values
    cfg = resolve_config(v, k, config)
    return _OP(x, k, cfg["BLOCK"], cfg["GROUP"], cfg["num_warps"], cfg["merge_warps"])
