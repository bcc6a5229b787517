"""``kvagents serve``: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

``create_app(llm)`` builds the FastAPI app (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/models``, ``/health``); ``serve(llm, host, port)`` runs it with uvicorn. Needs the ``serve`` extra
(``pip install 'kvagents[serve]'``: fastapi, uvicorn).

Example:
    >>> from kvagents.serving import create_app  # doctest: +SKIP
    >>> app = create_app(KVModel.from_pretrained("qwen2.5-coder-0.5b"), max_rows=8)  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
