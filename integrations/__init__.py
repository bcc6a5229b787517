"""Adapters of kvagents to other frameworks (kvagents itself stays framework-free).

* :mod:`integrations.langchain_kvagents`: LangChain chat model, embeddings, vector store, retriever, runnables.
"""
