"""Runnable LangChain examples over kvagents (each runs offline on the embedded smollm2-135m: `python -m cookbook.<name>`)."""
