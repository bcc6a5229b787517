"""LangChain's standard chat-model suites (langchain-tests) on ChatKV, offline, on the real smollm2-135m.

Which knobs and why:
* ``temperature=0``: greedy, reproducible.
* ``max_tokens=48``: keeps the suite at a few minutes on a CPU; structured output and tool arguments still
  complete because string fields are bounded to fit the budget (``bound_strings``).
* ``auto_tool_calls="after_user"``: measured, smollm2-135m never chooses a tool on its own with
  ``tool_choice="auto"`` (0 of 2 tool-needing prompts: weather, adder; it answers in text), which
  ``test_agent_loop`` needs. With this policy a call is required after a user turn and the model decides after a
  tool result. Forced calls (``tool_choice="any"`` / a name) are grammar-constrained either way.
Image, audio and PDF inputs stay off (the suite skips them): a text-only model has no such modality.
"""

from __future__ import annotations

import os

import pytest
import torch
from langchain_kvagents import ChatKV
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

pytestmark = pytest.mark.real_model

SMOLLM_DIR = os.path.join(
    os.environ.get("KVAGENTS_CACHE", os.path.expanduser("~/.cache/kvagents")), "models", "smollm2-135m"
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 135M params decode fastest on one thread; the CI box has two cores
    yield
    torch.set_num_threads(before)


# KVAGENTS_LC_MODEL / KVAGENTS_LC_DEVICE / KVAGENTS_LC_AUTO_TOOLS run the same suites on another model or device
# (e.g. qwen2.5-coder-0.5b on CUDA with auto tool calls left to the model).
MODEL = os.environ.get("KVAGENTS_LC_MODEL", "smollm2-135m")
DEVICE = os.environ.get("KVAGENTS_LC_DEVICE", "cpu")
PARAMS = {"model": MODEL, "dtype": "float32" if DEVICE == "cpu" else "auto", "device": DEVICE, "temperature": 0,
          "max_tokens": 48, "auto_tool_calls": os.environ.get("KVAGENTS_LC_AUTO_TOOLS", "after_user")}


class TestChatKVUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatKV]:
        return ChatKV

    @property
    def chat_model_params(self) -> dict:
        return {"model": MODEL, "dtype": PARAMS["dtype"], "device": DEVICE}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return {"KVAGENTS_CHAT_MODEL": "smollm2-135m"}, {}, {"model": "smollm2-135m"}


class TestChatKVIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatKV]:
        return ChatKV

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str | None:
        # the same weights under another name: the per-call override loads (and shares) a second KVModel
        return SMOLLM_DIR if os.path.isdir(SMOLLM_DIR) else None
