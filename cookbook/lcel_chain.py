"""An LCEL chain on a local model: prompt | ChatKV | parser, streaming, batching, and a structured extraction.

Run: ``python -m cookbook.lcel_chain``
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel, Field

from cookbook._common import chat


class City(BaseModel):
    """A city and the country it is in."""

    city: str = Field(description="the city's name")
    country: str = Field(description="the country the city is in")


def main() -> dict:
    llm = chat()
    prompt = ChatPromptTemplate.from_messages([("system", "You answer in one short sentence."), ("human", "{question}")])
    chain = prompt | llm | StrOutputParser()

    answer = chain.invoke({"question": "What is the capital of France?"})
    print("invoke:", answer)
    streamed = "".join(chain.stream({"question": "Name a colour of the sky."}))
    print("stream:", streamed)
    batch = chain.batch([{"question": "Say hello."}, {"question": "Say goodbye."}])  # one batched engine call
    print("batch:", batch)

    extract = ChatPromptTemplate.from_messages([("human", "Extract the city and country: {text}")]) | (
        llm.with_structured_output(City)
    )
    city = extract.invoke({"text": "I flew to Tokyo, Japan last spring."})
    print("structured:", city)
    return {"answer": answer, "streamed": streamed, "batch": batch, "city": city}


if __name__ == "__main__":
    main()
