"""LlamaIndex EchoLLM maps every LLM method onto pipeline requests and answers back (on a recording pipeline).

Checked here: each sync/async/streaming method, the decision in ``additional_kwargs`` and ``raw``, per-call
options, instrumentation (callback manager events and dispatcher events feeding DecisionLog), tool calls on the
local path and delegation to a wrapped function-calling LLM. The real pipeline runs in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from fake_pipeline import FakePipeline
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.callbacks import CallbackManager, CBEventType
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.llms import MockLLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import FunctionTool
from pydantic import Field

from echo_middleware._sync import background_loop
from echo_middleware.errors import ConfigError
from echo_middleware.integrations.llama_index import (
    DecisionLog,
    EchoEmbedding,
    EchoLLM,
    LlamaIndexEngine,
    to_echo_messages,
)


class EventRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.starts: list[CBEventType] = []
        self.ends: list[tuple[CBEventType, Any]] = []

    def on_event_start(self, event_type: CBEventType, payload: Any = None, event_id: str = "", **kw: Any) -> str:
        self.starts.append(event_type)
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: Any = None, event_id: str = "", **kw: Any) -> None:
        self.ends.append((event_type, payload))

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(self, trace_id: str | None = None, trace_map: Any = None) -> None:
        return None


def _user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=text)]


def _llm(pipe: FakePipeline, **kwargs: Any) -> EchoLLM:
    return EchoLLM(pipeline=pipe, **kwargs)


def test_chat_and_complete_carry_the_decision() -> None:
    pipe = FakePipeline()
    llm = _llm(pipe, tenant="acme", max_tokens=40)
    response = llm.chat([ChatMessage(role="system", content="s"), *_user("hello")])
    assert response.message.content == "echo: hello"
    assert response.message.role == MessageRole.ASSISTANT
    assert response.additional_kwargs["decision"]["offloaded"] is True
    assert response.additional_kwargs["prompt_tokens"] == 7
    assert response.raw["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    completion = llm.complete("plain prompt")
    assert completion.text == "echo: plain prompt"
    assert completion.additional_kwargs["decision"]["engine"] == "small"
    first, second = pipe.requests
    assert [(m.role, m.content) for m in first.messages] == [("system", "s"), ("user", "hello")]
    assert [(m.role, m.content) for m in second.messages] == [("user", "plain prompt")]
    assert {r.tenant for r in pipe.requests} == {"acme"}
    assert {r.params.max_tokens for r in pipe.requests} == {40}


def test_per_call_options() -> None:
    pipe = FakePipeline()
    llm = _llm(pipe, offload="auto")
    llm.chat(_user("x"), tenant="beta", offload="never", slo={"latency_s": 2.0}, temperature=0.5, stop=["Q:"])
    llm.complete("y", formatted=True, offload="always")
    first, second = pipe.requests
    assert (first.tenant, first.offload, first.slo.latency_s) == ("beta", "never", 2.0)
    assert (first.params.temperature, first.params.stop) == (0.5, ["Q:"])
    assert second.offload == "always"
    with pytest.raises(ConfigError, match="temprature"):
        llm.chat(_user("x"), temprature=1)


def test_streams_build_up_and_end_with_the_decision() -> None:
    pipe = FakePipeline(answer="a b c")
    llm = _llm(pipe)
    chats = list(llm.stream_chat(_user("q")))
    assert [r.delta for r in chats] == ["a ", "b ", "c", ""]
    assert [r.message.content for r in chats] == ["a ", "a b ", "a b c", "a b c"]
    assert chats[-1].additional_kwargs["decision"]["reason"] == "fake"
    assert "decision" not in chats[0].additional_kwargs
    completions = list(llm.stream_complete("q"))
    assert [r.delta for r in completions] == ["a ", "b ", "c", ""]
    assert completions[-1].text == "a b c"
    assert completions[-1].additional_kwargs["decision"]["offloaded"] is True


async def test_async_methods_await_the_pipeline_on_its_loop() -> None:
    pipe = FakePipeline(answer="x y")
    llm = _llm(pipe)
    assert (await llm.achat(_user("q"))).message.content == "x y"
    assert (await llm.acomplete("q")).text == "x y"
    deltas = [r.delta async for r in await llm.astream_chat(_user("q"))]
    assert deltas == ["x ", "y", ""]
    texts = [r.text async for r in await llm.astream_complete("q")]
    assert texts[-1] == "x y"
    assert set(pipe.loops) == {background_loop()}
    assert asyncio.get_running_loop() is not background_loop()


def test_metadata() -> None:
    llm = _llm(FakePipeline(), max_tokens=99, model="echo-x")
    meta = llm.metadata
    assert isinstance(meta, LLMMetadata)
    assert (meta.is_chat_model, meta.is_function_calling_model) == (True, True)
    assert (meta.num_output, meta.model_name) == (99, "echo-x")
    assert meta.context_window == 4096  # the smaller max_model_len of the two default engines
    assert _llm(FakePipeline(), context_window=2048).metadata.context_window == 2048


def test_callback_manager_sees_llm_events_and_dispatcher_feeds_decision_log() -> None:
    recorder = EventRecorder()
    log = DecisionLog.attach()
    try:
        llm = _llm(FakePipeline(), callback_manager=CallbackManager([recorder]))
        llm.chat(_user("one"))
        list(llm.stream_complete("two"))
        assert recorder.starts == [CBEventType.LLM, CBEventType.LLM]
        assert [e for e, _ in recorder.ends] == [CBEventType.LLM, CBEventType.LLM]
        assert len(log.decisions) == 2
        assert log.last is not None
        assert log.last["reason"] == "fake"
    finally:
        log.detach()
    llm.complete("after detach")
    assert len(log.decisions) == 2


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="either pipeline="):
        EchoLLM(pipeline=FakePipeline(), large=MockLLM())
    with pytest.raises(ValueError, match="neither a LlamaIndex LLM nor an echo Engine"):
        EchoLLM(large="gpt-4o")
    llm = EchoLLM(large=MockLLM())
    assert isinstance(llm.handle._large, LlamaIndexEngine)


def test_per_tenant_copies_share_one_pipeline() -> None:
    pipe = FakePipeline()
    llm = _llm(pipe)
    tenant_a = llm.model_copy(update={"tenant": "a"})
    assert tenant_a.handle is llm.handle
    tenant_a.complete("x")
    llm.complete("y")
    assert [r.tenant for r in pipe.requests] == ["a", None]
    unshared = EchoLLM()
    assert unshared.model_copy().handle is unshared.handle


# -------------------------------------------------------------------------------------- tools


def _multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_local_tools_go_to_the_large_model_and_parse() -> None:
    pipe = FakePipeline(answer='<tool_call>{"name": "_multiply", "arguments": {"a": 6, "b": 7}}</tool_call>')
    llm = _llm(pipe)
    tool = FunctionTool.from_defaults(fn=_multiply)
    response = llm.chat_with_tools([tool], user_msg="6 times 7?", tool_required=True)
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("_multiply", {"a": 6, "b": 7})]
    request = pipe.requests[0]
    assert request.requires_large is True
    assert "must call at least one" in request.messages[0].content
    assert response.additional_kwargs["decision"]["offloaded"] is False
    # a plain answer has no tool calls
    plain = ChatResponse(message=ChatMessage(role="assistant", content="42"))
    assert llm.get_tool_calls_from_response(plain, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="at least one tool call"):
        llm.get_tool_calls_from_response(plain)


async def test_local_tools_stream_as_one_parsed_response() -> None:
    pipe = FakePipeline(answer='<tool_call>{"name": "_multiply", "arguments": {"a": 2, "b": 2}}</tool_call>')
    llm = _llm(pipe)
    tool = FunctionTool.from_defaults(fn=_multiply)
    stream = await llm.astream_chat_with_tools([tool], chat_history=_user("2*2"))
    responses = [r async for r in stream]
    assert len(responses) == 1
    assert llm.get_tool_calls_from_response(responses[0])[0].tool_kwargs == {"a": 2, "b": 2}


def test_tool_history_is_sent_in_the_text_format() -> None:
    history = [
        *_user("6*7?"),
        ChatMessage(
            role="assistant",
            content="",
            additional_kwargs={"tool_calls": [{"id": "c1", "name": "_multiply", "arguments": {"a": 6, "b": 7}}]},
        ),
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(
            role="assistant",
            content="",
            additional_kwargs={
                "tool_calls": [{"id": "c2", "function": {"name": "_multiply", "arguments": '{"a": 1, "b": 2}'}}]
            },
        ),
    ]
    converted = to_echo_messages(history)
    assert '"arguments": {"a": 6, "b": 7}' in converted[1].content
    assert (converted[2].role, converted[2].content) == ("user", "<tool_response>\n42\n</tool_response>")
    assert '"arguments": {"a": 1, "b": 2}' in converted[3].content


class UserToolLLM(FunctionCallingLLM):
    """A fake of the user's own function-calling LLM: records the prepared kwargs and always calls the tool."""

    prepared: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(is_chat_model=True, is_function_calling_model=True, model_name="user-model")

    def _prepare_chat_with_tools(
        self, tools: Sequence[Any], user_msg: Any = None, chat_history: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        messages = [*(chat_history or []), ChatMessage(role="user", content=user_msg)] if user_msg else chat_history
        prepared = {"messages": messages, "native_tools": [t.metadata.name for t in tools]}
        self.prepared.append(prepared)
        return prepared

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return [ToolSelection(tool_id="u1", tool_name="_multiply", tool_kwargs={"a": 3, "b": 3})]

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        assert kwargs == {"native_tools": ["_multiply"]}
        return ChatResponse(message=ChatMessage(role="assistant", content="", additional_kwargs={"native": True}))

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self.chat(messages, **kwargs)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise NotImplementedError

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise NotImplementedError

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> Any:
        raise NotImplementedError

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> Any:
        raise NotImplementedError

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError


async def test_tools_are_delegated_to_a_wrapped_function_calling_llm() -> None:
    user_llm = UserToolLLM(prepared=[])
    llm = EchoLLM(large=user_llm)
    tool = FunctionTool.from_defaults(fn=_multiply)
    response = await llm.achat_with_tools([tool], user_msg="3*3")
    assert response.message.additional_kwargs == {"native": True}
    assert llm.get_tool_calls_from_response(response)[0].tool_id == "u1"
    assert user_llm.prepared[0]["native_tools"] == ["_multiply"]
    assert llm._handle is None or llm._handle._pipeline is None  # the pipeline was not needed


# ---------------------------------------------------------------------------------- embedding


class CountingEmbedder:
    """A fake echo Embedder: vectors from text length, counting calls (the real one is in integration tests)."""

    name = "fake/len"
    dim = 2

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> Any:
        import numpy as np

        self.calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    async def aembed(self, texts: Sequence[str]) -> Any:
        return self.embed(texts)


async def test_embedding_adapter_batches_and_names_the_model() -> None:
    fake = CountingEmbedder()
    embedding = EchoEmbedding(embedder=fake)
    assert embedding.model_name == "fake/len"
    assert embedding.get_query_embedding("abc") == [3.0, 1.0]
    assert embedding.get_text_embedding_batch(["a", "bb", "ccc"]) == [[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]
    assert await embedding.aget_query_embedding("abcd") == [4.0, 1.0]
    assert fake.calls == [["abc"], ["a", "bb", "ccc"], ["abcd"]]
    with pytest.raises(ValueError, match="not an echo Embedder"):
        EchoEmbedding(embedder=object())
