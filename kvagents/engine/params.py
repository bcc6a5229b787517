"""User-facing sampling configuration."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Seeds are 32-bit: the fast path keys its counter-based noise with ``seed`` itself, so a larger one would alias.
SEED_LIMIT = 2**32


def check_temperature(v: float) -> float:
    """Temperature >= 0 (0 = greedy); NaN is refused too. Shared by every config that takes one."""
    if not v >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {v}")
    return v


def check_n(v: int) -> int:
    """Samples per prompt >= 1. Shared by every config that takes one."""
    if v < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {v}")
    return v


class SamplingParams(BaseModel):
    """How to sample continuations.

    ``temperature == 0`` means greedy decoding (argmax), which matches
    ``model.generate(do_sample=False)`` token for token.

    Example:
        >>> SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.95, n=4, seed=0).n
        4
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, description="Upper bound on generated tokens per sample (forced ones included).")
    temperature: float = Field(1.0, description="Softmax temperature; 0 selects greedy decoding.")
    top_p: float = Field(1.0, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(0, description="Keep only the k most likely tokens; 0 disables.")
    seed: int | None = Field(None, description="Seed of the sampling generator, in [0, 2**32); a fixed seed reproduces samples.")
    n: int = Field(1, description="Samples per prompt; they share the prompt's prefilled KV cache.")
    stop: list[str] = Field(default_factory=list, description="Stop strings, matched on decoded text; output is cut before them.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra token ids that end a sample (EOS always does).")
    ignore_eos: bool = Field(False, description="Keep going past EOS (benchmarks).")

    @field_validator("max_new_tokens")
    @classmethod
    def _check_max_new(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v: float) -> float:
        return check_temperature(v)

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**32) (the fast path samples with 32-bit seeds), got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _check_n(cls, v: int) -> int:
        return check_n(v)

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is None:
            return []
        if not isinstance(v, (list, tuple, set, frozenset)):
            raise ValueError(f"stop must be a string or a list of strings, got {v!r}")
        for s in v:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        return list(v)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
