"""The cookbook examples run offline on the embedded smollm2-135m (in-process, sharing one loaded model)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lcel_chain():
    from cookbook import lcel_chain

    out = lcel_chain.main()
    assert "Paris" in out["answer"]
    assert out["streamed"] and len(out["batch"]) == 2 and all(out["batch"])
    assert isinstance(out["city"], lcel_chain.City) and out["city"].city


def test_rerank_samples():
    from cookbook import rerank_samples

    out = rerank_samples.main()
    md = out["message"].response_metadata
    assert len(md["candidates"]) == 4
    best = max(md["candidates"], key=lambda c: c["scores"]["kv_coe_layer_r"])
    assert md["chosen_index"] == best["index"] and out["message"].content == best["text"]
    assert isinstance(out["text"], str) and out["text"]


def test_rag():
    from cookbook import rag

    out = rag.main()
    assert out["hits"][0].id == "cat"
    assert out["answer"]
    assert {d.id for d in out["animals"]} <= {"cat", "dog"} and len(out["animals"]) == 2


def test_tool_agent():
    from cookbook import tool_agent

    out = tool_agent.main()
    assert out["report"]["train_accuracy"] == 1.0
    for messages in out["transcripts"]:
        calls = messages[1].tool_calls
        assert calls and calls[0]["name"] in ("add", "multiply")
        assert isinstance(calls[0]["args"]["a"], int)
        info = messages[-1].response_metadata["reasoning"]
        assert info["start"] in ("slow", "fast") and info["thinking_tokens"] <= 32
        assert messages[-1].content
