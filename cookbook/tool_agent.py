"""A tool-using agent whose thinking is controlled by a KV classifier.

1. A tiny KV classifier is trained here, in seconds, on the prompt KV features of a dozen labelled questions
   (easy: 10, needs reasoning: 90). Real use: ``kvagents`` trains one on a benchmark (see ``kvagents.control.thinking``).
2. The agent: after the user's question the model must call a tool (grammar-constrained call,
   ``auto_tool_calls="after_user"``); the tool runs; then the question is asked again with the result in context
   and the classifier decides from that prompt's KV cache whether the model first thinks (slow, within a
   thinking budget; the end of thinking is forced when it is spent) or answers at once (fast).

Run: ``python -m cookbook.tool_agent``
"""

from __future__ import annotations

import tempfile

import torch
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from transformers import DynamicCache

from cookbook._common import chat
from kvagents.engine.decode import layer_info, left_pad
from kvagents.signals.kv_classifier import KVClassifier, KVClassifierConfig, prompt_window, window_features
from kvagents.signals.pooling import stack_layer_rows

EASY = ["Hi!", "What colour is the sky?", "Say hello.", "What is the capital of France?", "Name a fruit.",
        "Is water wet?"]
HARD = ["A train leaves at 3pm at 60 km/h and another at 4pm at 90 km/h; when does the second catch up?",
        "If 3 workers build a wall in 12 days, how long do 9 workers take, and why?",
        "Prove that the sum of two odd numbers is even.", "How many weekdays are there between March 3 and May 17?",
        "What is 17 * 23 - 144 / 12? Show the steps.", "Plan a 3-day trip with a budget of 500 euros and explain."]


def prompt_features(llm, prompts: list[list[int]], cfg: KVClassifierConfig) -> torch.Tensor:
    """The classifier's features of each prompt (token ids): its last ``window`` K/V rows, pooled (one prefill
    each)."""
    feats = []
    for ids in prompts:
        x, m, pos = left_pad([ids], llm.engine.pad_token_id, llm.device)
        cache = DynamicCache(config=llm.model.config)
        with torch.inference_mode(), llm._lock:
            llm.engine.prefill(x, m, pos, cache)
        info = layer_info(cache, llm.model.config)
        rows = stack_layer_rows(cache, cfg.resolve_layers(info.attention_layers, info.num_layers), cfg.part)
        feats.append(window_features(prompt_window(rows, m.sum(-1), cfg), cfg)[0])
    return torch.stack(feats)


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def main() -> dict:
    llm = chat(auto_tool_calls="after_user", max_tokens=96)
    cfg = KVClassifierConfig(layers=4, window=8, hidden=32)
    ask = "Using the tool result, answer: {}"

    def answering_turn(question, call, result):  # the prompt the answering model sees (same chat rendering)
        msgs = [HumanMessage(question), AIMessage("", tool_calls=[{**call, "id": "c0", "type": "tool_call"}]),
                ToolMessage(str(result), tool_call_id="c0", name=call["name"]), HumanMessage(ask.format(question))]
        return llm._prepare([msgs], None, {}).prompt_ids[0]

    # training prompts shaped like the agent's answering turn (a dummy call and result)
    dummy = {"name": "add", "args": {"a": 1, "b": 1}}
    x = prompt_features(llm.llm, [answering_turn(q, dummy, 2) for q in EASY + HARD], cfg)
    y = [10.0] * len(EASY) + [90.0] * len(HARD)
    clf, report = KVClassifier.fit(x, y, cfg, val_fraction=0.25, max_epochs=200)
    print(f"classifier: train accuracy {report['train_accuracy']:.2f}, val accuracy {report['val_accuracy']:.2f}")
    tools = {"multiply": multiply, "add": add}
    transcripts = []
    with tempfile.TemporaryDirectory() as tmp:
        clf.save(tmp)
        # the answering model: thinking decided by the classifier from the prompt's KV, budget 32 tokens
        answerer = llm.model_copy(update={"thinking": "auto", "kv_classifier": tmp, "max_thinking_tokens": 32})
        caller = llm.bind_tools(list(tools.values()))  # after a user turn a (grammar-constrained) call is required
        for question in ["A shop has 17 boxes of 23 apples. How many apples are there? Explain the steps.",
                         "Hi! What is 2 + 2?"]:
            messages = [HumanMessage(question)]
            call_msg = caller.invoke(messages)
            messages.append(call_msg)
            for call in call_msg.tool_calls:
                result = tools[call["name"]].invoke(call["args"])
                messages.append(ToolMessage(str(result), tool_call_id=call["id"], name=call["name"]))
            # re-ask with the tool result in context; the classifier reads this prompt's last KV rows
            messages.append(HumanMessage(ask.format(question)))
            final = answerer.invoke(messages)
            messages.append(final)
            info = final.response_metadata.get("reasoning", {})
            print(f"Q: {question}\n  tool calls: {[(c['name'], c['args']) for c in call_msg.tool_calls]} -> "
                  f"{[m.content for m in messages if isinstance(m, ToolMessage)]}\n"
                  f"  classifier: start={info.get('start')} difficulty={info.get('start_score'):.1f} "
                  f"thinking_tokens={info.get('thinking_tokens')} (budget 32)\n"
                  f"  reasoning: {final.additional_kwargs.get('reasoning_content', '')!r}\n  answer: {final.content!r}")
            transcripts.append(messages)
    return {"report": report, "transcripts": transcripts}


if __name__ == "__main__":
    main()
