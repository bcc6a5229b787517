"""Models spread over devices, on the CPU: layers on several (simulated) GPUs, and tensor parallelism under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import ByteTokenizer, tiny_model

import kvagents.engine.devices as devices
from kvagents import KVEmbedding, KVModel, KVPooling, SamplingParams
from kvagents.signals.scoring import LayerCoE, TokenCoE

HERE = Path(__file__).resolve().parent


def _generate(llm):
    comps = [KVEmbedding(KVPooling(segment="all"), name="mean"),
             KVEmbedding(KVPooling(heads="flatten", layer_agg="flatten", segment="generated"), name="flat"),
             KVEmbedding(KVPooling(positions="window", window=3, segment="all", part="v"), name="win"),
             LayerCoE(), TokenCoE()]
    res = llm.generate(["hello there", "ab"], SamplingParams(max_new_tokens=6, n=2, temperature=1.0, seed=3),
                       components=comps)
    return [(s.token_ids, {k: v for k, v in s.outputs.items()}) for g in res.samples for s in g]


def test_layers_on_several_devices_equal_one_device(monkeypatch):
    """Layers 0-1 on 'cuda:0', 2-3 on 'cuda:1' (simulated): one stack + one move per device run, results equal."""
    llm = KVModel(tiny_model("llama"), ByteTokenizer())
    want = _generate(llm)
    fake = {}
    moves = []

    def device_of(t):
        return fake.get(t.data_ptr(), t.device)

    def move(x, device):
        moves.append(tuple(x.shape))
        return x

    def assign(cache):
        for i, layer in enumerate(cache.layers):
            fake[layer.keys.data_ptr()] = torch.device(f"cuda:{i // 2}")

    real_gather = devices.gather_layer_rows

    def gather(cache, layers, part, rows=None, **kw):
        assign(cache)  # the cache grows (new storage): label the current tensors
        return real_gather(cache, layers, part, rows, **kw)

    monkeypatch.setattr(devices, "device_of", device_of)
    monkeypatch.setattr(devices, "move", move)
    monkeypatch.setattr(devices, "gather_layer_rows", gather)
    got = _generate(llm)
    for (t1, o1), (t2, o2) in zip(want, got):
        assert t1 == t2
        for k in o1:
            if isinstance(o1[k], torch.Tensor):
                torch.testing.assert_close(o1[k], o2[k], rtol=1e-5, atol=1e-6)
            else:
                assert o1[k] == pytest.approx(o2[k], rel=1e-5, abs=1e-6), k
    assert moves, "nothing went through the per-device path"
    # heads="mean" moves [B, nL, P, 1, d] blocks: the heads were averaged before leaving their device
    assert any(len(s) == 5 and s[3] == 1 for s in moves)
    # every move is one block of at most 2 layers (one run per device), never the whole 4-layer stack
    assert all(s[1] <= 2 for s in moves)


def test_gather_layer_rows_equals_torch_stack():
    llm = KVModel(tiny_model("qwen2"), ByteTokenizer())
    from transformers import DynamicCache

    cache = DynamicCache(config=llm.model.config)
    from kvagents.engine.decode import _cache_kwarg  # "cache" on newer transformers ("past_key_values" is deprecated)

    llm.model(torch.tensor([[5, 6, 7, 8]]), use_cache=True, **{_cache_kwarg(llm.model): cache})
    layers = [0, 2, 3]
    want = torch.stack([torch.stack([cache.layers[i].keys for i in layers], 1),
                        torch.stack([cache.layers[i].values for i in layers], 1)], 2)
    torch.testing.assert_close(devices.gather_layer_rows(cache, layers, "kv"), want, rtol=0, atol=0)
    torch.testing.assert_close(devices.gather_layer_rows(cache, layers, "kv", heads="mean"),
                               want.mean(3, keepdim=True))
    torch.testing.assert_close(devices.gather_layer_rows(cache, layers, "v", rows=-1), want[:, :, 1:, :, -1])
    with pytest.raises(ValueError, match="part"):
        devices.gather_layer_rows(cache, layers, "q")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_tensor_parallel_under_torchrun_equals_one_process(tmp_path):
    """transformers tp_plan='auto' on 2 CPU ranks (gloo): heads are split across ranks; tokens, in-loop KV
    embeddings and embed() equal the single-process run; sampled tokens agree across ranks."""
    model = tiny_model("qwen2")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    out = tmp_path / "tp.json"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", str(HERE / "tp_worker.py"),
                           str(model_dir), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp = json.loads(out.read_text())
    sys.path.insert(0, str(HERE))
    from tp_worker import run

    one = run(KVModel(model, ByteTokenizer()))
    assert tp["tokens"] == one["tokens"]
    for k in one["emb"]:
        torch.testing.assert_close(torch.tensor(tp["emb"][k]), torch.tensor(one["emb"][k]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(tp["embed"]), torch.tensor(one["embed"]), rtol=1e-4, atol=1e-5)
    assert tp["sampled_per_rank"][0] == tp["sampled_per_rank"][1]


def test_device_map_and_tp_plan_are_exclusive_and_fast_path_refuses_split_models(monkeypatch):
    with pytest.raises(ValueError, match="not both"):
        KVModel.from_pretrained("smollm2-135m", device_map="auto", tp_plan="auto")
    llm = KVModel(tiny_model("llama"), ByteTokenizer())
    monkeypatch.setattr(type(llm.model), "tp_size", 2, raising=False)
    with pytest.raises(NotImplementedError, match="fast=False"):
        llm.fast_engine  # noqa: B018
