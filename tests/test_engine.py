"""Decode engine: greedy parity with HF generate, padding, n samples, stop strings, forcing, streaming."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from reference import full_forward_kv, ref_pool
from tiny import ByteTokenizer, tiny_model

from kvagents import Component, ForceTokens, KVEmbedding, KVModel, KVPooling, SamplingParams, StopSequence

ARCHS = ["llama", "qwen2", "qwen3"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]


def llm_for(arch: str) -> KVModel:
    return KVModel(tiny_model(arch), ByteTokenizer())


def hf_greedy(model, prompts, max_new):
    """HF generate on a left-padded batch; returns generated ids per row (pads stripped after EOS)."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=0, eos_token_id=2)
    rows = []
    for r in out[:, T:].tolist():
        if 2 in r:
            r = r[: r.index(2) + 1]
        rows.append(r)
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate_single_and_padded_batch(arch):
    llm = llm_for(arch)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    for p in PROMPTS:  # single prompts
        got = llm.generate([p], params).samples[0][0].token_ids
        assert got == hf_greedy(llm.model, [p], 12)[0]
    got = [g[0].token_ids for g in llm.generate(PROMPTS, params)]  # left-padded batch of 3
    assert got == hf_greedy(llm.model, PROMPTS, 12)


def test_stop_token_finishes_one_sequence_of_a_batch_like_hf():
    model = tiny_model("qwen2")
    llm = KVModel(model, ByteTokenizer())
    free = [g[0].token_ids for g in llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))]
    stop_tok = free[1][3]  # sequence 1 must stop at its 4th token
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop_tok])
    res = llm.generate(PROMPTS, params)
    got = [g[0].token_ids for g in res]
    T = max(len(p) for p in PROMPTS)
    ids = torch.zeros((3, T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0,
                         eos_token_id=[2, stop_tok])[:, T:].tolist()
    for g, h in zip(got, out):
        cut = next((k + 1 for k, t in enumerate(h) if t in (2, stop_tok)), len(h))
        assert g == h[:cut]
    assert res.samples[1][0].finish_reason == "stop" and got[1] == free[1][: free[1].index(stop_tok) + 1]


@pytest.mark.parametrize("arch", ["qwen3"])
def test_padding_invariance(arch):
    llm = llm_for(arch)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    short = [40, 41, 42]
    pooling = KVPooling(segment="all", layers=2)
    alone = llm.generate([short], params, components=[KVEmbedding(pooling)]).samples[0][0]
    batch = llm.generate([PROMPTS[2], short, PROMPTS[0]], params, components=[KVEmbedding(pooling)]).samples[1][0]
    assert alone.token_ids == batch.token_ids
    torch.testing.assert_close(alone.outputs["kv_embedding"], batch.outputs["kv_embedding"], rtol=1e-4, atol=1e-5)
    a = llm.embed([[40, 41, 42]])
    b = llm.embed([PROMPTS[2], [40, 41, 42]])[1]
    torch.testing.assert_close(a[0], b, rtol=1e-4, atol=1e-5)


class ForwardCounter:
    """Wraps model.forward and records the input length of each call."""

    def __init__(self, model):
        self.model, self.lengths = model, []
        self._orig = model.forward

        def counted(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.lengths.append(ids.shape[1])
            return self._orig(*args, **kwargs)

        model.forward = counted

    def close(self):
        del self.model.forward


def test_n_samples_seeded_reproducible_distinct_and_one_prefill():
    llm = llm_for("llama")
    prompt = PROMPTS[0]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, n=4, seed=123, ignore_eos=True)
    counter = ForwardCounter(llm.model)
    try:
        a = llm.generate([prompt], params)
        calls = list(counter.lengths)
    finally:
        counter.close()
    b = llm.generate([prompt], params)
    ta = [s.token_ids for s in a.samples[0]]
    assert ta == [s.token_ids for s in b.samples[0]]  # reproducible
    assert len({tuple(t) for t in ta}) == 4  # samples differ
    assert calls.count(len(prompt)) == 1  # the prompt is prefilled once for the 4 samples
    assert all(c == 1 for c in calls[1:]) and len(calls) == 16  # then one token per step (last token not fed)
    assert a.stats.forward_calls == 16
    c = llm.generate([prompt], params.model_copy(update={"seed": 7}))
    assert [s.token_ids for s in c.samples[0]] != ta


def test_sampling_respects_top_k_1_equals_greedy():
    llm = llm_for("qwen2")
    g = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=0)).samples[0][0].token_ids
    s = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=0.8, top_k=1, seed=1)).samples[0][0]
    assert s.token_ids == g


class ForceText(Component):
    """Forces a fixed token sequence into sequence 0 at step ``at``."""

    name = "force"

    def __init__(self, ids, at=0, index=0):
        self.ids, self.at, self.index = ids, at, index

    def on_step(self, view):
        if view.step == self.at:
            return [ForceTokens(self.index, self.ids)]
        return None


def test_forced_tokens_and_stop_string_across_token_boundaries():
    tok = ByteTokenizer()
    llm = KVModel(tiny_model("qwen3"), tok)
    forced = tok("hello END world")["input_ids"]  # one token per character: "END" spans three tokens
    params = SamplingParams(max_new_tokens=30, temperature=0, stop=["END"])
    res = llm.generate([PROMPTS[0]], params, components=[ForceText(forced, at=0)]).samples[0][0]
    # step 0 is sampled, steps 1.. are forced "hello END", cut before the stop string
    assert res.finish_reason == "stop"
    assert res.text.endswith("hello ")
    assert tok.decode(res.token_ids).endswith("hello END")  # token ids keep the token completing the match
    assert res.forced_tokens == len("hello END")
    assert res.generated_tokens == 1 + len("hello END")


def test_forced_tokens_counted_without_stop():
    tok = ByteTokenizer()
    llm = KVModel(tiny_model("llama"), tok)
    forced = tok("abc")["input_ids"]
    res = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True),
                       components=[ForceText(forced, at=2)]).samples[0][0]
    assert res.token_ids[3:6] == forced
    assert res.forced_tokens == 3 and res.generated_tokens == 8


def test_stream_deltas_concatenate_to_text_and_hide_stop_string():
    tok = ByteTokenizer()
    llm = KVModel(tiny_model("qwen3"), tok)
    forced = tok("one two STOP three")["input_ids"]
    params = SamplingParams(max_new_tokens=30, temperature=0, stop=["STOP"], n=2, seed=0)
    stream = llm.stream([PROMPTS[0]], params, components=[ForceText(forced, at=0, index=0)])
    texts: dict[tuple, str] = {}
    reasons = {}
    for ev in stream:
        key = (ev.prompt_index, ev.sample_index)
        texts[key] = texts.get(key, "") + ev.text
        assert "STOP" not in texts[key]
        if ev.finish_reason:
            reasons[key] = ev.finish_reason
    res = stream.result
    for s in res.samples[0]:
        assert texts[(0, s.sample_index)] == s.text
        assert reasons[(0, s.sample_index)] == s.finish_reason
    assert res.samples[0][0].text.endswith("one two ")


def test_on_text_callback_matches_result():
    llm = llm_for("llama")
    events = []
    res = llm.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(max_new_tokens=6, temperature=0), on_text=events.append)
    for p, group in enumerate(res.samples):
        assert "".join(e.text for e in events if e.prompt_index == p) == group[0].text


class StopAfter(Component):
    name = "stopper"

    def __init__(self, step):
        self.step = step

    def on_step(self, view):
        return [StopSequence(1, reason="enough")] if view.step == self.step else None


def test_component_stop_action_finishes_one_sequence():
    llm = llm_for("qwen2")
    res = llm.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True),
                       components=[StopAfter(3)])
    assert res.samples[1][0].finish_reason == "enough" and res.samples[1][0].generated_tokens == 4
    assert res.samples[0][0].finish_reason == "length" and res.samples[0][0].generated_tokens == 10


def test_max_new_tokens_zero():
    res = llm_for("llama").generate([PROMPTS[0]], SamplingParams(max_new_tokens=0))
    s = res.samples[0][0]
    assert s.token_ids == [] and s.finish_reason == "length" and s.text == ""


# ---- KV embeddings --------------------------------------------------------------------------------------------

POOLINGS = [
    KVPooling(layers=layers, part=part, positions=positions, heads=heads, layer_agg=agg, segment=segment, window=3)
    for (part, positions, segment), (heads, agg, layers) in itertools.product(
        itertools.product(["k", "v", "kv"], ["mean", "sum", "first", "last", "window"], ["prompt", "generated", "all"]),
        [("mean", "mean", 4), ("flatten", "flatten", [-1, 1]), ("flatten", "sum", 2), ("mean", "last", [0, 2]),
         ("mean", "stack", 3)],
    )
]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_in_loop_kv_embedding_equals_full_forward(arch):
    """Every pooling option x segment: incremental pooling == pooling of a fresh full forward's cache."""
    llm = llm_for(arch)
    prompts = [PROMPTS[0], PROMPTS[1]]
    comps = [KVEmbedding(p, name=f"e{i}") for i, p in enumerate(POOLINGS)]
    res = llm.generate(prompts, SamplingParams(max_new_tokens=9, temperature=1.0, n=2, seed=3), components=comps)
    for group in res.samples:
        for s in group:
            prompt = prompts[s.prompt_index]
            fed = s.token_ids[:-1]  # the last sampled token is never fed
            ks, vs = full_forward_kv(llm.model, prompt + fed)
            L = len(prompt)
            rows = {"prompt": list(range(L)), "generated": list(range(L, L + len(fed))),
                    "all": list(range(L + len(fed)))}
            for i, p in enumerate(POOLINGS):
                want = ref_pool(ks, vs, rows[p.segment], p)
                got = s.outputs[f"e{i}"].double().numpy()
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(p))


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_equals_reference_aggregation(arch):
    llm = llm_for(arch)
    texts = ["a short one", "a considerably longer text to embed", "mid length"]
    for p in [KVPooling(), KVPooling(layers=[-1], part="k", heads="flatten", normalize=False, positions="last"),
              KVPooling(layers=2, positions="window", window=4, layer_agg="flatten")]:
        got = llm.embed(texts, p, batch_size=2).double().numpy()
        for i, t in enumerate(texts):
            ids = ByteTokenizer()(t)["input_ids"]
            ks, vs = full_forward_kv(llm.model, ids)
            np.testing.assert_allclose(got[i], ref_pool(ks, vs, list(range(len(ids))), p), rtol=1e-4, atol=1e-5)


def test_default_pooling_is_papers_mean_of_kv_cat():
    llm = llm_for("qwen2")
    ids = [5, 6, 7, 8]
    ks, vs = full_forward_kv(llm.model, ids)
    want = np.mean([np.concatenate([k.mean(1).mean(0), v.mean(1).mean(0)]) for k, v in zip(ks[-4:], vs[-4:])], 0)
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(llm.embed([ids])[0].numpy(), want, rtol=1e-4, atol=1e-6)
    assert llm.embed([ids]).shape == (1, 2 * 16)


def test_eager_attention_backends_leave_out_cudnn_on_cuda_only(monkeypatch):
    from torch.nn.attention import SDPBackend

    from kvagents.engine.decode import eager_attention_backends

    monkeypatch.delenv("KVAGENTS_CUDNN_SDP", raising=False)
    assert eager_attention_backends("cpu") is None
    cuda = eager_attention_backends("cuda")
    assert SDPBackend.CUDNN_ATTENTION not in cuda and SDPBackend.FLASH_ATTENTION in cuda
    monkeypatch.setenv("KVAGENTS_CUDNN_SDP", "1")
    assert eager_attention_backends("cuda") is None
