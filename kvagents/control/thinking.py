"""Fast/slow thinking inside the decode loop: thinking formats, a hard budget, and the KV-classifier controller.

* :class:`ThinkingFormat` says how a model thinks: native tags (Qwen3 / R1 distills: ``<think>`` ... ``</think>``,
  chat-template ``enable_thinking``) or prompt-level modes for plain instruct models (slow: "Let's think step by
  step."; fast: an answer cue; switch markers that end the reasoning and ask for the final answer). The cues are
  forced as the assistant's first tokens, so the prompt itself stays neutral and is prefilled once.
* :class:`ReasoningController` is one component for the whole state machine: start fast or slow (fixed, or
  decided at prefill by a :class:`~kvagents.signals.kv_classifier.KVClassifier` on the prompt's KV), count thinking and
  answer tokens on the device, force the end-of-thinking sequence when the thinking budget is spent (never a
  truncation), re-predict every ``every`` tokens from the last-w tokens' KV and switch mode by forcing the format's
  markers when the prediction crosses ``threshold -+ delta`` (hysteresis, at most ``max_switches``). Nothing is
  regenerated and the prompt is never re-processed. Host reads happen only every ``every`` steps and at steps
  planned in advance (a budget deadline is known exactly from the count at the previous read).
* :class:`HardBudget` is the controller without a classifier.

Example:
    >>> fmt = PLAIN_FORMAT
    >>> fmt.render("The final answer is")["end_thinking"]
    '\\n\\nTime is up, so I stop thinking here. The final answer is'
    >>> budget_for("low")
    128
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine.components import Component, FinishView, ForceTokens, PrefillView, StepView, StopSequence
from ..signals.kv_classifier import KVClassifierConfig, load_classifier, prompt_window, window_features

FAST, THINK, ANSWER = 0, 1, 2  # per-row phase: answering directly, thinking, answering after thinking ended


class Effort(str, Enum):
    """Reasoning effort; :func:`budget_for` maps it to a thinking-token budget."""

    low = "low"
    medium = "medium"
    high = "high"


#: Thinking-token budgets per effort (reasoning models think for thousands of tokens; small instruct models for
#: a few hundred: pass your own table to :func:`budget_for` / ``ControllerConfig.effort_budgets``).
EFFORT_BUDGETS: dict[str, int] = {"low": 128, "medium": 512, "high": 2048}


def budget_for(effort: Effort | str, table: dict[str, int] | None = None) -> int:
    """The thinking budget of an effort level.

    Example:
        >>> budget_for(Effort.high), budget_for("medium", {"low": 16, "medium": 64, "high": 256})
        (2048, 64)
    """
    key = effort.value if isinstance(effort, Effort) else str(effort)
    table = table or EFFORT_BUDGETS
    if key not in table:
        raise ValueError(f"unknown effort {effort!r}; use one of {', '.join(table)}")
    return int(table[key])


class ThinkingFormat(BaseModel):
    """How a model thinks and which text to force for each mode and switch.

    Strings may hold ``{answer_cue}``, replaced by the task's answer cue (e.g. ``"The final answer is $\\\\boxed{"``
    for math, ``"The answer is ("`` for multiple choice). The cue must continue the prompt's format instruction,
    not repeat a placeholder from it: after "finish with 'Answer: N'" a forced "Answer:" makes small models print
    "N" (see :func:`check_instruction`).

    * ``slow_cue``: forced first in slow mode; ``fast_cue``: forced first in fast mode;
    * ``end_thinking``: forced to leave thinking (budget spent, or the classifier says "enough"): it ends the
      reasoning and asks for the final answer;
    * ``start_thinking``: forced to switch a fast answer to slow thinking (``None``: not allowed);
    * ``end_token``: a token that ends thinking when the model writes it itself (native ``</think>``);
    * ``chat_template_kwargs``: passed to ``apply_chat_template`` (``{"enable_thinking": True}``).

    Example:
        >>> QWEN3_FORMAT.render()["fast_cue"]
        '<think>\\n\\n</think>\\n\\n'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    native: bool = Field(False, description="Thinking tags are part of the model's own format.")
    slow_cue: str
    fast_cue: str
    end_thinking: str
    start_thinking: str | None = None
    end_token: str | None = None
    answer_cue: str = Field("The final answer is", description="Default answer cue for {answer_cue}.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("slow_cue", "fast_cue", "end_thinking")
    @classmethod
    def _non_empty(cls, v, info):
        if not v:
            raise ValueError(f"{info.field_name} must be a non-empty string")
        return v

    def render(self, answer_cue: str | None = None) -> dict[str, str | None]:
        cue = self.answer_cue if answer_cue is None else answer_cue
        out = {}
        for k in ("slow_cue", "fast_cue", "end_thinking", "start_thinking"):
            v = getattr(self, k)
            out[k] = None if v is None else v.replace("{answer_cue}", cue)
        return out

    def token_ids(self, tokenizer, answer_cue: str | None = None) -> dict[str, list[int] | None]:
        """Token ids of every cue (no special tokens added), plus ``end_token`` as ``[id]`` when it is one token."""
        out: dict[str, list[int] | None] = {}
        for k, v in self.render(answer_cue).items():
            out[k] = None if v is None else encode_text(tokenizer, v)
        out["end_token"] = None
        if self.end_token:
            ids = encode_text(tokenizer, self.end_token)
            out["end_token"] = ids if len(ids) == 1 else None
        return out


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a marker in the middle of a sequence)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not ids:
        raise ValueError(f"text {text!r} encodes to no tokens")
    return list(ids)


def check_instruction(instruction: str, fmt: ThinkingFormat, answer_cue: str | None = None) -> None:
    """Raise ``ValueError`` when a prompt's format instruction collides with the fast cue: the instruction quotes
    the cue followed by a placeholder (``'Answer: N'``, ``<number>``), which small models copy verbatim."""
    fast = (fmt.render(answer_cue)["fast_cue"] or "").strip()
    low = instruction.lower()
    for ph in ("<number>", "<answer>", "<letter>", ": n'", ': n"', " n'", "[answer]", "{answer}"):
        if ph in low and (not fast or fast.lower().rstrip(":( {$\\boxed") in low):
            raise ValueError(
                f"the format instruction {instruction!r} quotes a placeholder ({ph.strip()!r}) next to the fast cue "
                f"{fast!r}: small models then print the placeholder. Describe the format without a placeholder "
                "(e.g. 'Put the final answer in \\\\boxed{}.') and let the fast cue start the answer"
            )


#: Qwen3 / DeepSeek-R1-distill tags (the paper's format; Qwen's own budget-forcing phrase on a switch).
QWEN3_FORMAT = ThinkingFormat(
    name="qwen3",
    native=True,
    slow_cue="<think>\n",
    fast_cue="<think>\n\n</think>\n\n",
    end_thinking="\n\nConsidering the limited time, I have to give the solution based on the thinking directly now."
    "\n</think>\n\n",
    start_thinking=None,
    end_token="</think>",
    chat_template_kwargs={"enable_thinking": True},
)

#: Plain instruct models (qwen2.5-coder-0.5b, SmolLM2): the mode is the assistant's forced first words.
PLAIN_FORMAT = ThinkingFormat(
    name="plain",
    native=False,
    slow_cue="Let's think step by step.\n",
    fast_cue="{answer_cue}",
    end_thinking="\n\nTime is up, so I stop thinking here. {answer_cue}",
    start_thinking="\nWait, let me think step by step instead.\n",
)

FORMATS = {"qwen3": QWEN3_FORMAT, "plain": PLAIN_FORMAT}


def get_format(name: str | ThinkingFormat) -> ThinkingFormat:
    if isinstance(name, ThinkingFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown thinking format {name!r}; use one of {', '.join(FORMATS)} or a ThinkingFormat")
    return FORMATS[name]


def chat_prompt_ids(tokenizer, user_text: str, fmt: ThinkingFormat) -> list[int]:
    """Token ids of a one-turn chat prompt (generation prompt added, the format's template kwargs applied);
    plain ``user_text + "\\n"`` when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return encode_text(tokenizer, user_text + "\n")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                        tokenize=True, **fmt.chat_template_kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


class ControllerConfig(BaseModel):
    """Knobs of :class:`ReasoningController`.

    Example:
        >>> ControllerConfig(effort="low").thinking_budget
        128
        >>> ControllerConfig(start="fast", max_thinking_tokens=64).thinking_budget
        64
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: Literal["slow", "fast", "auto"] = Field("slow", description="Start mode; auto: the classifier decides at prefill.")
    max_thinking_tokens: int | None = Field(None, description="Hard thinking budget (sampled thinking tokens).")
    effort: Effort | None = Field(None, description="low / medium / high -> a budget from effort_budgets.")
    effort_budgets: dict[str, int] | None = Field(None, description="Effort -> budget table (default EFFORT_BUDGETS).")
    max_answer_tokens: int | None = Field(64, description="Sampled tokens allowed after a forced end of thinking and "
                                          "in fast mode (None: until EOS / max_new_tokens).")
    threshold: float | None = Field(None, description="Difficulty >= threshold -> slow (default: the classifier's).")
    step_threshold: float | None = Field(None, description="Mid-generation threshold (default: step classifier's).")
    delta: float = Field(20.0, description="Hysteresis: slow->fast below threshold-delta, fast->slow above +delta.")
    every: int = Field(16, description="Re-predict (and read the device) every k generated tokens.")
    max_switches: int = Field(1, description="At most m mode switches per sequence.")
    switch_to_slow: bool = Field(True, description="Allow fast -> slow switches (the format needs start_thinking).")
    stop_thinking_at: int | None = Field(None, description="Finish sequences still thinking after this many "
                                         "generated tokens (a length cut, like max_new_tokens, not a forced answer).")
    capture: bool = Field(False, description="Return the pooled KV features (prefill and every k tokens).")

    @field_validator("max_thinking_tokens", "max_answer_tokens", "stop_thinking_at")
    @classmethod
    def _budget(cls, v, info):
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1 (or None for no limit), got {v}")
        return v

    @field_validator("every")
    @classmethod
    def _every(cls, v):
        if v < 1:
            raise ValueError(f"every must be >= 1 token, got {v}")
        return v

    @field_validator("max_switches")
    @classmethod
    def _switches(cls, v):
        if v < 0:
            raise ValueError(f"max_switches must be >= 0, got {v}")
        return v

    @field_validator("delta")
    @classmethod
    def _delta(cls, v):
        if not v >= 0:
            raise ValueError(f"delta must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        if self.effort is not None and self.max_thinking_tokens is not None:
            raise ValueError("give either effort or max_thinking_tokens, not both")
        if self.effort is not None:
            budget_for(self.effort, self.effort_budgets)  # validates the table
        return self

    @property
    def thinking_budget(self) -> int | None:
        if self.max_thinking_tokens is not None:
            return self.max_thinking_tokens
        if self.effort is not None:
            return budget_for(self.effort, self.effort_budgets)
        return None


class ReasoningController(Component):
    """Fast/slow thinking with a hard budget and an online KV classifier (see the module docstring).

    ``classifier`` decides the start mode at prefill from the prompt's last-w KV rows (``start="auto"``);
    ``kv_config`` sets the captured features' pooling when there is no classifier (``capture=True``);
    ``step_classifier=False`` predicts at prefill only. ``answer_cues`` (one per prompt) fill ``{answer_cue}`` per prompt (a batch mixing tasks); ``step_classifier``
    (default: ``classifier``) re-predicts every ``every`` tokens from the last-w rows of the
    sequence (a ring buffer updated O(1) per step). Both must read the same layers, KV part and window.
    ``classifier`` may be a :class:`~kvagents.signals.kv_classifier.KVRouter`, a classifier or router folder, or the
    name of a shipped router (a model's name, e.g. ``"qwen2.5-coder-0.5b"``): a router's
    :meth:`~kvagents.signals.kv_classifier.KVRouter.controller_settings` (the rule it was calibrated for: start
    decided at prefill, its step threshold, thinking budget, answer and length limits) fill every setting not given
    in ``config`` or the keyword overrides.

    Output per sequence (``SampleResult.outputs["reasoning"]``): ``start`` ("fast"/"slow"), ``start_score``,
    ``switches`` (``{"step", "to", "reason", "score"}``), ``thinking_tokens`` and ``answer_tokens`` (sampled
    tokens in each phase), ``forced_tokens`` (cues and markers), ``budget_hit``, ``scores`` (``[step, score]``
    mid-generation) and, with ``capture``, ``features`` (``prompt`` ``[D]``, ``steps``, ``windows`` ``[k, D]``).
    ``thinking_tokens + answer_tokens + forced_tokens == generated_tokens`` (when no other component forces).

    Example:
        >>> ctl = ReasoningController(PLAIN_FORMAT, tok, ControllerConfig(max_thinking_tokens=128))  # doctest: +SKIP
        >>> res = llm.generate(prompt, params, components=[ctl])  # doctest: +SKIP
        >>> res.samples[0][0].outputs["reasoning"]["thinking_tokens"] <= 128  # doctest: +SKIP
        True
    """

    name = "reasoning"

    def __init__(self, fmt: ThinkingFormat | str, tokenizer, config: ControllerConfig | None = None, *,
                 classifier=None, step_classifier=None, answer_cue: str | None = None,
                 answer_cues: list[str] | None = None, kv_config: KVClassifierConfig | None = None,
                 name: str | None = None, **overrides) -> None:
        self.fmt = get_format(fmt)
        classifier = load_classifier(classifier)
        cfg = config or ControllerConfig()
        if overrides:
            cfg = ControllerConfig(**{**cfg.model_dump(), **overrides})
        if callable(getattr(classifier, "controller_settings", None)):  # a router: its calibrated rule by default
            given = set(config.model_fields_set if config is not None else ()) | set(overrides)
            rule = {k: v for k, v in classifier.controller_settings().items() if k not in given}
            if "effort" in given and cfg.effort is not None:
                rule.pop("max_thinking_tokens", None)
            cfg = ControllerConfig(**{**rule, **{k: getattr(cfg, k) for k in given}})
        self.config = cfg
        if name:
            self.name = name
        if cfg.start == "auto" and classifier is None:
            raise ValueError("start='auto' needs a classifier (the start mode is its decision at prefill); "
                             "pass classifier=KVClassifier.load(path) or start='slow'/'fast'")
        self.classifier = classifier
        # step_classifier=False: no re-prediction mid-generation (the start decision only)
        self.step_classifier = None if step_classifier is False else (
            step_classifier if step_classifier is not None else classifier)
        if self.classifier is not None and self.step_classifier is not None:
            a, b = self.classifier.config, self.step_classifier.config
            if (a.layers, a.part, a.window) != (b.layers, b.part, b.window):
                raise ValueError(f"classifier and step_classifier must read the same KV rows; got layers/part/window "
                                 f"{(a.layers, a.part, a.window)} and {(b.layers, b.part, b.window)}")
        self.tokenizer = tokenizer
        self.ids = self.fmt.token_ids(tokenizer, answer_cue)
        self.answer_cues = list(answer_cues) if answer_cues is not None else None
        self._cue_ids: dict[str, dict] = {}
        self.budget = cfg.thinking_budget
        kv_clf = self.classifier or self.step_classifier
        self.kv_config: KVClassifierConfig | None = kv_clf.config if kv_clf is not None else None
        if kv_config is not None and self.kv_config is not None and (
                (kv_config.layers, kv_config.part, kv_config.window) != (self.kv_config.layers, self.kv_config.part,
                                                                         self.kv_config.window)):
            raise ValueError("kv_config must read the classifier's layers, part and window (or leave it None)")
        if self.kv_config is None and (cfg.capture or kv_config is not None):
            self.kv_config = kv_config or KVClassifierConfig()
        self.threshold = cfg.threshold if cfg.threshold is not None else (
            self.classifier.config.threshold if self.classifier is not None else 50.0)
        self.step_threshold = cfg.step_threshold if cfg.step_threshold is not None else (
            self.step_classifier.config.threshold if self.step_classifier is not None else self.threshold)
        self.host_reads = 0

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def on_prefill(self, view: PrefillView) -> list[ForceTokens]:
        cfg = self.config
        P, n = view.input_ids.shape[0], view.n
        B = P * n
        dev = view.input_ids.device
        self.B = B
        if self.answer_cues is not None and len(self.answer_cues) != P:
            raise ValueError(f"answer_cues has {len(self.answer_cues)} entries for {P} prompts; give one per prompt")
        self.row_ids = [self._ids_for(i // n) for i in range(B)]
        start_scores: list[float | None] = [None] * B
        self._ring = None
        prompt_feats = None
        if self.kv_config is not None:
            kc = self.kv_config
            self._layers = kc.resolve_layers(view.layers.attention_layers, view.layers.num_layers)
            rows = view.kv_rows(self._layers, kc.part)  # [P, nL, parts, H, T, d]
            win = prompt_window(rows, view.attention_mask.sum(-1), kc)  # [P, w, nL, parts, H, d]
            prompt_feats = window_features(win, kc)
            if self.step_classifier is not None or cfg.capture:
                self._ring = view.expand(win.float()).contiguous()
                self._ring_count = torch.full((B,), kc.window, dtype=torch.long, device=dev)
        if cfg.start == "auto":
            if hasattr(self.classifier, "step"):
                self.classifier.step = -1
            s = view.expand(self.classifier.scores(prompt_feats)).tolist()
            self.host_reads += 1
            start_scores = s
            slow = [x >= self.threshold for x in s]
        else:
            slow = [cfg.start == "slow"] * B
        self._prompt_feats = view.expand(prompt_feats) if (cfg.capture and prompt_feats is not None) else None
        self._cap_steps: list[int] = []
        self._cap_feats: list[torch.Tensor] = []
        # device state
        self.think_n = torch.zeros(B, dtype=torch.long, device=dev)
        self.ans_n = torch.zeros(B, dtype=torch.long, device=dev)
        self.thinking = torch.as_tensor(slow, dtype=torch.bool, device=dev)
        # host state
        self.phase = [THINK if s else FAST for s in slow]
        self.start = ["slow" if s else "fast" for s in slow]
        self.start_scores = start_scores
        self.switches: list[list[dict]] = [[] for _ in range(B)]
        self.scores: list[list[list[float]]] = [[] for _ in range(B)]
        self.busy_until = [-1] * B  # last step holding a token this component forced
        self.stop_at: list[int | None] = [None] * B
        self.budget_hit = [False] * B
        self.scheduled: set[int] = set()
        if cfg.stop_thinking_at is not None:
            self.scheduled.add(cfg.stop_thinking_at - 1)
        actions = []
        for i in range(B):
            cue = self.row_ids[i]["slow_cue"] if slow[i] else self.row_ids[i]["fast_cue"]
            actions.append(ForceTokens(i, cue))
            self.busy_until[i] = len(cue) - 1
            if slow[i] and self.budget is not None:
                self.scheduled.add(len(cue) - 1 + self.budget)
            if not slow[i] and cfg.max_answer_tokens is not None:
                self._stop(i, len(cue) - 1 + cfg.max_answer_tokens)
        return actions

    def _ids_for(self, prompt: int) -> dict:
        if self.answer_cues is None:
            return self.ids
        cue = self.answer_cues[prompt]
        if cue not in self._cue_ids:
            self._cue_ids[cue] = self.fmt.token_ids(self.tokenizer, cue)
        return self._cue_ids[cue]

    def _stop(self, i: int, step: int | None) -> None:
        self.stop_at[i] = step
        if step is not None:
            self.scheduled.add(step)

    # -- per step: device work every step, host work only at the steps that need it ---------------------------
    def graph_state(self) -> dict[str, torch.Tensor]:
        """The device state :meth:`step_tensors` updates in place (the fast path keeps it in persistent buffers
        and runs the update inside its captured step)."""
        state = {"think_n": self.think_n, "ans_n": self.ans_n, "thinking": self.thinking}
        if self._ring is not None:
            state.update(_ring=self._ring, _ring_count=self._ring_count)
        return state

    def graph_key(self) -> tuple:
        """What :meth:`step_tensors` reads besides :meth:`graph_state` (plain values baked into a captured step)."""
        kc = self.kv_config
        ring = None if self._ring is None else (tuple(self._layers), kc.part, kc.window)
        return ("ReasoningController", tuple(self.ids["end_token"] or ()), ring)

    def step_tensors(self, view: StepView) -> None:
        """Device-only work of every step (graph-safe: no host reads, no branching on tensor values): count
        thinking / answer tokens, notice a native end-of-thinking token, push the fed token's KV rows into the
        last-w ring buffer."""
        counted = view.alive & ~view.forced
        self.think_n += (counted & self.thinking).long()
        self.ans_n += (counted & ~self.thinking).long()
        end_tok = self.ids["end_token"]
        if end_tok is not None:  # the model ended its thinking itself (native </think>)
            self.thinking &= ~(counted & (view.token_ids == end_tok[0]))
        if self._ring is not None and view.has_kv:
            row = view.kv_rows(self._layers, self.kv_config.part).float()  # [B, nL, parts, H, d]
            b = torch.arange(row.shape[0], device=row.device)
            slot = self._ring_count % self.kv_config.window
            v = view.fed_valid[:, None, None, None, None]
            self._ring[b, slot] = torch.where(v, row, self._ring[b, slot])
            self._ring_count += view.fed_valid.long()

    def host_check_at(self, t: int) -> bool:
        """Whether step ``t`` needs :meth:`on_host_check` (a prediction every ``every`` tokens, a feature capture,
        or a scheduled budget / answer-limit step). Host state only: no device read."""
        if (t + 1) % self.config.every == 0 and (
                self.config.capture or (self.step_classifier is not None and self._may_switch())):
            return True
        return t in self.scheduled

    def on_host_check(self, view: StepView):
        """Host work of step ``view.step`` (after its :meth:`step_tensors`): predict, switch, stop. One device
        read."""
        t = int(view.step)
        at_k = (t + 1) % self.config.every == 0
        predict = at_k and self.step_classifier is not None and self._may_switch()
        if at_k and self.config.capture:
            self._cap_steps.append(t)
            self._cap_feats.append(self._features())
        if not (predict or t in self.scheduled):
            return None
        self.scheduled.discard(t)
        return self._check(t, view, predict)

    def on_step(self, view: StepView):
        self.step_tensors(view)
        if self.host_check_at(view.step):
            return self.on_host_check(view)
        return None

    def _may_switch(self) -> bool:
        """Host-side: some sequence may still switch (not out of switches, not answering after thinking)."""
        m, up = self.config.max_switches, self.config.switch_to_slow
        return any(len(sw) < m and (ph == THINK or (ph == FAST and up)) for sw, ph in zip(self.switches, self.phase))

    def _features(self) -> torch.Tensor:
        last = (self._ring_count - 1) % self.kv_config.window
        return window_features(self._ring, self.kv_config, last=last)

    def _check(self, t: int, view: StepView, predict: bool):
        cfg = self.config
        cols = [self.think_n.float(), self.thinking.float(), view.finished.float()]
        if predict:
            clf = self.step_classifier
            if hasattr(clf, "step"):
                clf.step = t
            feats = self._cap_feats[-1] if (cfg.capture and self._cap_steps and self._cap_steps[-1] == t) else (
                self._features())
            cols.append(clf.scores(feats))
        host = torch.stack(cols).tolist()  # the one host read of this check
        self.host_reads += 1
        actions: list = []
        end_idx, start_idx = [], []
        for i in range(self.B):
            if self.stop_at[i] == t:
                actions.append(StopSequence(i, "answer_limit"))
                continue
            if host[2][i] > 0:  # finished
                continue
            thinking = host[1][i] > 0
            if not thinking and self.phase[i] == THINK:
                self.phase[i] = ANSWER  # ended by the model itself
            if thinking and cfg.stop_thinking_at is not None and t >= cfg.stop_thinking_at - 1:
                actions.append(StopSequence(i, "length"))
                continue
            busy = self.busy_until[i] > t
            if predict:
                self.scores[i].append([t, host[3][i]])
            if busy:
                continue
            if thinking and self.budget is not None:
                left = self.budget - int(host[0][i])
                if left <= 0:
                    self.budget_hit[i] = True
                    self._switch(i, t, "fast", "budget", None, actions, end_idx)
                    continue
                self.scheduled.add(t + left)
            if predict and len(self.switches[i]) < cfg.max_switches:
                s = host[3][i]
                if thinking and s < self.step_threshold - cfg.delta:
                    self._switch(i, t, "fast", "classifier", s, actions, end_idx)
                elif (self.phase[i] == FAST and cfg.switch_to_slow and self.row_ids[i]["start_thinking"] is not None
                      and s > self.step_threshold + cfg.delta):
                    self._switch(i, t, "slow", "classifier", s, actions, start_idx)
        dev = self.thinking.device
        if end_idx:
            self.thinking[torch.as_tensor(end_idx, device=dev)] = False
        if start_idx:
            self.thinking[torch.as_tensor(start_idx, device=dev)] = True
        return actions

    def _switch(self, i: int, t: int, to: str, reason: str, score, actions: list, idx: list) -> None:
        cfg = self.config
        ids = self.row_ids[i]["end_thinking"] if to == "fast" else self.row_ids[i]["start_thinking"]
        actions.append(ForceTokens(i, ids))
        idx.append(i)
        self.busy_until[i] = t + len(ids)
        self.switches[i].append({"step": t, "to": to, "reason": reason, "score": score})
        if to == "fast":
            self.phase[i] = ANSWER
            self._stop(i, None if cfg.max_answer_tokens is None else t + len(ids) + cfg.max_answer_tokens)
        else:
            self.phase[i] = THINK
            self._stop(i, None)
            if self.budget is not None:
                self.scheduled.add(t + len(ids) + self.budget)  # re-checked against the count then

    def on_finish(self, view: FinishView) -> list[dict]:
        think, ans = self.think_n.tolist(), self.ans_n.tolist()
        out = []
        windows = torch.stack(self._cap_feats, 1).cpu() if self._cap_feats else None  # [B, k, D]
        prompt = self._prompt_feats.cpu() if self._prompt_feats is not None else None
        for i in range(self.B):
            n = len(view.token_ids[i])
            rec = {"start": self.start[i], "start_score": self.start_scores[i], "switches": self.switches[i],
                   "thinking_tokens": think[i], "answer_tokens": ans[i], "forced_tokens": n - think[i] - ans[i],
                   "budget_hit": self.budget_hit[i], "scores": self.scores[i]}
            if self.config.capture:
                keep = [j for j, s in enumerate(self._cap_steps) if s < n - 1]  # checkpoints before the last token
                rec["features"] = {"prompt": None if prompt is None else prompt[i],
                                   "steps": [self._cap_steps[j] for j in keep],
                                   "windows": windows[i, keep] if windows is not None else None}
            out.append(rec)
        return out


class HardBudget(ReasoningController):
    """A thinking budget alone: after ``max_thinking_tokens`` sampled thinking tokens (or an ``effort`` level's
    budget) the format's end-of-thinking sequence is forced and the answer may run ``max_answer_tokens`` more.

    Example:
        >>> hb = HardBudget(PLAIN_FORMAT, tok, effort="low")  # doctest: +SKIP
        >>> hb.budget  # doctest: +SKIP
        128
    """

    name = "reasoning"

    def __init__(self, fmt: ThinkingFormat | str, tokenizer, max_thinking_tokens: int | None = None, *,
                 effort: Effort | str | None = None, max_answer_tokens: int | None = 64,
                 start: Literal["slow", "fast"] = "slow", answer_cue: str | None = None,
                 effort_budgets: dict[str, int] | None = None) -> None:
        if max_thinking_tokens is None and effort is None:
            raise ValueError("HardBudget needs max_thinking_tokens or effort (low / medium / high)")
        cfg = ControllerConfig(start=start, max_thinking_tokens=max_thinking_tokens, effort=effort,
                               max_answer_tokens=max_answer_tokens, effort_budgets=effort_budgets)
        super().__init__(fmt, tokenizer, cfg, answer_cue=answer_cue)
