"""Components: pluggable observers of the decode loop, and the views and actions they exchange with it.

Lifecycle, per ``generate`` call (batch-level, like vLLM's logits processors):

1. ``on_prefill(PrefillView)``: once, after the prompts were prefilled (one row per *prompt*; expand your state
   with ``view.expand`` to one row per *sample*); it may return :class:`ForceTokens` actions (indexed by
   *sequence*, ``0 .. P * n - 1``), forced from the first generated token on (the eager engine);
2. ``on_step(StepView)``: after every decode step, with device tensors only; return ``None`` or a list of
   :class:`StopSequence` / :class:`ForceTokens` actions;
3. ``on_finish(FinishView)``: once; return a list with one output per sequence (it lands in
   ``SampleResult.outputs[component.name]``) or ``None``.

Reading a view never synchronises with the host. A component that needs host values (to decide on an action)
should batch them, e.g. look every k steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import devices
from .devices import TensorParallel


@dataclass(frozen=True)
class StopSequence:
    """Finish sequence ``index`` after the current token (finish reason ``"component"``)."""

    index: int
    reason: str = "component"


@dataclass(frozen=True)
class ForceTokens:
    """Make ``token_ids`` the next tokens of sequence ``index`` (overriding sampling), one per step."""

    index: int
    token_ids: list[int]


Action = StopSequence | ForceTokens


@dataclass
class LayerInfo:
    """Which decoder layers carry KV and their cache geometry."""

    num_layers: int
    attention_layers: list[int]
    kv_heads: int  # all heads of the model (summed over tensor-parallel ranks)
    head_dim: int
    tp: TensorParallel = field(default_factory=TensorParallel)


@dataclass
class PrefillView:
    """State after prefill. Rows are prompts (``P``), not samples: ``view.expand(x)`` repeats to ``P * n``.

    ``cache`` is the prefill cache (left-padded rows, ``attention_mask`` ``[P, T]`` marks real tokens).
    """

    cache: Any
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    n: int
    layers: LayerInfo

    def kv_rows(self, layers: list[int], part: str = "kv", heads: str = "keep") -> torch.Tensor:
        """Stacked prompt rows ``[P, nL, parts, H, T, d]`` of the given absolute layer indices, on the engine's
        device (gathered from every GPU / tensor-parallel rank); ``heads="mean"`` averages heads (``H`` = 1)
        before rows leave their device."""
        return devices.gather_layer_rows(self.cache, layers, part, device=self.input_ids.device, heads=heads,
                                tp=self.layers.tp)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.n, dim=0)


@dataclass
class StepView:
    """One decode step, all device tensors over the ``B = P * n`` sequences.

    * ``token_ids`` ``[B]``: the token chosen this step (after forcing); it counts for sequence i iff ``alive[i]``.
    * ``logprobs`` ``[B]``: its log-probability under the model's raw distribution (computed on first access, so
      components that do not read it cost nothing); ``logits`` ``[B, V]`` that distribution (float32, before
      temperature / top-k / top-p).
    * ``forced`` ``[B]``: the token was forced by a component.
    * ``alive`` ``[B]``: sequence was running when this token was chosen; ``finished`` ``[B]``: after it.
    * ``kv``: K/V rows of ``fed_ids``, the tokens fed in the forward pass that produced ``logits`` (the previous
      step's tokens; ``None`` at step 0, whose logits come from prefill). ``fed_valid`` ``[B]`` marks rows that
      belong to running sequences; ``positions`` ``[B]`` their positions.
    """

    step: int
    token_ids: torch.Tensor
    _logprobs: torch.Tensor | None
    logits: torch.Tensor
    forced: torch.Tensor
    alive: torch.Tensor
    finished: torch.Tensor
    fed_ids: torch.Tensor | None
    fed_valid: torch.Tensor | None
    positions: torch.Tensor | None
    cache: Any
    layers: LayerInfo

    @property
    def logprobs(self) -> torch.Tensor:
        if self._logprobs is None:
            self._logprobs = (self.logits.gather(-1, self.token_ids[:, None]).squeeze(-1)
                              - torch.logsumexp(self.logits, dim=-1))
        return self._logprobs

    @property
    def has_kv(self) -> bool:
        return self.fed_ids is not None

    def kv_rows(self, layers: list[int], part: str = "kv", heads: str = "keep") -> torch.Tensor:
        """The fed tokens' rows ``[B, nL, parts, H, d]`` of the given absolute layer indices, on the engine's
        device (gathered from every GPU / tensor-parallel rank); ``heads="mean"`` averages heads first."""
        if self.fed_ids is None:
            raise RuntimeError("step 0 has no fed token: its logits come from prefill (see on_prefill)")
        return devices.gather_layer_rows(self.cache, layers, part, rows=-1, device=self.token_ids.device, heads=heads,
                                tp=self.layers.tp)


@dataclass
class FinishView:
    """End of generation: host-side results per sequence."""

    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_index: list[int]


class Component:
    """Base class; override any of the hooks. ``name`` keys the output in ``SampleResult.outputs``."""

    name: str = "component"

    def on_prefill(self, view: PrefillView) -> list[Action] | None:  # pragma: no cover - default no-op
        return None

    def on_step(self, view: StepView) -> list[Action] | None:  # pragma: no cover - default no-op
        return None

    def on_finish(self, view: FinishView) -> list[Any] | None:  # pragma: no cover - default no-op
        return None
