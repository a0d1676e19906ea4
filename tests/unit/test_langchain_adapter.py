"""EchoChatModel and EchoLLM map LangChain calls onto pipeline requests and answers back (on a recording pipeline).

What the pipeline does with a request is tested elsewhere; here: what reaches it (messages, tenant, SLO, offload,
sampling, tools), what comes back (content, usage_metadata, response_metadata["decision"], tool_calls), that
streamed tokens reach callback handlers, and that async calls run on the pipeline's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from fake_pipeline import FakePipeline
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from pydantic import BaseModel, Field, ValidationError

from echo_middleware._sync import background_loop
from echo_middleware.errors import ConfigError, EngineTimeout
from echo_middleware.integrations.langchain import EchoChatModel, EchoLLM, LangChainEngine, to_echo_messages
from echo_middleware.types import SLO


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.ended = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ended += 1


def _model(pipeline: FakePipeline, **kwargs: Any) -> EchoChatModel:
    return EchoChatModel(pipeline=pipeline, **kwargs)


# ------------------------------------------------------------------------------------- invoke


def test_invoke_maps_request_and_answer() -> None:
    pipe = FakePipeline()
    llm = _model(pipe, max_tokens=32, tenant="acme")
    msg = llm.invoke([SystemMessage("be brief"), HumanMessage("hello there")])
    assert isinstance(msg, AIMessage)
    assert msg.content == "echo: hello there"
    assert msg.usage_metadata == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    decision = msg.response_metadata["decision"]
    assert decision["offloaded"] is True
    assert decision["examples"][0]["id"] == "ex1"
    assert msg.response_metadata["model_name"] == "tiny"
    (request,) = pipe.requests
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hello there")]
    assert request.tenant == "acme"
    assert request.params.max_tokens == 32
    assert request.params.model_fields_set == {"max_tokens"}
    assert request.requires_large is False
    assert pipe.loops == [background_loop()]


def test_call_kwargs_override_fields() -> None:
    pipe = FakePipeline()
    llm = _model(pipe, tenant="acme", offload="auto", temperature=0.2)
    msg = llm.invoke("q", tenant="beta", offload="never", slo={"ttft_s": 0.5, "priority": "interactive"}, stop=["X"])
    request = pipe.requests[0]
    assert (request.tenant, request.offload) == ("beta", "never")
    assert request.slo == SLO(ttft_s=0.5, priority="interactive")
    assert request.params.temperature == 0.2
    assert request.params.stop == ["X"]
    assert msg.response_metadata["decision"]["offloaded"] is False


def test_bind_carries_options_through_a_chain() -> None:
    pipe = FakePipeline()
    chain = ChatPromptTemplate.from_messages([("human", "Q: {q}")]) | _model(pipe).bind(tenant="t1") | StrOutputParser()
    assert chain.invoke({"q": "why"}) == "echo: Q: why"
    assert pipe.requests[0].tenant == "t1"


def test_unknown_kwarg_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="temprature"):
        _model(FakePipeline()).invoke("q", temprature=1.0)


def test_constructor_checks() -> None:
    with pytest.raises(ValidationError, match="either pipeline="):
        EchoChatModel(pipeline=FakePipeline(), large=GenericFakeChatModel(messages=iter([])))
    with pytest.raises(ValidationError, match="neither a LangChain chat model nor an echo Engine"):
        EchoChatModel(large="gpt-4o")
    with pytest.raises(ValidationError, match="offload"):
        EchoChatModel(offload="sometimes")
    with pytest.raises(ValidationError, match="api_key"):
        EchoChatModel(api_key="x")


def test_from_defaults_splits_fields_and_settings(tmp_path: Any) -> None:
    llm = EchoChatModel.from_defaults(max_tokens=64, tenant="x", store={"path": str(tmp_path)}, rank={"top_k": 5})
    assert (llm.max_tokens, llm.tenant) == (64, "x")
    assert llm.settings.store.path == tmp_path
    assert llm.settings.rank.top_k == 5
    with pytest.raises(ConfigError, match="rank.top_k"):
        EchoChatModel.from_defaults(rank={"top_k": 0})


def test_large_chat_model_becomes_a_langchain_engine() -> None:
    large = GenericFakeChatModel(messages=iter([]))
    llm = EchoChatModel(large=large)
    assert llm.large_chat_model is large
    assert isinstance(llm.handle._large, LangChainEngine)
    assert llm.handle._large.chat_model is large


def test_copies_share_one_pipeline() -> None:
    llm = EchoChatModel(max_tokens=8)
    copy = llm.model_copy(update={"tenant": "a"})
    assert copy.handle is llm.handle
    assert copy.tenant == "a"
    assert EchoChatModel().handle is not llm.handle


def test_timeout_cancels_the_request() -> None:
    pipe = FakePipeline(delay=5.0)
    with pytest.raises(EngineTimeout, match="timeout=0.2"):
        _model(pipe, timeout=0.2).invoke("q")


# ------------------------------------------------------------------------------------- stream


def test_stream_reaches_callbacks_and_ends_with_the_decision() -> None:
    pipe = FakePipeline(answer="one two three")
    recorder = TokenRecorder()
    chunks = list(_model(pipe).stream("q", config={"callbacks": [recorder]}))
    assert "".join(c.content for c in chunks) == "one two three"
    assert [t for t in recorder.tokens if t] == ["one ", "two ", "three"]  # LangChain also reports the last ""
    assert recorder.ended == 1
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert last.usage_metadata == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    assert last.response_metadata["decision"]["reason"] == "fake"
    assert sum(1 for c in chunks if c.usage_metadata) == 1


def test_streaming_flag_streams_invoke_through_callbacks() -> None:
    pipe = FakePipeline(answer="a b")
    recorder = TokenRecorder()
    msg = _model(pipe, streaming=True).invoke("q", config={"callbacks": [recorder]})
    assert msg.content == "a b"
    assert [t for t in recorder.tokens if t] == ["a ", "b"]
    assert msg.response_metadata["decision"]["offloaded"] is True


async def test_async_calls_run_on_the_pipeline_loop() -> None:
    pipe = FakePipeline(answer="x y")
    llm = _model(pipe)
    msg = await llm.ainvoke("q")
    chunks = [c async for c in llm.astream("q")]
    batch = await llm.abatch(["a", "b", "c"])
    assert msg.content == "x y"
    assert "".join(c.content for c in chunks) == "x y"
    assert [m.content for m in batch] == ["x y"] * 3
    assert set(pipe.loops) == {background_loop()}
    assert asyncio.get_running_loop() is not background_loop()


async def test_astream_stopped_early_cancels_in_the_pipeline() -> None:
    pipe = FakePipeline(answer=" ".join(["w"] * 200), delay=0.01)
    stream = _model(pipe).astream("q")
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(100):
        if pipe.cancelled:
            break
        await asyncio.sleep(0.01)
    assert pipe.cancelled == 1


# -------------------------------------------------------------------------------------- tools


def _add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_local_tools_run_on_the_large_model_and_parse() -> None:
    pipe = FakePipeline(answer='<tool_call>\n{"name": "_add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')
    msg = _model(pipe).bind_tools([_add], tool_choice="any").invoke("what is 2+3?")
    assert msg.content == ""
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("_add", {"a": 2, "b": 3})]
    request = pipe.requests[0]
    assert request.requires_large is True
    assert request.messages[0].role == "system"
    assert '"name": "_add"' in request.messages[0].content
    assert "must call at least one" in request.messages[0].content
    assert msg.response_metadata["decision"]["offloaded"] is False


def test_local_tools_stream_as_one_chunk_with_tool_calls() -> None:
    pipe = FakePipeline(answer='<tool_call>{"name": "_add", "arguments": {"a": 1, "b": 1}}</tool_call>')
    chunks = list(_model(pipe).bind_tools([_add]).stream("1+1"))
    assert len(chunks) == 1
    full = chunks[0]
    assert full.tool_calls[0]["args"] == {"a": 1, "b": 1}


def test_tool_history_is_sent_in_the_text_format() -> None:
    history = [
        HumanMessage("2+3?"),
        AIMessage("", tool_calls=[{"name": "_add", "args": {"a": 2, "b": 3}, "id": "c1"}]),
        ToolMessage("5", tool_call_id="c1"),
    ]
    converted = to_echo_messages(history)
    assert converted[1].content == '<tool_call>\n{"name": "_add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert (converted[2].role, converted[2].content) == ("user", "<tool_response>\n5\n</tool_response>")


def test_tool_use_blocks_of_ai_messages_are_not_text() -> None:
    ai = AIMessage(
        content=[{"type": "text", "text": "calling"}, {"type": "tool_use", "id": "c1", "name": "_add", "input": {}}],
        tool_calls=[{"name": "_add", "args": {"a": 1, "b": 2}, "id": "c1"}],
    )
    (converted,) = to_echo_messages([ai])
    assert converted.content.startswith("calling\n<tool_call>")


def test_non_text_content_is_refused() -> None:
    image = HumanMessage(content=[{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}])
    with pytest.raises(ConfigError, match="image_url"):
        to_echo_messages([image])


class ToolFake(GenericFakeChatModel):
    """A fake user model with native tool calling: records bind_tools and answers with a tool call."""

    bound: list[Any] = Field(default_factory=list)

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Runnable[Any, Any]:
        self.bound.append((tools, tool_choice, kwargs))
        return self.bind(tools=tools, tool_choice=tool_choice)


class Answer(BaseModel):
    """An answer."""

    value: int


def test_tools_and_structured_output_pass_through_to_a_wrapped_model() -> None:
    reply = AIMessage("", tool_calls=[{"name": "_add", "args": {"a": 2, "b": 3}, "id": "c9"}])
    large = ToolFake(messages=iter([reply]), bound=[])
    llm = EchoChatModel(large=large)
    msg = llm.bind_tools([_add], tool_choice="any", parallel_tool_calls=False).invoke("2+3")
    assert msg.tool_calls[0]["id"] == "c9"
    assert msg.response_metadata["decision"]["reason"].startswith("tools bound: delegated")
    ((tools, choice, extra),) = large.bound
    assert tools[0]["function"]["name"] == "_add"
    assert (choice, extra) == ("any", {"parallel_tool_calls": False})
    assert llm._handle is None or llm._handle._pipeline is None  # the pipeline was never built for this call

    llm.with_structured_output(Answer)
    assert large.bound[-1][0] == [Answer]  # the wrapped model's own with_structured_output ran


def test_local_structured_output_uses_the_tool_format() -> None:
    pipe = FakePipeline(answer='<tool_call>{"name": "Answer", "arguments": {"value": 42}}</tool_call>')
    result = _model(pipe).with_structured_output(Answer).invoke("the answer?")
    assert result == Answer(value=42)
    assert pipe.requests[0].requires_large is True


# --------------------------------------------------------------------------------------- LLM


def test_text_llm_batch_generate_and_stream() -> None:
    pipe = FakePipeline()
    llm = EchoLLM(pipeline=pipe, tenant="t")
    result = llm.generate(["one", "two"])
    assert [g[0].text for g in result.generations] == ["echo: one", "echo: two"]
    assert result.generations[0][0].generation_info["decision"]["offloaded"] is True
    assert result.llm_output["token_usage"]["prompt_tokens"] == 14
    assert {r.tenant for r in pipe.requests} == {"t"}
    recorder = TokenRecorder()
    assert "".join(llm.stream("abc def", config={"callbacks": [recorder]})) == "echo: abc def"
    assert recorder.tokens == ["echo: ", "abc ", "def"]
    assert llm._get_ls_params()["ls_model_type"] == "llm"


async def test_text_llm_async() -> None:
    pipe = FakePipeline()
    llm = EchoLLM(pipeline=pipe, streaming=True)
    recorder = TokenRecorder()
    out = await llm.ainvoke("hi", config={"callbacks": [recorder]})
    assert out == "echo: hi"
    assert recorder.tokens == ["echo: ", "hi"]
    assert [c async for c in llm.astream("x")] == ["echo: ", "x", ""]
