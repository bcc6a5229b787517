"""Logit processing and host-sync-free sampling (gpt-fast style: divide by exponential noise, argmax)."""

from __future__ import annotations

import torch

from .params import SamplingParams


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(logits - row max) / temperature``, safe at any positive temperature: the shift keeps every value <= 0, so
    a tiny temperature underflows the others to -inf instead of overflowing to inf (whose softmax is NaN), and the
    row's maximum stays exactly 0 (even where ``temperature`` rounds to 0 in float32). A row that is all -inf (fully
    masked) keeps its values; NaN or +inf logits come out as NaN (see :func:`non_finite_rows`)."""
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    shifted = logits - top
    return torch.where(shifted == 0, shifted, shifted / temperature)


def non_finite_rows(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Rows ``[B]`` whose sampling distribution ``probs`` (softmax of the processed ``scores``) is NaN: the scores
    held NaN or +inf, before or after temperature scaling. A row of ``scores`` that is all -inf (every token masked
    by a logits processor) is not counted here. One reduction a row, no host sync."""
    return torch.isnan(probs.sum(dim=-1)) & (scores.amax(dim=-1) != float("-inf"))  # a NaN max counts


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to float32 ``logits`` ``[B, V]`` (masked entries become -inf)."""
    logits = scale_logits(logits, params.temperature)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop_sorted = (cum - probs) > params.top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids ``[B]`` from raw float32 logits; greedy when ``params.temperature == 0``. No host sync."""
    return sample_checked(logits, params, generator)[0]


def sample_checked(logits: torch.Tensor, params: SamplingParams,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` and the rows ``[B]`` whose distribution was not finite (:func:`non_finite_rows`; for greedy,
    rows holding NaN). No host sync."""
    if params.greedy:
        return logits.argmax(dim=-1), torch.isnan(logits.sum(dim=-1))
    probs = process_logits(logits, params).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1), non_finite_rows(probs, logits)
