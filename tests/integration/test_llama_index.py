"""LlamaIndex EchoLLM on the real pipeline: every LLM method, and as ``Settings.llm`` in a query engine and in chat
engines over a small document set with the local embedder (no network). Agents with tools (FunctionAgent, the
ReAct chat engine) are in test_integration_tools.py, on a large model that can call tools.

LlamaIndex has no standard test suite, so each method gets a behaviour test. SmolLM2-135M is both the small and
the large model (transformers engine, for speed) with a fresh embedded Chroma store, shared by the module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler

from echo_middleware.integrations.llama_index import DecisionLog, EchoEmbedding, EchoLLM
from echo_middleware.pipeline import EchoPipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {"backend": "transformers", "model": "smollm2-135m-instruct"}
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def pipeline(
    tiny_model_dir: Path, embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EchoPipeline]:
    built = EchoPipeline.from_defaults(large=TINY, small=TINY, store={"path": str(tmp_path_factory.mktemp("li-store"))})
    yield built
    built.close_sync()


@pytest.fixture(scope="module")
def embed_model(embedder_dir: Path) -> EchoEmbedding:
    return EchoEmbedding()


@pytest.fixture
def llm(pipeline: EchoPipeline) -> EchoLLM:
    return EchoLLM(pipeline=pipeline, max_tokens=32)


def _user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=text)]


def test_chat_and_complete(llm: EchoLLM) -> None:
    chat = llm.chat(_user("Name a color."))
    assert chat.message.role == MessageRole.ASSISTANT
    assert chat.message.content.strip()
    decision = chat.additional_kwargs["decision"]
    assert decision["engine"].startswith("transformers:")
    assert chat.raw["usage"]["completion_tokens"] > 0
    completion = llm.complete("Name a fruit.")
    assert completion.text.strip()
    assert completion.additional_kwargs["completion_tokens"] > 0


def test_streams_add_up_to_the_answer(llm: EchoLLM) -> None:
    responses = list(llm.stream_chat(_user("Count from one to five in words.")))
    assert len(responses) > 2
    assert "".join(r.delta or "" for r in responses) == responses[-1].message.content
    assert "decision" in responses[-1].additional_kwargs
    completions = list(llm.stream_complete("Count from one to five in words."))
    assert "".join(r.delta or "" for r in completions) == completions[-1].text
    assert completions[-1].additional_kwargs["decision"]["request_id"]


async def test_async_methods(llm: EchoLLM) -> None:
    chat, completion = await asyncio.gather(llm.achat(_user("Say hello.")), llm.acomplete("Say goodbye."))
    assert chat.message.content.strip()
    assert completion.text.strip()
    deltas = [r.delta async for r in await llm.astream_chat(_user("Say hello."))]
    assert len(deltas) > 1
    completions = [r async for r in await llm.astream_complete("Say goodbye.")]
    assert "decision" in completions[-1].additional_kwargs


async def test_async_stream_cancel_reaches_the_engine(llm: EchoLLM, pipeline: EchoPipeline) -> None:
    stream = await llm.astream_complete("Write a very long story about a dragon.", max_tokens=400)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    for _ in range(100):
        if not pipeline.large_engine.in_flight() and not pipeline.small_engine.in_flight():
            break
        await asyncio.sleep(0.1)
    assert pipeline.large_engine.in_flight() == []
    assert pipeline.small_engine.in_flight() == []


def test_per_call_tenant_and_offload(llm: EchoLLM) -> None:
    first = llm.complete("What is the capital of Italy?", tenant="li-tenant-a", offload="never")
    assert first.additional_kwargs["decision"]["offloaded"] is False
    assert first.additional_kwargs["decision"]["mode"] == "never"
    again = llm.complete("What is the capital of Italy?", tenant="li-tenant-a")
    other = llm.complete("What is the capital of Italy?", tenant="li-tenant-b")
    decision = again.additional_kwargs["decision"]
    assert decision["offloaded"] is True, decision  # the same tenant has the example
    assert again.additional_kwargs["decision"]["examples"]
    assert other.additional_kwargs["decision"]["examples"] == []  # tenants do not see each other's examples


def test_embedding_is_local_and_normalised(embed_model: EchoEmbedding) -> None:
    vectors = embed_model.get_text_embedding_batch(["backups every six hours", "page the on-call engineer"])
    assert len(vectors) == 2
    assert len(vectors[0]) == 384
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-3
    query = embed_model.get_query_embedding("how often are backups taken?")
    sims = [sum(a * b for a, b in zip(query, v, strict=True)) for v in vectors]
    assert sims[0] > sims[1]


@pytest.fixture
def index(llm: EchoLLM, embed_model: EchoEmbedding) -> Iterator[VectorStoreIndex]:
    previous = (Settings._llm, Settings._embed_model)
    Settings.llm = llm
    Settings.embed_model = embed_model
    documents = SimpleDirectoryReader(str(DATA), required_exts=[".md"]).load_data()
    yield VectorStoreIndex.from_documents(documents)
    Settings._llm, Settings._embed_model = previous


def test_query_engine_retrieves_and_offloads_the_repeat(index: VectorStoreIndex, llm: EchoLLM) -> None:
    debug = LlamaDebugHandler()
    previous = Settings.callback_manager
    Settings.callback_manager = CallbackManager([debug])  # query engines hand theirs to the LLM
    decisions = DecisionLog.attach()
    try:
        engine = index.as_query_engine(similarity_top_k=1)
        first = engine.query("How often is the production database backed up?")
        assert str(first).strip()
        assert "backups.md" in first.source_nodes[0].node.metadata["file_name"]
        assert decisions.last is not None
        assert decisions.last["offloaded"] is False
        again = engine.query("How often is the production database backed up?")
        assert str(again).strip()
        assert decisions.last["offloaded"] is True
        assert decisions.last["examples"][0]["distance"] < 0.05
        assert len(debug.get_event_pairs(CBEventType.LLM)) == 2  # LlamaIndex's own callbacks saw both calls
    finally:
        decisions.detach()
        Settings.callback_manager = previous


async def test_async_query_engine(index: VectorStoreIndex) -> None:
    response = await index.as_query_engine(similarity_top_k=1).aquery("When does the on-call rotation change?")
    assert str(response).strip()
    assert "oncall.md" in response.source_nodes[0].node.metadata["file_name"]


def test_chat_engines(index: VectorStoreIndex) -> None:
    context = index.as_chat_engine(chat_mode="context", similarity_top_k=1)
    first = context.chat("Can I deploy to production on a Friday afternoon?")
    assert str(first).strip()
    assert first.source_nodes
    follow_up = context.chat("And in the last week of December?")
    assert str(follow_up).strip()
    condense = index.as_chat_engine(chat_mode="condense_plus_context", similarity_top_k=1)
    assert str(condense.chat("How do I roll back a release?")).strip()
    # The default mode ("best") needs llama-index-llms-openai installed whatever the LLM (llama-index-core
    # 0.12 imports it to choose the agent); for other LLMs it is "react", tested with a tool-capable model in
    # test_integration_tools.py.
