"""Nothing silently wrong: a bad-input corpus (each case: the exact error type or result), numerically safe sampling
at any temperature on both engines, and hypothesis properties of every pydantic config (any input -> a valid object
or a ``ValidationError``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, ForceTokens, KVModel, NonFiniteLogitsError, SamplingParams, StopSequence
from kvagents.control.thinking import ControllerConfig, ThinkingFormat
from kvagents.engine.components import InvalidActionError, InvalidComponentError
from kvagents.engine.decode import MAX_SEQUENCES, PromptError, TooManySequencesError
from kvagents.engine.sampling import process_logits, scale_logits
from kvagents.evals.reasoning import ReasoningEvalConfig
from kvagents.evals.train_probe import TrainProbeConfig
from kvagents.registry import REGISTRY, ModelSpec, UnknownModelError
from kvagents.signals.artifact import ModelFingerprint
from kvagents.signals.kv_classifier import KVClassifierConfig
from kvagents.signals.pooling import KVPooling
from kvagents.signals.probe import KVProbeConfig

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def llm():
    return KVModel(tiny_model("llama"), ByteTokenizer())


def greedy_ids(llm, prompts=(PROMPT,), max_new=6, fast=False):
    res = llm.generate([list(p) for p in prompts], SamplingParams(max_new_tokens=max_new, temperature=0), fast=fast)
    return [s.token_ids for row in res.samples for s in row]


# ---- sampling at any temperature ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 1e-320])
def test_tiny_temperature_equals_greedy(llm, fast, temperature):
    prompts = [PROMPT, [9, 10]]
    want = greedy_ids(llm, prompts, fast=fast)
    res = llm.generate(prompts, SamplingParams(max_new_tokens=6, temperature=temperature, seed=3, n=2), fast=fast)
    got = [s.token_ids for row in res.samples for s in row]
    assert got == [want[0], want[0], want[1], want[1]]
    assert all(s.text != "" and s.finish_reason == "length" for row in res.samples for s in row)


def test_scale_logits_is_finite_and_keeps_masked_rows():
    x = torch.tensor([[3.0, 1.0, -2.0], [float("-inf")] * 3, [0.5, 0.5, -1.0]])
    for t in (1.0, 1e-38, 1e-45, 1e-320):
        y = scale_logits(x, t)
        assert not torch.isnan(y).any() and not (y == float("inf")).any()
        assert y[0, 0] == 0 and y[2, 0] == 0 and y[2, 1] == 0
        assert (y[1] == float("-inf")).all()
    probs = process_logits(x[:1], SamplingParams(temperature=1e-40)).softmax(-1)
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


def _inf_at_token_9(logits, prev, valid):
    out = logits.clone()
    out[:, 9] = float("inf")
    return out


def _nan_row(logits, prev, valid):
    out = logits.clone()
    out[0, 4] = float("nan")
    return out


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("proc", [_inf_at_token_9, _nan_row])
def test_non_finite_after_scaling_raises(llm, fast, proc):
    with pytest.raises(NonFiniteLogitsError, match="NaN logits at step 0"):
        llm.generate([PROMPT], SamplingParams(max_new_tokens=4, temperature=0.7, seed=0), logits_processors=[proc],
                     fast=fast)


# ---- token ids and component actions -----------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [[5.7, 6.2], [5, 6.0], [True, 5], np.array([5.5, 6.0]), torch.tensor([5.0, 6.0])])
def test_float_or_bool_token_ids_refused(llm, prompt):
    with pytest.raises(PromptError):
        llm.generate(prompt, max_new_tokens=2, temperature=0)


@pytest.mark.parametrize("fast", [False, True])
def test_engine_refuses_float_token_ids(llm, fast):
    engine = llm.fast_engine if fast else llm.engine
    with pytest.raises(PromptError, match="5.7"):
        engine.generate([[5.7, 6.2]], SamplingParams(max_new_tokens=2, temperature=0))


@pytest.mark.parametrize("make", [lambda: StopSequence(-1), lambda: StopSequence(1.5), lambda: StopSequence(True),
                                  lambda: ForceTokens(0, [-1]), lambda: ForceTokens(-2, [5]),
                                  lambda: ForceTokens(0, [5.5]), lambda: ForceTokens(0, 7), lambda: ForceTokens(0, "ab")])
def test_bad_actions_refused_at_construction(make):
    with pytest.raises(InvalidActionError):
        make()


def test_actions_accept_integer_scalars():
    a = ForceTokens(np.int64(1), [np.int32(5), torch.tensor(6)])
    assert (a.index, a.token_ids) == (1, [5, 6]) and type(a.index) is int
    assert StopSequence(np.int64(0)).index == 0


class _Acts(Component):
    name = "acts"

    def __init__(self, actions, where="step"):
        self.actions, self.where = actions, where

    def on_prefill(self, view):
        return self.actions if self.where == "prefill" else None

    def on_step(self, view):
        return self.actions if self.where == "step" and view.step == 0 else None


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("action, where, needle", [
    (StopSequence(7), "step", "sequence 7"),
    (StopSequence(2), "step", "sequence 2"),
    (ForceTokens(5, [10]), "step", "sequence 5"),
    (ForceTokens(0, [256]), "step", "256"),
    (ForceTokens(0, [10**6]), "prefill", "1000000"),
    (ForceTokens(3, [10]), "prefill", "sequence 3"),
])
def test_out_of_range_actions_refused(llm, fast, action, where, needle):
    with pytest.raises(InvalidActionError, match=needle):
        llm.generate([PROMPT, [9, 10]], SamplingParams(max_new_tokens=3, temperature=0),
                     components=[_Acts([action], where)], fast=fast)


@pytest.mark.parametrize("fast", [False, True])
def test_valid_actions_still_work(llm, fast):
    res = llm.generate([PROMPT, [9, 10]], SamplingParams(max_new_tokens=3, temperature=0),
                       components=[_Acts([ForceTokens(1, [255]), StopSequence(0, "mine")])], fast=fast)
    assert res.samples[0][0].finish_reason == "mine" and len(res.samples[0][0].token_ids) == 1
    assert res.samples[1][0].token_ids[1] == 255


# ---- obscure errors made clear -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts", [None, 5, 5.5, b"abc", {"role": "user"}, [None], [[5, 6], None], object()])
def test_bad_prompt_types_refused(llm, prompts):
    with pytest.raises(PromptError):
        llm.generate(prompts, max_new_tokens=2, temperature=0)


@pytest.mark.parametrize("fast", [False, True])
def test_numpy_and_tensor_prompts_equal_lists(llm, fast):
    want = greedy_ids(llm, [PROMPT, [9, 10, 11, 12]], max_new=3, fast=fast)
    p = dict(max_new_tokens=3, temperature=0, fast=fast)
    assert [s.token_ids for row in llm.generate(np.array(PROMPT), **p).samples for s in row] == want[:1]
    arr = np.array([PROMPT, [9, 10, 11, 12]])
    for prompts in (arr, torch.as_tensor(arr), list(arr)):
        assert [s.token_ids for row in llm.generate(prompts, **p).samples for s in row] == want
    with pytest.raises(PromptError):
        llm.generate(np.zeros((1, 2, 3), dtype=np.int64), max_new_tokens=2)


def test_params_as_dict(llm):
    want = greedy_ids(llm, max_new=3)
    res = llm.generate([PROMPT], {"max_new_tokens": 3, "temperature": 0})
    assert [s.token_ids for row in res.samples for s in row] == want
    res = llm.generate([PROMPT], {"max_new_tokens": 9, "temperature": 0}, max_new_tokens=3)
    assert [s.token_ids for row in res.samples for s in row] == want
    for bad in ({"temperature": -1}, {"bogus": 1}, "greedy", 5):
        with pytest.raises(ValidationError):
            llm.generate([PROMPT], bad)


@pytest.mark.parametrize("components", ["abc", ["abc"], [Component], [object()], 5])
def test_bad_components_refused(llm, components):
    with pytest.raises(InvalidComponentError):
        llm.generate([PROMPT], max_new_tokens=2, temperature=0, components=components)


def test_single_component_is_wrapped(llm):
    res = llm.generate([PROMPT], SamplingParams(max_new_tokens=3, temperature=0),
                       components=_Acts([StopSequence(0, "mine")]))
    assert res.samples[0][0].finish_reason == "mine"


@pytest.mark.parametrize("seed", [2**64, 2**32, -1])
def test_seed_outside_32_bits_refused(seed):
    with pytest.raises(ValidationError, match=str(seed)):
        SamplingParams(seed=seed)
    assert SamplingParams(seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("stop", [5, 1.5, object(), {"a": 1}, True])
def test_stop_not_a_list_is_a_validation_error(stop):
    with pytest.raises(ValidationError):
        SamplingParams(stop=stop)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


@pytest.mark.parametrize("name", ["", "   ", None, 5])
def test_from_pretrained_empty_name_refused(name):
    with pytest.raises(UnknownModelError):
        KVModel.from_pretrained(name)


@pytest.mark.parametrize("fast", [False, True])
def test_too_many_sequences_refused_up_front(llm, fast):
    with pytest.raises(TooManySequencesError, match="10000"):
        llm.generate([PROMPT], n=10000, max_new_tokens=2, fast=fast)
    with pytest.raises(TooManySequencesError):
        llm.stream([PROMPT] * 2, n=MAX_SEQUENCES // 2 + 1, max_new_tokens=2, fast=fast)
    engine = llm.fast_engine if fast else llm.engine
    with pytest.raises(TooManySequencesError):
        engine.generate([PROMPT], SamplingParams(n=MAX_SEQUENCES + 1, max_new_tokens=2))


# ---- hypothesis: every pydantic config -------------------------------------------------------------------------
_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=4),
    st.complex_numbers(), st.just(object()), st.just(float),
)
_ANY = st.recursive(_SCALAR, lambda c: st.one_of(
    st.lists(c, max_size=4), st.tuples(c, c), st.dictionaries(st.text(max_size=4), c, max_size=3),
    st.sets(st.integers(), max_size=3), st.frozensets(st.text(max_size=3), max_size=3),
), max_leaves=6)


def _plausible(cls, field):
    """Values near the valid ones (the default, small numbers, short lists, common names): they reach the
    validators that run only after every field parsed."""
    info = cls.model_fields[field]
    if info.is_required():  # a plausible value of its type: text, or a default nested config
        ann = info.annotation
        nested = isinstance(ann, type) and issubclass(ann, BaseModel)
        default = ann() if nested else "x"
        extra = st.just({}) if nested else st.text(min_size=1, max_size=6)
    else:
        default, extra = info.get_default(call_default_factory=True), st.nothing()
    return st.one_of(
        st.just(default), extra, st.integers(-2, 40), st.floats(-0.5, 2.0),
        st.lists(st.text(min_size=1, max_size=4), max_size=3), st.lists(st.integers(-3, 300), max_size=4),
        st.sampled_from(["mean", "last", "kv", "k", "v", "prompt", "all", "generated", "cat", "max", "none", "auto"]),
    )


from kvagents.control.adaptive import AdaptiveConfig  # noqa: E402
from kvagents.control.convergence import ConvergenceConfig  # noqa: E402
from kvagents.engine.scheduler import SchedulerConfig  # noqa: E402
from kvagents.evals.train_router import TrainRouterConfig  # noqa: E402
from kvagents.signals.kv_classifier import KVRouterConfig  # noqa: E402

CONFIGS = [SamplingParams, KVPooling, ControllerConfig, ThinkingFormat, KVClassifierConfig, KVProbeConfig,
           TrainProbeConfig, ReasoningEvalConfig, ModelSpec, ModelFingerprint, AdaptiveConfig, ConvergenceConfig,
           SchedulerConfig, TrainRouterConfig, KVRouterConfig]
# a valid object of each config whose required fields need a precise shape (a pattern, paired lists): the examples
# also draw it with up to three fields replaced, so valid and invalid neighbours are both reached
_EXAMPLES = {
    ModelSpec: lambda: REGISTRY["smollm2-135m"],
    TrainRouterConfig: lambda: TrainRouterConfig(data="d.jsonl", out="routers/r"),  # data xor from_work
    ModelFingerprint: lambda: ModelFingerprint(
        architecture="LlamaForCausalLM", num_layers=4, attention_layers=[0, 1, 2, 3], kv_heads=2, head_dim=16,
        hidden_size=64, vocab_size=256, tokenizer_sha256="0" * 64, weights_sha256="1" * 64),
}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_any_input_is_valid_or_validation_error(cls):
    fields = list(cls.model_fields)
    seen = {"valid": 0, "invalid": 0}
    required = {f for f in fields if cls.model_fields[f].is_required()}
    values = {f: st.one_of(_ANY, _plausible(cls, f)) for f in fields}
    plain = {f: _plausible(cls, f) for f in required}  # required fields: mostly plausible, so some objects are valid

    inputs = st.fixed_dictionaries({f: st.one_of(plain[f], plain[f], values[f]) for f in required},
                                   optional={f: values[f] for f in fields if f not in required})
    if cls in _EXAMPLES:
        base = _EXAMPLES[cls]().model_dump()
        near = st.sets(st.sampled_from(fields), max_size=3).flatmap(
            lambda keys: st.fixed_dictionaries({f: values[f] for f in keys}))
        inputs = st.one_of(inputs, st.just(base), near.map(lambda changed: {**base, **changed}))

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(inputs)
    def check(kwargs):
        try:
            obj = cls(**kwargs)
        except ValidationError:
            seen["invalid"] += 1
            return
        seen["valid"] += 1
        assert isinstance(obj, cls)
        assert cls.model_validate(obj.model_dump()) == obj  # a valid object round-trips

    check()
    assert seen["valid"] + seen["invalid"] >= 1000 and seen["valid"] > 0 and seen["invalid"] > 0
