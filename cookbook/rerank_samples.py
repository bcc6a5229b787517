"""Rerank sampled answers inside a chain: N samples in one engine call (one prefill), scored in the decode loop
(DeepConf's lowest group confidence and the KV chain-of-embedding score), the best one returned with every
candidate's scores in its metadata.

Run: ``python -m cookbook.rerank_samples``
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_kvagents import KVBestOfN

from cookbook._common import chat
from kvagents.signals.scoring import LayerCoE, ProbabilityScores


def main() -> dict:
    llm = chat(temperature=0.8, seed=0, max_tokens=40)
    bon = KVBestOfN(llm=llm, n=4, rule="argmax", score="kv_coe_layer_r", scorers=[ProbabilityScores(), LayerCoE()])
    prompt = ChatPromptTemplate.from_messages([("human", "{question} Answer in one sentence.")])
    chain = prompt | bon
    msg = chain.invoke({"question": "Why do cats purr?"})
    for c in msg.response_metadata["candidates"]:
        mark = "*" if c["index"] == msg.response_metadata["chosen_index"] else " "
        print(f"{mark} [{c['index']}] CoE-R={c['scores']['kv_coe_layer_r']:.3f} "
              f"conf={c['scores']['lowest_group_confidence']:.3f}  {c['text'][:70]!r}")
    print("chosen:", msg.content, "|", msg.response_metadata["note"])
    text = (chain | StrOutputParser()).invoke({"question": "What is rain?"})
    return {"message": msg, "text": text}


if __name__ == "__main__":
    main()
