"""kvagents: the KV cache an LLM builds while decoding, used as a free representation.

The package is built in wings, each importing only the ones below it:
``kernels`` (Triton) <- ``engine`` (decode loops, the component protocol) <- ``signals`` (what is read off the KV:
pooling, embeddings, CoE and probability scores, probes, classifiers) <- ``control`` (selection, early stop,
thinking budgets, the reasoning controller) <- ``model`` <- ``retrieval`` / ``evals`` / ``cli``.
``docs/architecture.md`` draws the map.

Example:
    >>> from kvagents import KVModel, SamplingParams, KVPooling, KVEmbedding
    >>> llm = KVModel.from_pretrained("smollm2-135m")  # lazy: loads on first use
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names and the module each lives in. They are imported on first access (PEP 562), so that
# `import kvagents.cli` and `kvagents --help` answer at once without loading torch and transformers.
_EXPORTS = {
    "AdaptiveConfig": ".control.adaptive",
    "BestOfN": ".control.selection",
    "Component": ".engine.components",
    "ControllerConfig": ".control.thinking",
    "ConvergenceConfig": ".control.convergence",
    "ConvergenceController": ".control.convergence",
    "DecodeEngine": ".engine.decode",
    "Effort": ".control.thinking",
    "Encoder": ".retrieval.encoder",
    "FastDecodeEngine": ".engine.fast_decode",
    "FinishView": ".engine.components",
    "ForceTokens": ".engine.components",
    "GenerationResult": ".engine.results",
    "GenerationStats": ".engine.results",
    "GenerationStream": ".model",
    "HardBudget": ".control.thinking",
    "IndexChecksumError": ".retrieval.errors",
    "IndexFormatError": ".retrieval.errors",
    "IndexMismatchError": ".retrieval.errors",
    "IndexRecord": ".retrieval.index",
    "IndexVersionError": ".retrieval.errors",
    "InvalidActionError": ".engine.components",
    "InvalidComponentError": ".engine.components",
    "KVClassifier": ".signals.kv_classifier",
    "KVClassifierConfig": ".signals.kv_classifier",
    "KVEmbedding": ".signals.embedding",
    "KVEncoder": ".retrieval.encoder",
    "KVIndex": ".retrieval.index",
    "KVIndexError": ".retrieval.errors",
    "KVModel": ".model",
    "KVPooling": ".signals.pooling",
    "KVProbe": ".signals.probe",
    "KVProbeScore": ".signals.probe",
    "KVRouter": ".signals.kv_classifier",
    "LayerInfo": ".engine.components",
    "LookAhead": ".engine.components",
    "LookAheadResult": ".engine.components",
    "NonFiniteLogitsError": ".engine.decode",
    "PLAIN_FORMAT": ".control.thinking",
    "PrefillView": ".engine.components",
    "PromptError": ".engine.decode",
    "QWEN3_FORMAT": ".control.thinking",
    "QueueFullError": ".engine.scheduler",
    "ReasoningController": ".control.thinking",
    "RequestHandle": ".engine.scheduler",
    "RunningPool": ".signals.pooling",
    "SampleResult": ".engine.results",
    "SamplingParams": ".engine.params",
    "Scheduler": ".engine.scheduler",
    "SchedulerConfig": ".engine.scheduler",
    "SearchHit": ".retrieval.index",
    "SentenceTransformerEncoder": ".retrieval.encoder",
    "StepView": ".engine.components",
    "StopSequence": ".engine.components",
    "StreamEvent": ".engine.results",
    "ThinkingFormat": ".control.thinking",
    "TooManySequencesError": ".engine.decode",
    "adaptive_stop": ".control.adaptive",
    "as_encoder": ".retrieval.encoder",
    "budget_for": ".control.thinking",
    "maximal_marginal_relevance": ".retrieval.index",
    "pool_cache_rows": ".signals.pooling",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvagents' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the names as if imported eagerly
    from .control.adaptive import AdaptiveConfig, adaptive_stop
    from .control.convergence import ConvergenceConfig, ConvergenceController
    from .control.selection import BestOfN
    from .control.thinking import (
        PLAIN_FORMAT,
        QWEN3_FORMAT,
        ControllerConfig,
        Effort,
        HardBudget,
        ReasoningController,
        ThinkingFormat,
        budget_for,
    )
    from .engine.components import (
        Component,
        FinishView,
        ForceTokens,
        InvalidActionError,
        InvalidComponentError,
        LayerInfo,
        LookAhead,
        LookAheadResult,
        PrefillView,
        StepView,
        StopSequence,
    )
    from .engine.decode import DecodeEngine, NonFiniteLogitsError, PromptError, TooManySequencesError
    from .engine.params import SamplingParams
    from .engine.results import GenerationResult, GenerationStats, SampleResult, StreamEvent
    from .engine.scheduler import QueueFullError, RequestHandle, Scheduler, SchedulerConfig
    from .model import GenerationStream, KVModel
    from .retrieval.encoder import Encoder, KVEncoder, SentenceTransformerEncoder, as_encoder
    from .retrieval.errors import (
        IndexChecksumError,
        IndexFormatError,
        IndexMismatchError,
        IndexVersionError,
        KVIndexError,
    )
    from .retrieval.index import IndexRecord, KVIndex, SearchHit, maximal_marginal_relevance
    from .signals.embedding import KVEmbedding
    from .signals.kv_classifier import KVClassifier, KVClassifierConfig, KVRouter
    from .signals.pooling import KVPooling, RunningPool, pool_cache_rows
    from .signals.probe import KVProbe, KVProbeScore

__all__ = [
    "AdaptiveConfig",
    "BestOfN",
    "Component",
    "ControllerConfig",
    "ConvergenceConfig",
    "ConvergenceController",
    "DecodeEngine",
    "Effort",
    "Encoder",
    "FastDecodeEngine",
    "FinishView",
    "ForceTokens",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "HardBudget",
    "IndexChecksumError",
    "IndexFormatError",
    "IndexMismatchError",
    "IndexRecord",
    "IndexVersionError",
    "InvalidActionError",
    "InvalidComponentError",
    "KVClassifier",
    "KVClassifierConfig",
    "KVEmbedding",
    "KVEncoder",
    "KVIndex",
    "KVIndexError",
    "KVModel",
    "KVPooling",
    "KVProbe",
    "KVProbeScore",
    "KVRouter",
    "LayerInfo",
    "LookAhead",
    "LookAheadResult",
    "NonFiniteLogitsError",
    "PLAIN_FORMAT",
    "PrefillView",
    "PromptError",
    "QWEN3_FORMAT",
    "QueueFullError",
    "ReasoningController",
    "RequestHandle",
    "RunningPool",
    "SampleResult",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SearchHit",
    "SentenceTransformerEncoder",
    "StepView",
    "StopSequence",
    "StreamEvent",
    "ThinkingFormat",
    "TooManySequencesError",
    "adaptive_stop",
    "as_encoder",
    "budget_for",
    "maximal_marginal_relevance",
    "pool_cache_rows",
]
