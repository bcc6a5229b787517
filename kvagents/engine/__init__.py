"""The decode loops and the protocol they share with components.

``decode`` (:class:`DecodeEngine`, the eager loop), ``fast_decode`` (:class:`FastDecodeEngine`: static KV buffers and
CUDA graphs; its sampling in ``fast_sampling``, its views and graph-safe component steps in ``static_view``),
``static_cache`` (the static cache and the compiled per-layer step), ``components`` (the :class:`Component`
lifecycle, the views it reads and the actions it returns), ``params`` / ``results`` (what goes in and out),
``sampling``, ``devices`` (layers on several GPUs, tensor parallel). The engine knows no concrete component.

Example:
    >>> from kvagents.engine import DecodeEngine, SamplingParams
"""

from .components import Component, FinishView, ForceTokens, LayerInfo, PrefillView, StepView, StopSequence
from .decode import DecodeEngine, NonFiniteLogitsError
from .params import SamplingParams
from .results import GenerationResult, GenerationStats, SampleResult, StreamEvent

__all__ = [
    "Component",
    "DecodeEngine",
    "FinishView",
    "ForceTokens",
    "GenerationResult",
    "GenerationStats",
    "LayerInfo",
    "NonFiniteLogitsError",
    "PrefillView",
    "SampleResult",
    "SamplingParams",
    "StepView",
    "StopSequence",
    "StreamEvent",
]
