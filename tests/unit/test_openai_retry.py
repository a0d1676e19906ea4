"""OpenAIEngine's retry and error rules on a scripted server (httpx MockTransport): pure HTTP logic, no network.

Retried: connect errors and 429/502/503/504, only before the first token. Not retried: other 4xx (the server's
message is kept), and anything after tokens were streamed. The real-server behaviour (streaming, cancel,
priority) is tested against a real vLLM server in tests/integration/test_openai_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from echo_middleware.config import EngineConfig
from echo_middleware.engines.openai import OpenAIEngine, parse_metrics, server_message
from echo_middleware.errors import Cancelled, ConfigError, EngineError, EngineTimeout, EngineUnavailable
from echo_middleware.types import EngineRequest, Message, SamplingParams

BASE = "http://llm.test:8000/v1"
MODEL = "tiny"
MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm", "max_model_len": 2048}]}


def _sse(*events: dict[str, Any]) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


def _answer(text: str = "Hello there") -> bytes:
    words = text.split(" ")
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}]}
        for i, w in enumerate(words)
    ]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(words)}})
    return _sse(*chunks)


class Script:
    """A scripted server: /v1/models answers, chat completions follow a list of responses."""

    def __init__(self, completions: list[Callable[[httpx.Request], httpx.Response]]) -> None:
        self.completions = list(completions)
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/version":
            return httpx.Response(200, json={"version": "0.32.0"})
        if request.url.path == "/metrics":
            return httpx.Response(404)
        if request.url.path in ("/v1/chat/completions", "/v1/completions"):
            self.bodies.append(json.loads(request.content))
            return self.completions.pop(0)(request)
        return httpx.Response(404, json={"error": {"message": f"no route {request.url.path}"}})

    @property
    def attempts(self) -> int:
        return len(self.bodies)


def _engine(script: Script, **overrides: Any) -> OpenAIEngine:
    config = EngineConfig(**{"backend": "openai", "model": MODEL, "base_url": BASE, "max_retries": 3, **overrides})
    engine = OpenAIEngine(config, transport=httpx.MockTransport(script))
    engine._sleep = _record_wait
    return engine


def _request() -> EngineRequest:
    return EngineRequest(messages=[Message(role="user", content="Hi")], params=SamplingParams(max_tokens=8))


def _ok(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=_answer(), headers={"content-type": "text/event-stream"})


def _status(code: int, message: str = "busy", headers: dict[str, str] | None = None) -> Any:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, json={"error": {"message": message, "code": code}}, headers=headers or {})

    return answer


WAITS: list[float] = []


@pytest.fixture(autouse=True)
def waits() -> list[float]:
    """The backoff waits the engines asked for (recorded, not slept)."""
    WAITS.clear()
    return WAITS


async def _record_wait(seconds: float) -> None:
    WAITS.append(seconds)


async def test_503_is_retried_then_succeeds(waits: list[float]) -> None:
    script = Script([_status(503), _status(502), _ok])
    async with _engine(script) as engine:
        result = await engine.generate(_request())
    assert result.text == "Hello there"
    assert result.usage.prompt_tokens == 7
    assert result.usage.completion_tokens == 2
    assert script.attempts == 3
    assert len(waits) == 2
    assert all(0 < w <= 8.5 for w in waits)


async def test_retry_after_is_honoured(waits: list[float]) -> None:
    script = Script([_status(429, "rate limited", {"Retry-After": "3"}), _ok])
    async with _engine(script) as engine:
        assert (await engine.generate(_request())).text == "Hello there"
    assert waits[0] >= 3


async def test_400_is_not_retried_and_keeps_the_server_message() -> None:
    script = Script([_status(400, "max_tokens must be at least 1, got 0."), _ok])
    async with _engine(script) as engine:
        with pytest.raises(EngineError, match=r"HTTP 400.*max_tokens must be at least 1") as caught:
            await engine.generate(_request())
    assert not isinstance(caught.value, EngineUnavailable)
    assert script.attempts == 1


async def test_500_is_not_retried() -> None:
    script = Script([_status(500, "boom"), _ok])
    async with _engine(script) as engine:
        with pytest.raises(EngineError, match="HTTP 500.*boom"):
            await engine.generate(_request())
    assert script.attempts == 1


async def test_retries_stop_after_max_retries() -> None:
    script = Script([_status(503)] * 3)
    async with _engine(script, max_retries=2) as engine:
        with pytest.raises(EngineUnavailable, match=r"after 3 attempts: HTTP 503"):
            await engine.generate(_request())
    assert script.attempts == 3


async def test_connect_errors_are_retried() -> None:
    calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        return _ok(request)

    script = Script([flaky, flaky, flaky])
    async with _engine(script) as engine:
        assert (await engine.generate(_request())).text == "Hello there"
    assert calls["n"] == 3


async def test_a_broken_stream_after_tokens_is_not_retried() -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}\n\n'
            raise httpx.ReadError("connection reset")

    def broken(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Broken(), headers={"content-type": "text/event-stream"})

    script = Script([broken, _ok])
    async with _engine(script) as engine:
        seen: list[str] = []

        async def consume() -> None:
            async for delta in engine.stream(_request()):
                seen.append(delta.text)

        with pytest.raises(EngineUnavailable, match="broke after 1 chunks.*not retried"):
            await consume()
    assert seen == ["Hel"]
    assert script.attempts == 1


async def test_priority_and_sampling_reach_the_body() -> None:
    script = Script([_ok, _ok])
    async with _engine(script) as engine:
        assert engine.features["priority"].enabled
        request = _request().model_copy(
            update={"priority": -3, "params": SamplingParams(max_tokens=8, stop=["\n"], seed=5, temperature=0.5)}
        )
        await engine.generate(request)
        await engine.generate(EngineRequest(prompt="1, 2, 3,"))
    chat, completion = script.bodies
    assert chat["priority"] == -3
    assert chat["stop"] == ["\n"]
    assert chat["seed"] == 5
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["messages"] == [{"role": "user", "content": "Hi"}]
    assert completion["prompt"] == "1, 2, 3,"
    assert "/v1/completions" in script.paths


async def test_fcfs_sends_no_priority() -> None:
    script = Script([_ok])
    async with _engine(script, scheduling_policy="fcfs") as engine:
        await engine.generate(_request().model_copy(update={"priority": 4}))
    assert "priority" not in script.bodies[0]


async def test_unknown_model_names_what_the_server_serves() -> None:
    config = EngineConfig(backend="openai", model="other", base_url=BASE)
    engine = OpenAIEngine(config, transport=httpx.MockTransport(Script([])))
    with pytest.raises(ConfigError, match=r"model='other' is not served.*\['tiny'\]"):
        await engine.start()


async def test_start_against_a_dead_server_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    engine = OpenAIEngine(
        EngineConfig(backend="openai", model=MODEL, base_url=BASE, max_retries=1),
        transport=httpx.MockTransport(refuse),
    )
    engine._sleep = _record_wait
    with pytest.raises(EngineUnavailable, match=r"after 2 attempts.*llm\.test:8000/v1 is running"):
        await engine.start()
    assert not engine.started


def test_parse_metrics_reads_the_cache_config_and_speculation() -> None:
    text = "\n".join(
        [
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
            'vllm:cache_config_info{block_size="16",cache_dtype="fp8",enable_prefix_caching="True"} 1.0',
            'vllm:spec_decode_num_drafts_total{engine="0",model_name="tiny"} 12.0',
        ]
    )
    assert parse_metrics(text) == {"speculative": True, "cache_dtype": "fp8", "enable_prefix_caching": True}
    assert parse_metrics('vllm:cache_config_info{cache_dtype="auto"} 1.0') == {
        "speculative": False,
        "cache_dtype": "auto",
    }


def test_server_message_reads_both_error_shapes() -> None:
    assert server_message(httpx.Response(400, json={"error": {"message": "bad top_p"}})) == "bad top_p"
    assert server_message(httpx.Response(400, json={"object": "error", "message": "bad seed"})) == "bad seed"
    assert server_message(httpx.Response(502, text="Bad Gateway")) == "Bad Gateway"


def test_base_url_is_required() -> None:
    config = EngineConfig(backend="transformers", model=MODEL)
    with pytest.raises(ConfigError, match="base_url is required"):
        OpenAIEngine(config)


class Stuck(httpx.AsyncByteStream):
    """One token, then nothing until closed (a server that stalls mid-answer)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def __aiter__(self) -> Any:
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}\n\n'
        await self.closed.wait()

    async def aclose(self) -> None:
        self.closed.set()


async def test_cancel_mid_stream_closes_the_response() -> None:
    stuck = Stuck()
    script = Script([lambda _r: httpx.Response(200, stream=stuck), _ok])
    async with _engine(script) as engine:
        request = _request().model_copy(update={"request_id": "stalled"})

        async def consume() -> None:
            async for _delta in engine.stream(request):
                assert await engine.cancel("stalled", reason="client gone")

        with pytest.raises(Cancelled, match="client gone"):
            await consume()
        assert stuck.closed.is_set()  # the connection is closed: vLLM aborts the request
        assert engine.in_flight() == []
        assert (await engine.generate(_request())).text == "Hello there"  # still usable


async def test_deadline_while_waiting_for_tokens_closes_the_response() -> None:
    stuck = Stuck()
    script = Script([lambda _r: httpx.Response(200, stream=stuck)])
    async with _engine(script) as engine:
        with pytest.raises(EngineTimeout):
            await engine.generate(_request().model_copy(update={"deadline": time.time() + 0.5}))
    assert stuck.closed.is_set()


async def test_cancel_while_connecting() -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path != "/v1/chat/completions":
            return httpx.Response(404)
        await release.wait()  # the server never sends its headers
        return _ok(request)

    engine = OpenAIEngine(
        EngineConfig(backend="openai", model=MODEL, base_url=BASE), transport=httpx.MockTransport(slow)
    )
    async with engine:
        task = asyncio.create_task(engine.generate(_request().model_copy(update={"request_id": "connecting"})))
        for _ in range(100):
            if "connecting" in engine.in_flight():
                break
            await asyncio.sleep(0.01)
        assert await engine.cancel("connecting", reason="hedge lost")
        with pytest.raises(Cancelled, match="hedge lost"):
            await task
