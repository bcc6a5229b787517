"""What ``generate`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SampleResult:
    """One sampled continuation.

    ``token_ids`` include the token that ended the sample (EOS, or the one completing a stop string); ``text``
    is decoded without special tokens and cut before a matched stop string. ``generated_tokens`` counts every
    token in ``token_ids``, ``forced_tokens`` those a component forced. ``outputs`` maps component names to
    their per-sample output.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    forced_tokens: int
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationStats:
    """Counters and timings of one ``generate`` call."""

    prompts: int = 0
    sequences: int = 0
    forward_calls: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class GenerationResult:
    """``samples[p][j]`` is sample j of prompt p."""

    samples: list[list[SampleResult]]
    stats: GenerationStats

    def __iter__(self):
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def flat(self) -> list[SampleResult]:
        return [s for group in self.samples for s in group]

    @property
    def texts(self) -> list[list[str]]:
        return [[s.text for s in group] for group in self.samples]


@dataclass
class StreamEvent:
    """A text delta of one sequence; ``finish_reason`` is set on its last event."""

    prompt_index: int
    sample_index: int
    text: str
    finish_reason: str | None = None
