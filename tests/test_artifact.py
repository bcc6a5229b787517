"""Trained-signal folders: a probe round-trips exactly, and is refused on another model, a newer format or a
corrupt file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import ByteTokenizer, tiny_model

from kvagents import KVModel, SamplingParams
from kvagents.signals.artifact import ArtifactError, ArtifactMismatchError, fingerprint
from kvagents.signals.probe import KVProbe, KVProbeScore, probe_pooling


def _probe(dim: int, seed: int = 0) -> KVProbe:
    rng = np.random.default_rng(seed)
    return KVProbe.fit(rng.normal(size=(60, dim)), rng.random(60) < 0.5, probe_pooling(4))


def test_fingerprint_tells_models_apart_and_is_stable():
    tok = ByteTokenizer()
    a, a_again, b = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    assert fingerprint(a, tok) == fingerprint(a_again, tok)
    assert fingerprint(a, tok) != fingerprint(b, tok)
    assert fingerprint(a, tok).differences(fingerprint(b, tok)) == ["weights_sample"]
    assert fingerprint(tiny_model("llama"), tok).architecture != fingerprint(a, tok).architecture


def test_fingerprint_matches_the_same_checkpoint_in_another_dtype_only():
    import torch

    tok = ByteTokenizer()
    a = tiny_model("qwen2", seed=0)
    f32 = fingerprint(a, tok)
    bf16 = fingerprint(tiny_model("qwen2", seed=0).to(torch.bfloat16), tok)
    f16 = fingerprint(tiny_model("qwen2", seed=0).to(torch.float16), tok)
    assert f32.matches(bf16) and f32.matches(f16) and bf16.matches(f32)
    nudged = tiny_model("qwen2", seed=0)
    with torch.no_grad():
        next(nudged.parameters()).mul_(1.05)  # a fine-tuned copy: same shapes, other weights
    assert f32.differences(fingerprint(nudged, tok)) == ["weights_sample"]
    old = f32.model_copy(update={"weights_sample": []})  # a fingerprint of the first format: hash only
    assert old.matches(f32.model_copy(update={"weights_sample": []}))
    assert "weights_sha256" in old.differences(fingerprint(tiny_model("qwen2", seed=1), tok).model_copy(
        update={"weights_sample": []}))


def test_probe_round_trip_is_exact_and_refused_on_another_model(tmp_path):
    tok = ByteTokenizer()
    trained_on, other = KVModel(tiny_model("qwen2", seed=0), tok), KVModel(tiny_model("qwen2", seed=1), tok)
    probe = _probe(4 * 32)
    folder = probe.save(tmp_path / "probe", trained_on, training={"rows": 60}, metrics={"auroc": 0.5})
    x = np.random.default_rng(3).normal(size=(10, 4 * 32))
    again = KVProbe.load(folder, trained_on)
    np.testing.assert_array_equal(again.predict(x), probe.predict(x))
    assert again.metadata["training"] == {"rows": 60} and again.metadata["metrics"] == {"auroc": 0.5}
    with pytest.raises(ArtifactMismatchError, match="trained on Qwen2ForCausalLM.*not on the model in use"):
        KVProbe.load(folder, other)
    assert KVProbe.load(folder).config == probe.config  # no model given: not checked


def test_probe_folder_refuses_newer_format_wrong_kind_and_corruption(tmp_path):
    folder = _probe(8).save(tmp_path / "p")
    meta = json.loads((folder / "artifact.json").read_text())
    (folder / "artifact.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        KVProbe.load(folder)
    (folder / "artifact.json").write_text(json.dumps({**meta, "kind": "router"}))
    with pytest.raises(ArtifactError, match="holds a 'router', not a 'kv_probe'"):
        KVProbe.load(folder)
    (folder / "artifact.json").write_text(json.dumps(meta))
    (folder / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="missing or corrupt"):
        KVProbe.load(folder)
    with pytest.raises(ArtifactError, match="no artifact.json"):
        KVProbe.load(tmp_path / "nothing-here")


def test_saving_again_replaces_the_folder_whole(tmp_path):
    folder = _probe(8, seed=0).save(tmp_path / "p")
    second = _probe(8, seed=1)
    second.save(folder)
    x = np.ones((1, 8))
    np.testing.assert_array_equal(KVProbe.load(folder).predict(x), second.predict(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary or old folder left


def test_probe_component_refuses_a_model_with_other_feature_size():
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    wrong = _probe(4 * 32 + 1)
    with pytest.raises(ArtifactError, match="reads 129 features but this model gives 128"):
        llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3), components=[KVProbeScore(wrong)])
