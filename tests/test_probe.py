import numpy as np
import pytest
import torch
from tiny import ByteTokenizer, tiny_model

from kvagents import KVEmbedding, KVModel, SamplingParams
from kvagents.signals.probe import KVProbe, KVProbeScore, probe_pooling


def test_probe_learns_separable_features_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32))
    margin = x[:, 3] - 0.5 * x[:, 7]
    x, margin = x[np.abs(margin) > 0.2][:400], margin[np.abs(margin) > 0.2][:400]  # separable with a margin
    y = (margin > 0).astype(float)
    probe = KVProbe.fit(x[:300], y[:300], probe_pooling(4))
    acc = ((probe.predict(x[300:]) > 0.5) == y[300:]).mean()
    assert acc >= 0.95
    again = KVProbe.load(probe.save(tmp_path / "p"))
    np.testing.assert_allclose(again.predict(x[300:]), probe.predict(x[300:]), rtol=1e-6)
    with pytest.raises(ValueError, match="expects 32 features, got 5"):
        probe.predict(x[:, :5])
    with pytest.raises(ValueError, match="both classes"):
        KVProbe.fit(x, np.ones(400), probe_pooling(4))


def test_probe_component_scores_equal_offline_prediction():
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    pooling = probe_pooling(4)
    rng = np.random.default_rng(1)
    probe = KVProbe.fit(rng.normal(size=(50, 4 * 32)), rng.random(50) < 0.5, pooling)
    emb = KVEmbedding(pooling, name="feat")
    res = llm.generate([[5, 6, 7], [9, 10]], SamplingParams(max_new_tokens=6, n=2, seed=0),
                       components=[emb, KVProbeScore(probe)])
    for s in res.flat:
        want = probe.predict(s.outputs["feat"][None].numpy())[0]
        assert s.outputs["kv_probe"]["kv_probe"] == pytest.approx(float(want), rel=1e-5)
    assert torch.is_tensor(res.flat[0].outputs["feat"])
