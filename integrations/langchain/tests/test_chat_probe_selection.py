"""ChatKV(select_by="kv_probe" / "kv_probe_vote"): samples scored by a trained KV probe, the vote weighted by it."""

# ruff: noqa: F811  (pytest fixtures imported from lc_tiny are parameters of the tests)

from __future__ import annotations

import numpy as np
import pytest
from langchain_core.messages import HumanMessage
from langchain_kvagents import ChatKV
from lc_tiny import tiny_dir  # noqa: F401 - fixture

from kvagents import KVModel
from kvagents.signals.probe import KVProbe, probe_pooling


def _probe_folder(model_dir, out, seed=0):
    llm = KVModel.from_pretrained(str(model_dir), dtype="float32", device="cpu").load()
    cfg = llm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dim = cfg.num_hidden_layers * 2 * head_dim
    rng = np.random.default_rng(seed)
    probe = KVProbe.fit(rng.normal(size=(80, dim)), rng.random(80) < 0.5, probe_pooling(cfg.num_hidden_layers))
    return probe.save(out, llm)


def test_probe_vote_picks_the_answer_with_the_largest_summed_probability(tiny_dir, tmp_path):
    folder = _probe_folder(tiny_dir, tmp_path / "probe")
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", n=6, temperature=1.5, seed=3, max_tokens=2,
                  select_by="kv_probe_vote", probe=str(folder), vote_parser=lambda t: t[:1] or None)
    gens = chat.generate([[HumanMessage("Hello")]]).generations[0]
    assert len(gens) == 6
    md = [g.message.response_metadata for g in gens]
    assert sum(m["chosen"] for m in md) == 1 and md[0]["chosen"]
    p = {m["sample_index"]: m["scores"]["kv_probe"] for m in md}
    assert all(0 < v < 1 for v in p.values())
    tally: dict = {}  # recomputed by hand from what came back
    for m in md:
        if m["answer"] is not None:
            tally[m["answer"]] = tally.get(m["answer"], 0.0) + m["scores"]["kv_probe"]
    assert md[0]["answer"] == max(tally, key=tally.get)
    same = [m for m in md if m["answer"] == md[0]["answer"]]
    assert md[0]["scores"]["kv_probe"] == max(m["scores"]["kv_probe"] for m in same)
    assert md[0]["votes"][md[0]["answer"]] == pytest.approx(tally[md[0]["answer"]])


def test_probe_argmax_and_refusals(tiny_dir, tmp_path):
    folder = _probe_folder(tiny_dir, tmp_path / "probe")
    chat = ChatKV(model=tiny_dir, dtype="float32", device="cpu", n=4, temperature=1.5, seed=1, max_tokens=2,
                  select_by="kv_probe", probe=str(folder))
    md = [g.message.response_metadata for g in chat.generate([[HumanMessage("Hi")]]).generations[0]]
    assert md[0]["scores"]["kv_probe"] == max(m["scores"]["kv_probe"] for m in md)
    with pytest.raises(ValueError, match="none ships for"):  # no probe given and none for this model
        ChatKV(model=tiny_dir, dtype="float32", device="cpu", n=2, max_tokens=2,
               select_by="kv_probe_vote").invoke("Hi")
    # a probe trained on another model (same shapes, other weights: a fine-tuned copy) is refused
    import torch

    from kvagents.signals.artifact import ArtifactError

    tuned = KVModel.from_pretrained(str(tiny_dir), dtype="float32", device="cpu").load()
    with torch.no_grad():
        next(tuned.model.parameters()).mul_(1.05)
    wrong = KVProbe.load(folder).save(tmp_path / "wrong", tuned)
    with pytest.raises(ArtifactError, match="not on the model in use"):
        ChatKV(model=tiny_dir, dtype="float32", device="cpu", n=2, max_tokens=2, select_by="kv_probe",
               probe=str(wrong)).invoke("Hi")


def test_kv_best_of_n_weighs_the_vote_by_the_probe(tiny_dir, tmp_path):
    from langchain_kvagents import KVBestOfN

    folder = _probe_folder(tiny_dir, tmp_path / "probe")
    llm = ChatKV(model=tiny_dir, dtype="float32", device="cpu", temperature=1.5, seed=2, max_tokens=2)
    bon = KVBestOfN(llm=llm, n=6, rule="weighted", score="kv_probe", probe=str(folder),
                    parser=lambda t: t[:1] or None)
    md = bon.invoke("Hello").response_metadata
    tally: dict = {}
    for c in md["candidates"]:
        assert 0 < c["scores"]["kv_probe"] < 1
        if c["answer"] is not None:
            tally[c["answer"]] = tally.get(c["answer"], 0.0) + c["scores"]["kv_probe"]
    chosen = md["candidates"][md["chosen_index"]]
    assert chosen["answer"] == max(tally, key=tally.get)
