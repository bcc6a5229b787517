"""Retrieval-augmented answering over a KV-embedding vector store: the same local model embeds the documents
(pooled KV cache of one prefill), retrieves with a KVRetriever and answers from the retrieved context.

Run: ``python -m cookbook.rag``
"""

from __future__ import annotations

import tempfile

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_kvagents import KVVectorStore

from cookbook._common import chat, embeddings

DOCS = [
    Document(id="moon", page_content="The Moon orbits the Earth once every 27 days.", metadata={"topic": "space"}),
    Document(id="sun", page_content="The Sun is a star at the centre of the Solar System.", metadata={"topic": "space"}),
    Document(id="cat", page_content="Cats purr when they are content and sometimes when stressed.",
             metadata={"topic": "animals"}),
    Document(id="dog", page_content="Dogs bark to warn their owners of strangers.", metadata={"topic": "animals"}),
    Document(id="tea", page_content="Green tea is made from unoxidised leaves of Camellia sinensis.",
             metadata={"topic": "food"}),
]


def main() -> dict:
    store = KVVectorStore(embeddings())
    store.add_documents(DOCS)
    with tempfile.TemporaryDirectory() as tmp:  # saved without pickle, loaded back
        store.save_local(tmp)
        store = KVVectorStore.load_local(tmp, store.embeddings)
    retriever = store.as_retriever(k=2)

    def fmt(docs):
        return "\n".join(f"- {d.page_content}" for d in docs)

    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer the question using only this context:\n{context}"),
        ("human", "{question}"),
    ])
    rag = {"context": retriever | fmt, "question": RunnablePassthrough()} | prompt | chat() | StrOutputParser()
    question = "Why do cats purr?"
    hits = retriever.invoke(question)
    print("retrieved:", [(d.id, round(d.metadata["score"], 3)) for d in hits])
    answer = rag.invoke(question)
    print("answer:", answer)
    animals = store.similarity_search("pets", k=2, filter={"topic": "animals"})
    return {"hits": hits, "answer": answer, "animals": animals}


if __name__ == "__main__":
    main()
