"""Engine hook ``logits_processors``: shapes sampling only, sees the previous tokens, leaves components' logits raw."""

from __future__ import annotations

import torch
from test_engine import PROMPTS, hf_greedy
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, KVModel, SamplingParams

SUPPRESS = list(range(3, 256, 2))  # every odd byte token


def suppress(logits, prev_tokens, prev_valid):
    out = logits.clone()
    out[:, SUPPRESS] = float("-inf")
    return out


def test_processor_equals_hf_suppress_tokens_on_a_padded_batch():
    llm = KVModel(tiny_model("llama"), ByteTokenizer())
    got = [g[0].token_ids for g in llm.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0),
                                                   logits_processors=[suppress])]
    T = max(len(p) for p in PROMPTS)
    ids = torch.zeros((len(PROMPTS), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    out = llm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0,
                             eos_token_id=2, suppress_tokens=SUPPRESS)
    want = []
    for r in out[:, T:].tolist():
        want.append(r[: r.index(2) + 1] if 2 in r else r)
    assert got == want
    assert got != hf_greedy(llm.model, PROMPTS, 10)  # the processor changed something
    assert all(t not in SUPPRESS for row in got for t in row)


class RawLogits(Component):
    name = "raw"

    def on_prefill(self, view):
        self.max_logit_token = []

    def on_step(self, view):
        self.max_logit_token.append(view.logits.argmax(-1).clone())


def test_processor_sees_previous_tokens_and_components_see_raw_logits():
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    seen = []

    def spy(logits, prev_tokens, prev_valid):
        seen.append(None if prev_tokens is None else (prev_tokens.tolist(), prev_valid.tolist()))
        return suppress(logits, prev_tokens, prev_valid)

    raw = RawLogits()
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    res = llm.generate([PROMPTS[0]], params, components=[raw], logits_processors=[spy])
    toks = res.samples[0][0].token_ids
    assert seen[0] is None
    assert [s[0][0] for s in seen[1:]] == toks[:-1]
    free = llm.generate([PROMPTS[0]], params).samples[0][0].token_ids
    assert raw.max_logit_token[0].item() == free[0]  # step 0: raw logits, not the masked ones
    assert free[0] in SUPPRESS or toks[0] == free[0]


def test_processor_applies_to_streams_and_sampling():
    llm = KVModel(tiny_model("qwen3"), ByteTokenizer())
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, n=3)
    stream = llm.stream([PROMPTS[1]], params, logits_processors=[suppress])
    list(stream)
    assert all(t not in SUPPRESS for s in stream.result.flat for t in s.token_ids)
