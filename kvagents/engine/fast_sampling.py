"""Sampling of the fast decode path: counter-based noise and a sort-free top-p, both graph-safe.

* :func:`hash_exponential` draws exponential noise from a hash of ``(seed, step, row, token)``: no generator state,
  no host synchronisation, and a replayed CUDA graph draws the same tokens;
* :func:`top_p_keep` finds each row's nucleus by a search over probability thresholds (``TOP_P_WAYS`` thresholds a
  pass, one read of the row per pass) instead of a sort and a cumsum; on CUDA its passes can run as the Triton
  kernels of :mod:`kvagents.kernels.top_p_search`. It is registered as the custom op ``kvagents::top_p_keep`` so
  that Inductor compiles around it;
* :func:`process_logits_search` is :func:`kvagents.engine.sampling.process_logits` with that top-p.

Example:
    >>> import torch
    >>> keep = top_p_keep(torch.tensor([[0.5, 0.3, 0.2]]), 0.7)
    >>> keep.tolist()
    [[True, True, False]]
"""

from __future__ import annotations

import torch

from .sampling import scale_logits

_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------------
# Counter-based noise


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values in ``[0, 2^32)``.
    Multipliers are below 2^31, so no product leaves the int64 range."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def hash_exponential(seed_key: torch.Tensor, step: torch.Tensor, rows: torch.Tensor, vocab: torch.Tensor):
    """Exponential(1) noise ``[B, V]`` as a pure function of ``(seed_key, step, row, token)`` (all device
    tensors: ``seed_key``/``step`` 0-d, ``rows`` ``[B]``, ``vocab`` ``[V]``, int64).

    23-bit uniforms ``(k + 0.5) / 2**23``, exact in float32 and strictly inside (0, 1), so the noise is never 0:
    a zero would turn ``probs / noise`` into ``0 / 0 = NaN`` for a masked token (argmax takes NaN) or ``inf`` for
    any other, drawing a token outside the nucleus or regardless of its probability. (24-bit uniforms rounded
    the top value to 1.0 in float32: one token in 2**24, about once a step over 64 rows of a 152k vocabulary.)"""
    k = _mix32((seed_key + step * 0x3C6EF372) & _M32)
    r = _mix32((k + rows * 0x1B873593) & _M32)
    x = _mix32(r[:, None] ^ vocab[None, :])
    u = ((x >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)
    return -torch.log(u)


TOP_P_WAYS = 8  # thresholds tested per pass of top_p_keep's search (one read of the row per pass)


def top_p_search_pass(bits: torch.Tensor, probs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, top_p: float,
                      ways: int = TOP_P_WAYS) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of :func:`top_p_keep`'s search: ``ways - 1`` thresholds spread over ``(lo, hi]`` (int64 ``[B]``),
    the mass above each (``ways - 1`` sums over the same row: one fused reduction), and the narrowed bracket: the
    largest threshold whose mass above exceeds ``top_p`` and the smallest one whose mass does not."""
    lo_, hi_ = lo[:, None], hi[:, None]
    mids = lo_ + ((hi_ - lo_) * torch.arange(1, ways, device=lo.device)) // ways  # [B, ways - 1]
    mass = torch.stack([torch.where(bits > mids[:, j : j + 1], probs, 0.0).sum(-1) for j in range(ways - 1)], dim=-1)
    ok = mass <= top_p
    return torch.where(ok, lo_, mids).amax(-1), torch.where(ok, mids, hi_).amin(-1)


_search_pass = top_p_search_pass  # torch.compile'd by FastDecodeEngine when it compiles (see _compile_search_pass)


def _compile_search_pass() -> None:
    """One small compiled kernel for the search pass, reused by every pass: with the search unrolled inside it,
    the sampling head's compile took 16-21 s of a cold first call (H100 host, 2026-11-25), 7-9 s without."""
    global _search_pass
    if _search_pass is top_p_search_pass:
        _search_pass = torch.compile(top_p_search_pass, dynamic=False, fullgraph=True)


def top_p_keep(probs: torch.Tensor, top_p: float, ways: int = TOP_P_WAYS, kernel: bool = False) -> torch.Tensor:
    """The nucleus ``[B, V]`` (bool) without sorting: keep token ``v`` iff the mass of the tokens more probable than
    it is at most ``top_p`` (the sort-and-cumsum rule of :func:`kvagents.engine.sampling.process_logits`), i.e.
    ``p_v >= t*``. ``t*`` is found by a ``ways``-ary search over the float32 bit patterns of ``probs`` (non-negative
    floats order like their bits): each pass tests ``ways - 1`` thresholds in one read of the row and narrows the
    bracket ``ways``-fold, so 11 passes (8 ways) settle the 31 bits. Exact up to the rounding of the masses,
    graph-safe (no host synchronisation).

    A custom op (``torch.ops.kvagents.top_p_keep``), opaque to Dynamo: a compiled sampling head stays one graph
    around it (a graph break here split the head and its caller into four compiled graphs). ``kernel``: the
    passes as Triton kernels (:mod:`kvagents.kernels.top_p_search`, one launch a pass), else as one small compiled torch
    reduction each.

    Example:
        >>> p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
        >>> top_p_keep(p, 0.7).tolist()
        [[True, True, False, False]]
    """
    return _TOP_P_OP(probs, float(top_p), int(ways), bool(kernel))


def top_p_keep_rows(probs: torch.Tensor, top_p: torch.Tensor, ways: int = TOP_P_WAYS) -> torch.Tensor:
    """:func:`top_p_keep` with one ``top_p`` per row (float32 ``[B]``): the same search passes, each row against
    its own mass (a row's nucleus equals :func:`top_p_keep` with that row's value as a Python float). Graph-safe;
    torch passes only (no Triton kernel). A row with ``top_p`` 1 may still drop tokens whose mass above rounds
    past 1: callers apply it only where ``top_p < 1``, as :func:`process_logits_search` does.

    Example:
        >>> p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
        >>> top_p_keep_rows(p, torch.tensor([0.7, 0.85])).tolist()
        [[True, True, False, False], [True, True, True, False]]
    """
    from ..kernels.top_p_search import n_passes

    bits = probs.view(torch.int32)
    lo = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    hi = bits.max(dim=-1).values.long()
    tp = top_p.to(torch.float32)[:, None]
    for _ in range(n_passes(ways)):
        lo, hi = top_p_search_pass(bits, probs, lo, hi, tp, ways)
    return bits >= hi[:, None]


def _top_p_keep_impl(probs: torch.Tensor, top_p: float, ways: int, use_kernel: bool = False) -> torch.Tensor:
    from ..kernels.top_p_search import n_passes, top_p_keep_kernel

    if use_kernel:
        return top_p_keep_kernel(probs, top_p, ways)
    bits = probs.view(torch.int32)
    lo = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)  # mass above 0 is 1 > top_p
    hi = bits.max(dim=-1).values.long()  # nothing above the maximum: 0 <= top_p
    for _ in range(n_passes(ways)):
        lo, hi = _search_pass(bits, probs, lo, hi, top_p, ways)
    return bits >= hi[:, None]


def _top_p_keep_fake(probs: torch.Tensor, top_p: float, ways: int, use_kernel: bool = False) -> torch.Tensor:
    return torch.empty(probs.shape, dtype=torch.bool, device=probs.device)


# custom_op reads the annotations: real types, not the strings of `from __future__ import annotations`. No
# argument may be named `kernel`: Inductor lowers the op through FallbackKernel.create(kernel, *args, **kwargs),
# and an argument of that name failed the head's compile ("got multiple values for argument 'kernel'").
_top_p_keep_impl.__annotations__ = _top_p_keep_fake.__annotations__ = {
    "probs": torch.Tensor, "top_p": float, "ways": int, "use_kernel": bool, "return": torch.Tensor,
}  # fmt: skip


def _register_top_p():
    """``torch.ops.kvagents.top_p_keep(probs, top_p, ways, use_kernel)``, once per process."""
    try:
        return torch.ops.kvagents.top_p_keep
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("kvagents::top_p_keep", mutates_args=())(_top_p_keep_impl)
    op.register_fake(_top_p_keep_fake)
    return torch.ops.kvagents.top_p_keep


_TOP_P_OP = _register_top_p()


def process_logits_search(logits: torch.Tensor, params, kernel: bool = False) -> torch.Tensor:
    """:func:`kvagents.engine.sampling.process_logits` with :func:`top_p_keep` in place of the sort (same kept set up to
    the rounding of the masses)."""
    logits = scale_logits(logits, params.temperature)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = logits.masked_fill(~top_p_keep(logits.softmax(dim=-1), params.top_p, kernel=kernel), float("-inf"))
    return logits
