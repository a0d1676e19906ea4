"""Tool calls and structured output through both front doors, on a local large model that can call tools.

Qwen2.5-Coder-0.5B-Instruct is the large model (it is trained on the ``<tool_call>`` format the adapters use) and
SmolLM2-135M the small one. Tool calls are never offloaded: every decision here must say the large model answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from echo_middleware.errors import ModelNotFound
from echo_middleware.integrations.langchain import EchoChatModel
from echo_middleware.integrations.llama_index import EchoLLM
from echo_middleware.models import model_path
from echo_middleware.pipeline import EchoPipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QWEN = "qwen2.5-coder-0.5b-instruct"
CALLS: list[tuple[int, int]] = []


@pytest.fixture(scope="module")
def pipeline(
    tiny_model_dir: Path, embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EchoPipeline]:
    try:
        model_path(QWEN)
    except ModelNotFound as exc:
        pytest.skip(f"{exc} (`make test` fetches it: echo-middleware models fetch --test-models)")
    built = EchoPipeline.from_defaults(
        large={"backend": "transformers", "model": QWEN, "dtype": "float32"},
        small={"backend": "transformers", "model": "smollm2-135m-instruct"},
        store={"path": str(tmp_path_factory.mktemp("tools-store"))},
    )
    yield built
    built.close_sync()


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    CALLS.append((a, b))
    return a * b


class Person(BaseModel):
    """A person mentioned in a text."""

    name: str = Field(description="The person's first name")
    age: int = Field(description="The person's age in years")


QUESTION = "What is 6 times 7? Use the multiply tool."


def test_langchain_tool_call_goes_to_the_large_model(pipeline: EchoPipeline) -> None:
    llm = EchoChatModel(pipeline=pipeline, max_tokens=64)
    message = llm.bind_tools([multiply]).invoke(QUESTION)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("multiply", {"a": 6, "b": 7})]
    decision = message.response_metadata["decision"]
    assert decision["offloaded"] is False
    assert decision["engine"] == pipeline.large_engine.name


def test_langchain_agent_loop_uses_the_tool_result(pipeline: EchoPipeline) -> None:
    llm = EchoChatModel(pipeline=pipeline, max_tokens=64).bind_tools([multiply])
    history = [HumanMessage(QUESTION)]
    first = llm.invoke(history)
    assert first.tool_calls
    history += [first, *(ToolMessage(str(multiply.invoke(c["args"])), tool_call_id=c["id"]) for c in first.tool_calls)]
    final = llm.invoke(history)
    assert "42" in final.text
    assert not final.tool_calls


def test_langchain_structured_output(pipeline: EchoPipeline) -> None:
    llm = EchoChatModel(pipeline=pipeline, max_tokens=64)
    person = llm.with_structured_output(Person).invoke("Extract the person: Alice is 30 years old.")
    assert person == Person(name="Alice", age=30)


async def test_langchain_tool_call_async_stream(pipeline: EchoPipeline) -> None:
    llm = EchoChatModel(pipeline=pipeline, max_tokens=64).bind_tools([multiply], tool_choice="multiply")
    chunks = [c async for c in llm.astream(QUESTION)]
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.tool_calls[0]["args"] == {"a": 6, "b": 7}


async def test_llama_index_function_agent(pipeline: EchoPipeline) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    def multiply_numbers(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        CALLS.append((a, b))
        return a * b

    CALLS.clear()
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=multiply_numbers)],
        llm=EchoLLM(pipeline=pipeline, max_tokens=64),
        system_prompt="You are a calculator. Use the tools for arithmetic.",
    )
    response = await asyncio.wait_for(agent.run(user_msg="What is 6 times 7? Use the multiply_numbers tool."), 600)
    assert CALLS == [(6, 7)]
    assert "42" in str(response)


def test_llama_index_react_agent_with_a_query_engine_tool(pipeline: EchoPipeline, embedder_dir: Path) -> None:
    """A ReAct agent over a query-engine tool: what ``as_chat_engine()`` builds for a non-OpenAI LLM.

    (``as_chat_engine`` itself needs llama-index-llms-openai installed in llama-index-core 0.12, whatever the LLM.)
    """
    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.agent import ReActAgent
    from llama_index.core.tools import QueryEngineTool

    from echo_middleware.integrations.llama_index import EchoEmbedding

    data = Path(__file__).resolve().parents[2] / "examples" / "data"
    llm = EchoLLM(pipeline=pipeline, max_tokens=128)
    documents = SimpleDirectoryReader(str(data), required_exts=[".md"]).load_data()
    index = VectorStoreIndex.from_documents(documents, embed_model=EchoEmbedding())
    tool = QueryEngineTool.from_defaults(
        index.as_query_engine(llm=llm, similarity_top_k=1),
        name="handbook",
        description="Answers questions about the company handbook: backups, on-call, deploys.",
    )
    agent = ReActAgent.from_tools([tool], llm=llm, max_iterations=6)
    response = agent.chat("How long are database backups kept?")
    assert str(response).strip()
    # The agent loop ran through EchoLLM: it called the tool, which retrieved the right document. The wording of
    # the final answer is the 0.5B model's (one run said "30 days" for the handbook's 35), so it is not checked.
    assert [s.tool_name for s in response.sources] == ["handbook"] * len(response.sources)
    assert response.sources
    nodes = response.sources[0].raw_output.source_nodes
    assert nodes[0].node.metadata["file_name"] == "backups.md"
