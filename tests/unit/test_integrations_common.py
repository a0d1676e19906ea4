"""The framework-free parts of the integrations: tool-call text protocol, call options, loop bridging."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from echo_middleware._sync import background_loop
from echo_middleware.errors import ConfigError, EngineTimeout
from echo_middleware.integrations._common import (
    ToolCall,
    _before_deadline,
    aiter_on_background,
    coerce_arguments,
    configured_copy,
    merge_call_options,
    on_background,
    parse_tool_calls,
    render_tool_call,
    tools_system_prompt,
    with_tools_prompt,
)
from echo_middleware.types import SLO, EchoChunk, EchoRequest, Message, SamplingParams

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}


# ------------------------------------------------------------------------------------ tool calls


def test_parse_tool_call_blocks_and_keep_text() -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    rest, calls = parse_tool_calls(text, ["add"])
    assert rest == "Let me add."
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 2, "b": 3})]
    assert calls[0].id.startswith("call_")


def test_parse_several_calls_string_arguments_and_unclosed_last_block() -> None:
    text = (
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
        '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 6}}'
    )
    rest, calls = parse_tool_calls(text)
    assert rest == ""
    assert [c.arguments for c in calls] == [{"a": 1, "b": 2}, {"a": 5, "b": 6}]
    assert len({c.id for c in calls}) == 2


def test_bare_json_call_only_for_known_tools() -> None:
    bare = '{"name": "add", "arguments": {"a": 1, "b": 1}}'
    assert parse_tool_calls(bare, ["add"])[1][0].name == "add"
    text, calls = parse_tool_calls('{"name": "weather", "arguments": {}}', ["add"])
    assert calls == []
    assert "weather" in text


def test_invalid_blocks_stay_in_text() -> None:
    text = "<tool_call>not json</tool_call> plain answer"
    rest, calls = parse_tool_calls(text, ["add"])
    assert calls == []
    assert rest == text


def test_rendered_call_parses_back() -> None:
    rendered = render_tool_call("add", {"a": 7, "b": 8})
    _, calls = parse_tool_calls(rendered, ["add"])
    assert (calls[0].name, calls[0].arguments) == ("add", {"a": 7, "b": 8})


def test_tools_prompt_lists_tools_and_choice() -> None:
    prompt = tools_system_prompt([ADD_TOOL], "any")
    assert '"name": "add"' in prompt
    assert "<tool_call>" in prompt
    assert "must call at least one" in prompt
    assert "must call the function add" in tools_system_prompt([ADD_TOOL], "add")
    assert "must call" not in tools_system_prompt([ADD_TOOL], "auto")


def test_tools_prompt_joins_an_existing_system_message() -> None:
    merged = with_tools_prompt([Message(role="system", content="Be brief."), Message(role="user", content="hi")], "T")
    assert [m.role for m in merged] == ["system", "user"]
    assert merged[0].content == "Be brief.\n\nT"
    fresh = with_tools_prompt([Message(role="user", content="hi")], "T")
    assert [(m.role, m.content) for m in fresh] == [("system", "T"), ("user", "hi")]


def test_quoted_arguments_get_the_declared_types() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "n": {"type": "integer"},
                    "x": {"type": "number"},
                    "ok": {"type": "boolean"},
                    "tags": {"type": "array"},
                    "s": {"type": "string"},
                    "bad": {"type": "integer"},
                },
            },
        },
    }
    args = {"n": "6", "x": "2.5", "ok": "True", "tags": '["a"]', "s": "7", "bad": "six", "extra": "1"}
    (call,) = coerce_arguments([ToolCall(name="f", arguments=dict(args))], [tool])
    assert call.arguments == {"n": 6, "x": 2.5, "ok": True, "tags": ["a"], "s": "7", "bad": "six", "extra": "1"}
    (other,) = coerce_arguments([ToolCall(name="unknown", arguments={"n": "6"})], [tool])
    assert other.arguments == {"n": "6"}


# --------------------------------------------------------------------------------- call options


def test_call_kwargs_override_constructor_defaults() -> None:
    defaults = {"tenant": "a", "offload": "auto", "max_tokens": 64, "temperature": None, "stop": ["###"]}
    options, extra = merge_call_options(
        defaults, {"tenant": "b", "slo": {"ttft_s": 0.5}, "offload": "never"}, stop=None, owner="M"
    )
    assert extra == {}
    request = options.request([Message(role="user", content="q")])
    assert request.tenant == "b"
    assert request.offload == "never"
    assert request.slo == SLO(ttft_s=0.5)
    assert request.params.max_tokens == 64
    assert request.params.stop == ["###"]
    assert request.params.model_fields_set == {"max_tokens", "stop"}


def test_explicit_stop_wins_and_extra_kwargs_are_returned() -> None:
    options, extra = merge_call_options(
        {"stop": ["a"]},
        {"tools": [ADD_TOOL], "ls_structured_output_format": {}},
        stop=["b"],
        owner="M",
        allowed_extra=("tools",),
    )
    assert options.stop == ["b"]
    assert extra == {"tools": [ADD_TOOL]}


def test_unknown_call_argument_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown call argument\(s\) \['temprature'\].*temperature"):
        merge_call_options({}, {"temprature": 0.3}, stop=None, owner="EchoChatModel")


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="M.offload='sometimes'"):
        merge_call_options({}, {"offload": "sometimes"}, stop=None, owner="M")
    with pytest.raises(ConfigError, match="M.slo"):
        merge_call_options({}, {"slo": {"ttft_s": -1}}, stop=None, owner="M")
    options, _ = merge_call_options({}, {"max_tokens": 0}, stop=None, owner="M")
    with pytest.raises(ConfigError, match="max_tokens"):
        options.request([Message(role="user", content="q")])


def test_configured_copy_sets_only_what_the_user_chose() -> None:
    from pydantic import BaseModel

    class Wrapped(BaseModel):
        temperature: float = 0.7
        num_predict: int = 500

    original = Wrapped()
    names = {"temperature": ("temperature",), "max_tokens": ("max_tokens", "num_predict"), "seed": ("seed",)}
    assert configured_copy(original, SamplingParams(), names) is original
    copied = configured_copy(original, SamplingParams(max_tokens=12, seed=3), names)
    assert (copied.temperature, copied.num_predict) == (0.7, 12)
    assert (original.temperature, original.num_predict) == (0.7, 500)


# ------------------------------------------------------------------------------------ bridging


async def test_on_background_runs_there_and_cancels_there() -> None:
    loop = background_loop()
    assert asyncio.get_running_loop() is not loop
    ran_on = await on_background(_current_loop())
    assert ran_on is loop

    started, cancelled = threading.Event(), threading.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(on_background(slow()))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(cancelled.wait, 5)


async def _current_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def test_aiter_on_background_streams_raises_and_closes() -> None:
    loops: list[asyncio.AbstractEventLoop] = []
    closed = threading.Event()

    async def numbers(fail: bool) -> AsyncIterator[int]:
        loops.append(asyncio.get_running_loop())
        try:
            for i in range(100):
                yield i
                await asyncio.sleep(0)
                if fail and i == 2:
                    raise RuntimeError("boom")
        finally:
            closed.set()

    assert [i async for i in aiter_on_background(lambda: numbers(False))] == list(range(100))
    assert loops == [background_loop()]

    got: list[int] = []

    async def consume() -> None:
        async for i in aiter_on_background(lambda: numbers(True)):
            got.append(i)

    with pytest.raises(RuntimeError, match="boom"):
        await consume()
    assert got == [0, 1, 2]

    closed.clear()
    stream = aiter_on_background(lambda: numbers(False))
    async for i in stream:
        if i == 5:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert await asyncio.to_thread(closed.wait, 5)


# ------------------------------------------------------------------------------------ stream deadlines


_HI = EchoRequest(messages=[Message(role="user", content="hi")])


class _GatedChunks:
    """Yields a chunk each time the test opens ``gate``; records whether it was closed."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent = 0
        self.closed = False

    async def chunks(self) -> AsyncIterator[EchoChunk]:
        try:
            while True:
                await self.gate.wait()
                self.gate.clear()
                self.sent += 1
                yield EchoChunk(request_id="s1", text=f"w{self.sent} ")
        finally:
            self.closed = True


async def test_stream_deadline_passes_chunks_then_times_out_and_closes() -> None:
    source = _GatedChunks()
    got: list[str] = []

    async def consume() -> None:
        async for chunk in _before_deadline(source.chunks(), _HI, 0.2):
            got.append(chunk.text)

    source.gate.set()
    with pytest.raises(EngineTimeout, match="timeout=0.2"):
        await consume()
    assert got == ["w1 "]
    assert source.closed


async def test_stream_cancel_that_lands_with_a_chunk_is_not_lost() -> None:
    # The chunk and the consumer's cancel arrive in the same loop tick: Python 3.11's wait_for returned the chunk
    # and dropped the cancel (gh-86296), so the stream ran on.
    source = _GatedChunks()
    got: list[str] = []

    async def consume() -> None:
        async for chunk in _before_deadline(source.chunks(), _HI, 60.0):
            got.append(chunk.text)

    task = asyncio.create_task(consume())
    for _ in range(5):
        await asyncio.sleep(0)
    source.gate.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1)
    assert task in done
    assert task.cancelled()
    assert got == []
    assert source.closed
