"""LangChain's standard embeddings / vector store (sync + async) / retriever suites on kvagents' KV encoder and
index, plus what the suites do not pin: KV embeddings equal the encoder's, save / load without pickle, filters,
MMR, relevance scores."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_kvagents import KVEmbeddings, KVRetriever, KVVectorStore
from langchain_tests.integration_tests import (
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import EmbeddingsUnitTests

from kvagents import KVEncoder, KVPooling

pytestmark = pytest.mark.real_model

EMB = {"model": "smollm2-135m", "dtype": "float32", "device": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TestKVEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[KVEmbeddings]:
        return KVEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return dict(EMB)


class TestKVEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[KVEmbeddings]:
        return KVEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return dict(EMB)


class TestKVVectorStore(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self):
        store = KVVectorStore(self.get_embeddings())
        yield store
        store.delete()


class TestKVVectorStoreL2(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self):
        yield KVVectorStore(self.get_embeddings(), metric="l2")


DOCS = ["The moon orbits the earth.", "Cats purr when they are happy.", "Dogs bark at strangers.",
        "Python is a programming language.", "The sun is a star."]


class TestKVRetriever(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[KVRetriever]:
        return KVRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        store = KVVectorStore.from_texts(DOCS, KVEmbeddings(**EMB), ids=[f"d{i}" for i in range(len(DOCS))])
        return {"vectorstore": store}

    @property
    def retriever_query_example(self) -> str:
        return "What do cats do?"


# ---- beyond the suites -------------------------------------------------------------------------------------------


def test_kv_embeddings_equal_the_kv_encoder():
    emb = KVEmbeddings(**EMB)
    got = np.asarray(emb.embed_documents(DOCS[:3]))
    enc = KVEncoder(emb.encoder.model, KVPooling())
    want = enc.encode(DOCS[:3], normalize_embeddings=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert emb.embed_query(DOCS[0]) == pytest.approx(got[0].tolist(), abs=1e-6)


def test_store_search_matches_brute_force_and_filters():
    emb = DeterministicFakeEmbedding(size=16)
    texts = [f"text {i}" for i in range(30)]
    store = KVVectorStore.from_texts(texts, emb, metadatas=[{"even": i % 2 == 0, "i": i} for i in range(30)])
    q = emb.embed_query("query")
    V = np.asarray(emb.embed_documents(texts))
    sims = (V / np.linalg.norm(V, axis=1, keepdims=True)) @ (np.asarray(q) / np.linalg.norm(q))
    want = [texts[i] for i in np.argsort(-sims)[:5]]
    got = store.similarity_search_with_score("query", k=5)
    assert [d.page_content for d, _ in got] == want
    assert [s for _, s in got] == pytest.approx(sorted(sims, reverse=True)[:5], abs=1e-5)
    even = [i for i in np.argsort(-sims) if i % 2 == 0][:3]
    assert [d.metadata["i"] for d in store.similarity_search("query", k=3, filter={"even": True})] == even
    assert len(store.max_marginal_relevance_search("query", k=3, fetch_k=10)) == 3
    rel = store.similarity_search_with_relevance_scores("query", k=2)
    assert all(0.0 <= s <= 1.0 for _, s in rel)


def test_save_load_roundtrip_without_pickle(tmp_path, monkeypatch):
    emb = DeterministicFakeEmbedding(size=8)
    store = KVVectorStore.from_texts(["a", "b", "c"], emb, metadatas=[{"n": 1}, {"n": 2}, {"n": 3}], ids=["x", "y", "z"])

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "dumps", no_pickle)
    monkeypatch.setattr(pickle, "dump", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    store.save_local(tmp_path / "s")
    back = KVVectorStore.load_local(tmp_path / "s", emb)
    assert back.get_by_ids(["y"]) == [Document(id="y", page_content="b", metadata={"n": 2})]
    assert [d.id for d in back.similarity_search("b", k=3)] == [d.id for d in store.similarity_search("b", k=3)]


def test_retriever_modes_and_as_retriever():
    emb = DeterministicFakeEmbedding(size=8)
    store = KVVectorStore.from_texts([f"t{i}" for i in range(10)], emb, metadatas=[{"g": i % 3} for i in range(10)])
    r = store.as_retriever(k=2)
    assert isinstance(r, KVRetriever) and len(r.invoke("t1")) == 2
    assert r.invoke("t1")[0].page_content == "t1"
    assert all(d.metadata["g"] == 1 for d in r.invoke("t1", k=3, filter={"g": 1}))
    assert len(KVRetriever(vectorstore=store, k=3, search_type="mmr").invoke("t2")) == 3
    thr = KVRetriever(vectorstore=store, k=5, search_type="similarity_score_threshold",
                      search_kwargs={"score_threshold": 0.99})
    assert [d.page_content for d in thr.invoke("t4")] == ["t4"]
