"""Tiny randomly initialised models of real architectures, built in-process (no downloads)."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=512,
    initializer_range=0.2,  # spread-out logits: fewer near-ties for greedy comparisons
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
}


@functools.cache
def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


class ByteTokenizer:
    """A minimal tokenizer over the tiny vocab: token i>=3 is the byte (i - 3 + 32) printable ASCII."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [min(ord(c) - 32, 252) + 3 if ord(c) >= 32 else 3 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        out = []
        for i in ids:
            if i < 3:
                if not skip_special_tokens:
                    out.append(["<pad>", "<s>", "</s>"][i])
                continue
            out.append(chr(i - 3 + 32) if i - 3 + 32 < 127 else "?")
        return "".join(out)
