"""Engine hook ``logits_processors``: shapes sampling only, sees the previous tokens, leaves components' logits raw;
the fast path runs them alike (between its forward and sampling graphs)."""

from __future__ import annotations

import pytest
import torch
from test_engine import PROMPTS, hf_greedy
from test_fast_decode import Forcer, assert_same_results, comps, fast_for
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, KVModel, SamplingParams
from kvagents.engine.decode import DecodeEngine
from kvagents.engine.fast_decode import FastDecodeEngine

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


# ---- the fast path runs the same processors (forward graph, processors on the host, head graph) ----------------


class Spy:
    """A processor that records what it was given and suppresses the odd byte tokens."""

    def __init__(self):
        self.seen = []

    def __call__(self, logits, prev_tokens, prev_valid):
        self.seen.append(None if prev_tokens is None else (prev_tokens.tolist(), prev_valid.tolist()))
        return suppress(logits, prev_tokens, prev_valid)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fast_path_runs_processors_like_the_eager_engine(arch):
    model = tiny_model(arch)
    eager = DecodeEngine(model, ByteTokenizer(), sync_every=3)
    fast = FastDecodeEngine(model, ByteTokenizer(), bucket=4, sync_every=3)
    free = [s.token_ids for s in eager.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0)).flat]
    masked = eager.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0), logits_processors=[suppress])
    rows = masked.flat
    stop_ids = [rows[0].token_ids[3], rows[2].token_ids[7]]  # rows finish early, at different steps
    stops = [rows[1].text[5:7]]  # a stop string completing mid-way
    for params in (SamplingParams(max_new_tokens=12, temperature=0, n=2),
                   SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stop_ids),
                   SamplingParams(max_new_tokens=12, temperature=0, stop=stops)):
        se, sf = Spy(), Spy()
        ref = eager.generate(PROMPTS, params, comps(), logits_processors=[se])
        got = fast.generate(PROMPTS, params, comps(), logits_processors=[sf])
        assert_same_results(ref, got)  # tokens, finish reasons, texts, components (raw logits) alike
        assert sf.seen == se.seen  # same calls with the same previous tokens and running flags
        assert all(t not in SUPPRESS for s in got.flat for t in s.token_ids)
        if params.stop_token_ids or params.stop:
            assert "stop" in [s.finish_reason for s in got.flat]
    assert [s.token_ids for s in masked.flat] != free  # the processor changed something


def test_fast_path_processors_with_forced_tokens_sampling_and_bad_output():
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=12, temperature=0)
    ref = DecodeEngine(model, ByteTokenizer()).generate(PROMPTS, params, [Forcer()], logits_processors=[suppress])
    fast = fast_for("llama")
    got = fast.generate(PROMPTS, params, [Forcer()], logits_processors=[suppress])
    assert_same_results(ref, got)
    assert got.flat[0].token_ids[3:6] == [50, 51, 52]  # forced (51 is suppressed): forcing wins, as in eager
    for s in (SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, n=3),
              SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=1, n=2)):
        a = fast.generate(PROMPTS, s, logits_processors=[suppress]).flat
        b = fast.generate(PROMPTS, s, logits_processors=[suppress]).flat
        assert [x.token_ids for x in a] == [x.token_ids for x in b]  # seeded: reproducible
        assert all(t not in SUPPRESS for x in a for t in x.token_ids)
    with pytest.raises(ValueError, match=r"must return logits of shape \(3, 256\)"):
        fast.generate(PROMPTS, params, logits_processors=[lambda x, p, v: x[:, :10]])
