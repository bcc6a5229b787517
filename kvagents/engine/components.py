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

Look-ahead forks (eager engine): ``on_step`` may also return :class:`LookAhead` requests. After the step's token is
fed, the engine forks each named sequence from the running cache (the prefix is shared, never re-processed),
feeds the forced ids, decodes ``max_tokens`` greedily as a small separate batch, drops the fork and hands the
component a list of :class:`LookAheadResult` through its optional hook ``on_lookahead(results)``, which may
return :class:`StopSequence` / :class:`ForceTokens` actions (applied from the next step on, like ``on_step``'s).
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from . import devices
from .devices import TensorParallel


class InvalidActionError(ValueError, IndexError):
    """A component action names a sequence or a token id that does not exist (a negative or too large index, a
    token id outside the vocabulary, a non-integer)."""


def _as_int(value, what: str) -> int:
    """``value`` as a Python int: ints and integer scalars (numpy, 0-d tensors) pass; bools, floats and anything
    else are refused (no silent truncation of 5.7 to 5)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise InvalidActionError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidActionError(f"{what} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class StopSequence:
    """Finish sequence ``index`` after the current token (finish reason ``"component"``). ``index`` is a sequence
    number ``0 .. P * n - 1`` (negative indices are refused, not counted from the end)."""

    index: int
    reason: str = "component"

    def __post_init__(self) -> None:
        index = _as_int(self.index, "StopSequence index")
        if index < 0:
            raise InvalidActionError(f"StopSequence index must be >= 0 (a sequence number), got {index}")
        object.__setattr__(self, "index", index)


@dataclass(frozen=True)
class ForceTokens:
    """Make ``token_ids`` the next tokens of sequence ``index`` (overriding sampling), one per step. Ids must be
    integers >= 0 (and below the vocabulary size, checked when the action is applied)."""

    index: int
    token_ids: list[int]

    def __post_init__(self) -> None:
        index = _as_int(self.index, "ForceTokens index")
        if index < 0:
            raise InvalidActionError(f"ForceTokens index must be >= 0 (a sequence number), got {index}")
        ids = self.token_ids
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InvalidActionError(f"ForceTokens token_ids must be a list of token ids, got {ids!r}")
        ids = [_as_int(x, "ForceTokens token id") for x in ids]
        neg = [x for x in ids if x < 0]
        if neg:
            raise InvalidActionError(f"ForceTokens token ids must be >= 0, got {neg[:5]}")
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "token_ids", ids)


@dataclass(frozen=True)
class LookAhead:
    """Request a look-ahead on sequence ``index`` (eager engine, returned from ``on_step``): after this step's token
    is fed, fork the sequence from the running cache, feed ``token_ids`` (forced, e.g. an end-of-thinking marker
    and an answer cue), decode ``max_tokens`` tokens greedily from the model's raw logits, then drop the fork. The
    main sequence is untouched. The result comes back through the component's ``on_lookahead(results)`` hook.

    ``kv_layers`` (absolute layer indices, optional): also return the fork's K/V rows of those layers for the
    fed look-ahead tokens (``kv_part`` ``"k"`` / ``"v"`` / ``"kv"``). ``tag``: any value, returned in the result.

    Example:
        >>> LookAhead(0, [40, 41], max_tokens=4).max_tokens
        4
        >>> LookAhead(0, [], max_tokens=4)
        Traceback (most recent call last):
        ...
        kvagents.engine.components.InvalidActionError: LookAhead token_ids must hold at least one token id to force, got []
    """

    index: int
    token_ids: list[int]
    max_tokens: int
    kv_layers: tuple[int, ...] | None = None
    kv_part: str = "kv"
    tag: Any = None

    def __post_init__(self) -> None:
        index = _as_int(self.index, "LookAhead index")
        if index < 0:
            raise InvalidActionError(f"LookAhead index must be >= 0 (a sequence number), got {index}")
        ids = self.token_ids
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InvalidActionError(f"LookAhead token_ids must be a list of token ids, got {ids!r}")
        ids = [_as_int(x, "LookAhead token id") for x in ids]
        if not ids:
            raise InvalidActionError("LookAhead token_ids must hold at least one token id to force, got []")
        neg = [x for x in ids if x < 0]
        if neg:
            raise InvalidActionError(f"LookAhead token ids must be >= 0, got {neg[:5]}")
        m = _as_int(self.max_tokens, "LookAhead max_tokens")
        if m < 1:
            raise InvalidActionError(f"LookAhead max_tokens must be >= 1, got {m}")
        layers = self.kv_layers
        if layers is not None:
            layers = tuple(_as_int(x, "LookAhead kv_layers entry") for x in layers)
            if not layers:
                raise InvalidActionError("LookAhead kv_layers must name at least one layer (or be None), got []")
        if self.kv_part not in ("k", "v", "kv"):
            raise InvalidActionError(f"LookAhead kv_part must be 'k', 'v' or 'kv', got {self.kv_part!r}")
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "token_ids", ids)
        object.__setattr__(self, "max_tokens", m)
        object.__setattr__(self, "kv_layers", layers)


@dataclass
class LookAheadResult:
    """What one :class:`LookAhead` produced (host values, except ``kv``).

    * ``step``: the main step whose token was the fork's last shared token (the fork continues
      prompt + generated tokens ``0 .. step``);
    * ``forced_ids``: the forced ids; ``token_ids``: the ``max_tokens`` greedy tokens decoded after them;
    * ``probs`` / ``logprobs``: each decoded token's probability / log-probability under the model's raw
      distribution (the greedy token's, i.e. the max);
    * ``kv``: with ``kv_layers``, the fork's rows ``[nL, parts, H, S, d]`` of the ``S = len(forced_ids) +
      max_tokens - 1`` fed look-ahead tokens (the last decoded token is not fed), on the engine's device;
    * ``tokens``: look-ahead tokens of this request (forced + decoded), what the sample's count grows by.
    """

    index: int
    step: int
    forced_ids: list[int]
    token_ids: list[int]
    probs: list[float]
    logprobs: list[float]
    kv: torch.Tensor | None = None
    tag: Any = None

    @property
    def tokens(self) -> int:
        return len(self.forced_ids) + len(self.token_ids)

    @property
    def confidence(self) -> float:
        """Mean probability of the decoded tokens."""
        return sum(self.probs) / len(self.probs)


class InvalidComponentError(TypeError, ValueError):
    """Something passed as a component that is not one (a string, a class instead of an instance...)."""


def check_components(components) -> list:
    """``components`` as a list of components: one :class:`Component` alone is wrapped; a string, a non-iterable
    or an element without the ``on_prefill`` / ``on_step`` / ``on_finish`` hooks raises
    :class:`InvalidComponentError` naming it."""
    if components is None:
        return []
    if isinstance(components, Component):
        return [components]
    if isinstance(components, (str, bytes)) or not hasattr(components, "__iter__"):
        raise InvalidComponentError(f"components must be a list of Component instances, got {components!r}")
    out = list(components)
    for c in out:
        if isinstance(c, (str, bytes, type)) or not all(
            callable(getattr(c, h, None)) for h in ("on_prefill", "on_step", "on_finish")
        ):
            raise InvalidComponentError(
                f"components must be Component instances (with on_prefill/on_step/on_finish), got {c!r}")
    return out


def check_action(component, action, sequences: int, vocab_size: int | None) -> None:
    """Refuse an action on a sequence outside ``0 .. sequences - 1`` or forcing an id outside the vocabulary
    (:class:`InvalidActionError`, naming the component and the value)."""
    name = getattr(component, "name", type(component).__name__)
    if not 0 <= action.index < sequences:
        raise InvalidActionError(f"component {name!r} returned {type(action).__name__} for sequence {action.index}; "
                                 f"valid: 0..{sequences - 1}")
    if isinstance(action, (ForceTokens, LookAhead)) and vocab_size is not None:
        bad = [x for x in action.token_ids if x >= vocab_size]
        if bad:
            raise InvalidActionError(f"component {name!r} forced token ids outside the vocabulary [0, {vocab_size}): "
                                     f"{bad[:5]}")


Action = StopSequence | ForceTokens | LookAhead


def queue_prefill_forces(actions, sequences: int, vocab_size: int | None, queues: dict) -> None:
    """Put the token ids of ``ForceTokens`` returned by ``on_prefill`` (``actions``: ``(component, action)``
    pairs) into ``queues[index]`` (deques, created as needed); any other action there is refused."""
    for c, action in actions:
        if not isinstance(action, ForceTokens):
            raise TypeError(f"component {c.name!r} returned {action!r} from on_prefill; only ForceTokens is "
                            "allowed there")
        check_action(c, action, sequences, vocab_size)
        queues.setdefault(action.index, deque()).extend(int(x) for x in action.token_ids)


def apply_step_actions(components, view, sequences: int, vocab_size: int | None, queues: dict,
                       custom_reason: dict, stop) -> None:
    """Run every component's ``on_step(view)`` and apply what it returns, as a scheduler does for one request:
    ``ForceTokens`` go into ``queues[index]``, ``StopSequence`` records its reason (the first one wins) and calls
    ``stop(index)``; any other action is refused."""
    for c in components:
        for action in c.on_step(view) or ():
            if isinstance(action, (StopSequence, ForceTokens)):
                check_action(c, action, sequences, vocab_size)
            if isinstance(action, StopSequence):
                custom_reason.setdefault(action.index, action.reason)
                stop(action.index)
            elif isinstance(action, ForceTokens):
                queues.setdefault(action.index, deque()).extend(int(x) for x in action.token_ids)
            else:
                raise TypeError(f"component {c.name!r} returned {action!r}: the scheduler applies StopSequence "
                                "and ForceTokens actions only")


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
