"""LangChainEngine and LlamaIndexEngine keep the Engine contract over a framework model.

The wrapped models are langchain-core's ``GenericFakeChatModel`` (with an async, paced stream so that cancels and
deadlines land mid-way) and llama-index's ``MockLLM``: fakes of the *wrapped* model, which is what a unit test of
the adapter needs; the real local models run in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from llama_index.core.llms import MockLLM
from pydantic import Field

from echo_middleware.errors import Cancelled, EngineError, EngineTimeout, EngineUnavailable
from echo_middleware.integrations.langchain import LangChainEngine, to_langchain_messages
from echo_middleware.integrations.llama_index import LlamaIndexEngine, to_llama_messages
from echo_middleware.types import EngineRequest, Message, SamplingParams


class PacedFake(GenericFakeChatModel):
    """GenericFakeChatModel with a native async stream: one word per ``delay`` seconds, usage on the last chunk.

    ``max_tokens`` (a field, as on real chat models) caps the words; ``seen`` records what each call received and
    ``cancelled`` counts streams that were cancelled while running.
    """

    delay: float = 0.0
    max_tokens: int | None = None
    words: int = 40
    report_usage: bool = True
    fail_with: Any = None
    seen: list[dict[str, Any]] = Field(default_factory=list)
    cancelled: list[int] = Field(default_factory=list)

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        self.seen.append({"messages": messages, "stop": stop, "max_tokens": self.max_tokens})
        count = min(self.words, self.max_tokens or self.words)
        try:
            for i in range(count):
                if self.fail_with is not None and i == 2:
                    raise self.fail_with
                await asyncio.sleep(self.delay)
                last = i == count - 1
                usage = {"input_tokens": 11, "output_tokens": count, "total_tokens": 11 + count}
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content=f"w{i} ",
                        usage_metadata=usage if last and self.report_usage else None,
                        response_metadata={"finish_reason": "length"} if last and self.max_tokens else {},
                    )
                )
        except asyncio.CancelledError:
            self.cancelled.append(1)
            raise


def _fake(**kwargs: Any) -> PacedFake:
    return PacedFake(messages=iter([]), **kwargs)


def _request(max_tokens: int | None = None, **kwargs: Any) -> EngineRequest:
    params = SamplingParams(max_tokens=max_tokens) if max_tokens else SamplingParams()
    return EngineRequest(messages=[Message(role="user", content="count")], params=params, **kwargs)


# ----------------------------------------------------------------------------- LangChainEngine


async def test_generic_fake_streams_text_with_estimated_usage() -> None:
    fake = GenericFakeChatModel(messages=iter([AIMessage(content="hello there world")]))
    engine = LangChainEngine(fake)
    async with engine:
        deltas = [d async for d in engine.stream(_request())]
    assert "".join(d.text for d in deltas) == "hello there world"
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == len("hello there world") // 4 + 1
    assert engine.features["usage"].enabled is False
    assert engine.features["streaming"].enabled is True
    assert engine.name == "langchain:generic-fake-chat-model"


async def test_reported_usage_finish_reason_and_explicit_max_tokens() -> None:
    fake = _fake(max_tokens=None)
    engine = LangChainEngine(fake, name="big")
    async with engine:
        result = await engine.generate(_request(max_tokens=5))
    assert result.text == "w0 w1 w2 w3 w4 "
    assert result.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (11, 5)
    assert fake.seen[0]["max_tokens"] == 5
    assert fake.max_tokens is None  # the user's model is not changed; a copy carries the value
    assert "usage" not in engine.features
    assert result.engine == "big"


async def test_unset_sampling_leaves_the_wrapped_configuration() -> None:
    fake = _fake(max_tokens=3)
    async with LangChainEngine(fake) as engine:
        result = await engine.generate(_request())
    assert result.text == "w0 w1 w2 "
    assert fake.seen[0]["max_tokens"] == 3


async def test_messages_and_stop_reach_the_model_and_stop_is_enforced() -> None:
    fake = _fake()
    request = EngineRequest(
        messages=[Message(role="system", content="s"), Message(role="user", content="u")],
        params=SamplingParams(stop=["w3"]),
    )
    async with LangChainEngine(fake) as engine:
        result = await engine.generate(request)
        await asyncio.sleep(0.05)
    assert result.text == "w0 w1 w2 "
    assert result.finish_reason == "stop"
    assert fake.seen[0]["stop"] == ["w3"]
    assert [type(m).__name__ for m in fake.seen[0]["messages"]] == ["SystemMessage", "HumanMessage"]
    assert fake.cancelled == [1]  # generation stopped at the stop string instead of running to the end


async def test_cancel_mid_stream_reaches_the_model() -> None:
    fake = _fake(delay=0.05, words=400)
    request = _request()
    async with LangChainEngine(fake) as engine:
        got: list[str] = []

        async def consume() -> None:
            async for delta in engine.stream(request):
                got.append(delta.text)
                if len(got) == 3:
                    assert await engine.cancel(request.request_id, reason="client left")

        with pytest.raises(Cancelled, match="client left"):
            await consume()
        assert engine.in_flight() == []
    assert 3 <= len(got) < 10
    assert fake.cancelled == [1]


async def test_consumer_that_stops_early_cancels_the_model() -> None:
    fake = _fake(delay=0.02, words=400)
    async with LangChainEngine(fake) as engine:
        stream = engine.stream(_request())
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        assert engine.in_flight() == []
    assert fake.cancelled == [1]


async def test_deadline_times_out_and_cancels() -> None:
    fake = _fake(delay=0.05, words=400)
    engine = LangChainEngine(fake, timeout_s=0.3)
    async with engine:
        with pytest.raises(EngineTimeout):
            await engine.generate(_request())
    assert fake.cancelled == [1]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("bad request"), EngineError),
        (ConnectionError("reset"), EngineUnavailable),
        (TimeoutError("slow"), EngineTimeout),
    ],
)
async def test_model_errors_map_to_the_error_tree(error: Exception, expected: type[Exception]) -> None:
    async with LangChainEngine(_fake(fail_with=error)) as engine:
        with pytest.raises(expected, match="the wrapped model failed") as info:
            await engine.generate(_request())
    assert info.value.__cause__ is error


def test_tool_results_become_user_turns() -> None:
    request = EngineRequest(
        messages=[Message(role="user", content="add"), Message(role="tool", content="5")],
    )
    converted = to_langchain_messages(request)
    assert [type(m).__name__ for m in converted] == ["HumanMessage", "HumanMessage"]
    assert converted[1].content == "<tool_response>\n5\n</tool_response>"
    assert [m.content for m in to_langchain_messages(EngineRequest(prompt="raw"))] == ["raw"]


# --------------------------------------------------------------------------- LlamaIndexEngine


async def test_mock_llm_streams_through_complete_with_its_prompt_format() -> None:
    engine = LlamaIndexEngine(MockLLM())
    async with engine:
        deltas = [d async for d in engine.stream(_request())]
    # MockLLM echoes its prompt one character at a time: what it was sent, in LlamaIndex's default format
    assert "".join(d.text for d in deltas) == "user: count\nassistant: "
    assert len(deltas) > 5
    assert deltas[-1].finish_reason == "stop"
    assert engine.name == "llama_index:MockLLM"


async def test_mock_llm_max_tokens_is_set_on_a_copy() -> None:
    mock = MockLLM()
    async with LlamaIndexEngine(mock) as engine:
        result = await engine.generate(_request(max_tokens=4))
    assert result.text == "text text text text "
    assert mock.max_tokens is None


async def test_llama_index_stop_strings_are_enforced() -> None:
    request = EngineRequest(messages=[Message(role="user", content="abc XYZ def")], params=SamplingParams(stop=["XYZ"]))
    async with LlamaIndexEngine(MockLLM()) as engine:
        result = await engine.generate(request)
    assert result.text == "user: abc "
    assert result.finish_reason == "stop"


async def test_llama_index_cancel_mid_stream() -> None:
    request = EngineRequest(messages=[Message(role="user", content="x" * 2000)])
    async with LlamaIndexEngine(MockLLM()) as engine:
        got = 0

        async def consume() -> None:
            nonlocal got
            async for _ in engine.stream(request):
                got += 1
                if got == 5:
                    await engine.cancel(request.request_id, reason="stop now")

        with pytest.raises(Cancelled, match="stop now"):
            await consume()
        assert engine.in_flight() == []
    assert got < 2000


def test_llama_messages_keep_roles() -> None:
    request = EngineRequest(
        messages=[
            Message(role="system", content="s"),
            Message(role="user", content="u"),
            Message(role="assistant", content="a"),
            Message(role="tool", content="r"),
        ]
    )
    converted = to_llama_messages(request)
    assert [m.role.value for m in converted] == ["system", "user", "assistant", "user"]
    assert converted[3].content == "<tool_response>\nr\n</tool_response>"
