"""kvagents: the KV cache an LLM builds while decoding, used as a free representation.

Example:
    >>> from kvagents import KVModel, SamplingParams, KVPooling, KVEmbedding
    >>> llm = KVModel.from_pretrained("smollm2-135m")  # lazy: loads on first use
"""

from .components import (
    Component,
    FinishView,
    ForceTokens,
    KVEmbedding,
    LayerInfo,
    PrefillView,
    StepView,
    StopSequence,
)
from .encoder import Encoder, KVEncoder, SentenceTransformerEncoder, as_encoder
from .engine import DecodeEngine, NonFiniteLogitsError
from .index import IndexRecord, KVIndex, KVIndexError, SearchHit, maximal_marginal_relevance
from .index_io import IndexChecksumError, IndexFormatError, IndexMismatchError, IndexVersionError
from .kv_classifier import KVClassifier, KVClassifierConfig
from .model import GenerationStream, KVModel
from .params import SamplingParams
from .pooling import KVPooling, RunningPool, pool_cache_rows
from .results import GenerationResult, GenerationStats, SampleResult, StreamEvent
from .thinking import (
    PLAIN_FORMAT,
    QWEN3_FORMAT,
    ControllerConfig,
    Effort,
    HardBudget,
    ReasoningController,
    ThinkingFormat,
    budget_for,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # the fast path imports torch's compiler stack (~1.4 s): only when it is asked for
    if name == "FastDecodeEngine":
        from .fast_decode import FastDecodeEngine

        return FastDecodeEngine
    raise AttributeError(f"module 'kvagents' has no attribute {name!r}")

__all__ = [
    "budget_for",
    "ThinkingFormat",
    "ReasoningController",
    "QWEN3_FORMAT",
    "PLAIN_FORMAT",
    "KVClassifierConfig",
    "KVClassifier",
    "HardBudget",
    "Effort",
    "ControllerConfig",
    "Component",
    "DecodeEngine",
    "FastDecodeEngine",
    "Encoder",
    "FinishView",
    "ForceTokens",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "IndexChecksumError",
    "IndexFormatError",
    "IndexMismatchError",
    "IndexRecord",
    "IndexVersionError",
    "KVEmbedding",
    "KVIndex",
    "KVIndexError",
    "KVEncoder",
    "KVModel",
    "KVPooling",
    "LayerInfo",
    "NonFiniteLogitsError",
    "PrefillView",
    "RunningPool",
    "SampleResult",
    "SamplingParams",
    "SearchHit",
    "SentenceTransformerEncoder",
    "StepView",
    "StopSequence",
    "StreamEvent",
    "as_encoder",
    "maximal_marginal_relevance",
    "pool_cache_rows",
]
