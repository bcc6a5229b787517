"""A tiny random Llama saved with smollm2-135m's tokenizer (chat template included), for fast LangChain tests."""

from __future__ import annotations

import pytest
import torch


def make_tiny_chat_dir(out) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kvagents.registry import fetch_model

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m", progress=False))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_chat_dir(tmp_path_factory.mktemp("tiny_chat"))
