"""Bad input gets a clear exception naming the value."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny import ByteTokenizer, tiny_model

from kvagents import KVEmbedding, KVModel, KVPooling, NonFiniteLogitsError, SamplingParams
from kvagents.registry import UnknownModelError


@pytest.fixture(scope="module")
def llm():
    return KVModel(tiny_model("llama"), ByteTokenizer())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"n": 0}, "got 0"),
        ({"n": -2}, "got -2"),
        ({"max_new_tokens": -1}, "got -1"),
        ({"temperature": -0.5}, "got -0.5"),
        ({"top_p": 0.0}, "got 0.0"),
        ({"top_p": 1.5}, "got 1.5"),
        ({"top_k": -3}, "got -3"),
        ({"stop": [""]}, "''"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, needle):
    with pytest.raises(ValidationError, match=needle.replace(".", r"\.")):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"part": "q"}, "q"),
        ({"positions": "median"}, "median"),
        ({"heads": "max"}, "max"),
        ({"layer_agg": "prod"}, "prod"),
        ({"segment": "answer"}, "answer"),
        ({"layers": 0}, "got 0"),
        ({"window": 0}, "got 0"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_pooling_rejects_unknown_options(kwargs, needle):
    with pytest.raises(ValidationError, match=needle):
        KVPooling(**kwargs)


def test_empty_prompts(llm):
    with pytest.raises(ValueError, match=r"prompt 0 is empty"):
        llm.generate("", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        llm.generate([[5, 6], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompts"):
        llm.generate([], max_new_tokens=2)


def test_prompt_longer_than_context(llm):
    ctx = llm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"{ctx + 5} tokens, the model's context is {ctx}"):
        llm.generate([[5] * (ctx + 5)], max_new_tokens=2)


def test_token_ids_outside_vocab(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 99999]], max_new_tokens=2)


def test_layer_index_out_of_range(llm):
    with pytest.raises(ValueError, match=r"layer index 7 is out of range for a model with 4 layers"):
        llm.embed(["hello"], KVPooling(layers=[7]))
    with pytest.raises(ValueError, match=r"layers=9 asks for more layers"):
        llm.generate("hi", max_new_tokens=2, components=[KVEmbedding(KVPooling(layers=9))])


def test_embed_rejects_generated_segment(llm):
    with pytest.raises(ValueError, match="segment='generated'"):
        llm.embed(["x"], KVPooling(segment="generated"))


def test_unknown_registry_name():
    with pytest.raises(UnknownModelError, match=r"^Unknown model 'qwen-typo': it is not a registry name"):
        KVModel.from_pretrained("qwen-typo")


def test_nan_logits_raise(llm):
    model = tiny_model("qwen2", seed=5)
    bad = KVModel(model, ByteTokenizer())
    saved = model.lm_head.weight.data.clone()
    try:
        model.lm_head.weight.data[7] = float("nan")
        with pytest.raises(NonFiniteLogitsError, match="NaN logits at step 0"):
            bad.generate([[5, 6, 7]], max_new_tokens=3, temperature=0)
    finally:
        model.lm_head.weight.data.copy_(saved)


def test_failed_call_leaves_model_usable(llm):
    with pytest.raises(ValueError):
        llm.generate([[5, 6], []], max_new_tokens=2)
    out = llm.generate([[5, 6]], max_new_tokens=3, temperature=0)
    assert out.samples[0][0].generated_tokens == 3


def test_construction_is_lazy():
    m = KVModel.from_pretrained("smollm2-135m")
    assert not m.loaded and "not loaded" in repr(m)
    assert isinstance(torch.float32, torch.dtype)
