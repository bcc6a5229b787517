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
    LayerInfo,
    PrefillView,
    StepView,
    StopSequence,
)
from .engine.decode import DecodeEngine, NonFiniteLogitsError
from .engine.params import SamplingParams
from .engine.results import GenerationResult, GenerationStats, SampleResult, StreamEvent
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
from .signals.kv_classifier import KVClassifier, KVClassifierConfig
from .signals.pooling import KVPooling, RunningPool, pool_cache_rows

__version__ = "0.1.0"


def __getattr__(name: str):
    # the fast path imports torch's compiler stack (~1.4 s): only when it is asked for
    if name == "FastDecodeEngine":
        from .engine.fast_decode import FastDecodeEngine

        return FastDecodeEngine
    raise AttributeError(f"module 'kvagents' has no attribute {name!r}")


__all__ = [
    "PLAIN_FORMAT",
    "QWEN3_FORMAT",
    "Component",
    "ControllerConfig",
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
    "KVClassifier",
    "KVClassifierConfig",
    "KVEmbedding",
    "KVEncoder",
    "KVIndex",
    "KVIndexError",
    "KVModel",
    "KVPooling",
    "LayerInfo",
    "NonFiniteLogitsError",
    "PrefillView",
    "ReasoningController",
    "RunningPool",
    "SampleResult",
    "SamplingParams",
    "SearchHit",
    "SentenceTransformerEncoder",
    "StepView",
    "StopSequence",
    "StreamEvent",
    "ThinkingFormat",
    "as_encoder",
    "budget_for",
    "maximal_marginal_relevance",
    "pool_cache_rows",
]
