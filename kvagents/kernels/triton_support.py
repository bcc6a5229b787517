"""Triton, when it is installed: the checks and the rounding helper shared by kvagents' Triton kernels
(:mod:`kvagents.kernels.fused_gemv`, :mod:`kvagents.kernels.topk_values`, :mod:`kvagents.kernels.decode_attention`,
:mod:`kvagents.kernels.fused_rope`).

Nothing here is cached, so a module loaded while ``import triton`` fails (the kernels' no-Triton tests) sees that,
and later imports see Triton again.

Example:
    >>> from kvagents.kernels.triton_support import next_pow2
    >>> next_pow2(100)
    128
"""

from __future__ import annotations

import os


def triton_modules():
    """``(triton, triton.language)``, or ``None`` when Triton does not import."""
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - depends on the machine
        return None
    return triton, tl


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1`` when Triton was imported)."""
    tt = triton_modules()
    if tt is not None:
        knobs = getattr(tt[0], "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runnable() -> bool:
    """Whether Triton kernels can run here: Triton imports and there is a CUDA device, or Triton's interpreter is
    on (``TRITON_INTERPRET=1``, for CPU tensors)."""
    import torch

    return triton_modules() is not None and (torch.cuda.is_available() or interpreting())


def check_tensor(name: str, t, shape: tuple, ref, ref_name: str, dtype=None):
    """``t`` checked as a kernel argument: a tensor of ``shape`` on ``ref``'s device with ``dtype`` (None: ``ref``'s
    dtype); the errors name ``name``, and ``ref_name`` for the reference tensor. Returns ``t``."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    want = ref.dtype if dtype is None else dtype
    if t.dtype != want:
        what = f"{ref_name}'s dtype" if dtype is None else "dtype"
        raise ValueError(f"{name} must have {what} {want}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, {ref_name} on {ref.device}")
    return t


def check_device(device, interpreted: bool) -> None:
    """A kernel's tensors on ``device`` can run: CUDA, or the CPU under Triton's interpreter (``interpreted``, the
    calling module's own check, which its tests may replace)."""
    if device.type == "cpu" and not interpreted:
        raise ValueError(
            "CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1 before triton is "
            "imported); use CUDA tensors"
        )


def next_pow2(n: int) -> int:
    """The least power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


def same_mode(built: tuple, what: str):
    """The kernels of ``built`` (``(kernels, interpreted)``, from a module's cached ``_build()``), after checking
    that Triton's interpreter mode has not changed since they were defined: one mode per process. ``what`` names
    them in the error, e.g. ``"the gemv kernels were"``."""
    kernels, interpreted = built
    if interpreted != interpreting():
        raise RuntimeError(
            f"{what} built with TRITON_INTERPRET={int(interpreted)} and are now called "
            f"with TRITON_INTERPRET={int(not interpreted)}: one mode per process"
        )
    return kernels


def _jit_round(triton, tl):
    """The ``@triton.jit`` helper ``_round(v, DT, EMU_BF16)``: float32 ``v`` rounded (nearest even) to the dtype
    ``DT``, returned as float32. Under Triton's interpreter (``EMU_BF16``) bfloat16 rounding is done on the bits,
    because the interpreter truncates float32 -> bfloat16 casts where the GPU rounds."""
    # Triton's interpreter looks for triton.language in a jit function's module globals
    globals()["tl"] = tl

    @triton.jit
    def _round(v, DT: tl.constexpr, EMU_BF16: tl.constexpr):
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

    return _round


def kernel_scope(module: str, namespace: dict):
    """``(triton, triton.language)`` for a kernel module's cached ``_build()``: a RuntimeError naming ``module``
    when Triton does not import, and the rounding helper ``_round`` (:func:`_jit_round`) published in
    ``namespace`` (the module's globals, where Triton resolves the names a kernel calls, not in a closure)."""
    tt = triton_modules()
    if tt is None:
        raise RuntimeError(f"{module} needs triton (pip install triton); available() is False")
    namespace["_round"] = _jit_round(*tt)
    return tt
