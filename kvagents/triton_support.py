"""Triton, when it is installed: the checks shared by kvagents' Triton kernels (:mod:`kvagents.fused_gemv`,
:mod:`kvagents.topk_values`).

Nothing here is cached, so a module loaded while ``import triton`` fails (the kernels' no-Triton tests) sees that,
and later imports see Triton again.

Example:
    >>> from kvagents.triton_support import next_pow2
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
