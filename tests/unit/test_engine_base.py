"""The Engine base class: lifecycle, in-flight table, cancel, deadlines, load and features, on a fake engine.

The fake engine yields words when its test lets it (one asyncio.Event per step), so every interleaving here is
decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from echo_middleware.engines.base import Engine
from echo_middleware.errors import Cancelled, EngineError, EngineTimeout
from echo_middleware.types import EngineRequest, FeatureStatus, SamplingParams, StreamDelta, Usage


class FakeEngine(Engine):
    """Streams ``words`` one per step; a step waits for ``gate`` when the test holds it closed."""

    kind = "fake"

    def __init__(self, words: list[str] | None = None, *, timeout_s: float | None = None) -> None:
        super().__init__("fake", "fake-model", max_concurrency=2)
        self.words = words if words is not None else ["Hello", " there", ",", " friend", "."]
        self.gate = asyncio.Event()
        self.gate.set()
        self.starts = 0
        self.closes = 0
        self.aborted: list[str] = []
        self.emitted: dict[str, int] = {}
        self.final = True
        self.healthy = True
        self.timeout = timeout_s

    async def _start(self) -> None:
        await asyncio.sleep(0)  # let concurrent start() calls interleave
        self.starts += 1
        self._features = {"speculative_ngram": FeatureStatus(requested=True, enabled=True, detail="fake")}

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        rid = request.request_id
        self.emitted[rid] = 0
        for word in self.words[: request.params.max_tokens]:
            await self.gate.wait()
            self.emitted[rid] += 1
            yield StreamDelta(request_id=rid, text=word)
        if self.final:
            n = self.emitted[rid]
            length = n >= request.params.max_tokens
            yield StreamDelta(
                request_id=rid,
                finish_reason="length" if length else "stop",
                usage=Usage(prompt_tokens=3, completion_tokens=n),
            )

    async def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def _close(self) -> None:
        self.closes += 1

    async def _health(self) -> str:
        if not self.healthy:
            raise RuntimeError("model is gone")
        return "fake ok"

    def _timeout_s(self) -> float | None:
        return self.timeout


def _req(rid: str = "r1", **kwargs: object) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt="hi", **kwargs)  # type: ignore[arg-type]


async def _until(predicate: object, steps: int = 1000) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded by steps, not by time)."""
    for _ in range(steps):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_generate_collects_the_stream() -> None:
    engine = FakeEngine()
    result = await engine.generate(_req())
    assert result.text == "Hello there, friend."
    assert result.finish_reason == "stop"
    assert result.usage == Usage(prompt_tokens=3, completion_tokens=5)
    assert result.engine == "fake"
    assert result.model == "fake-model"
    assert result.timings.ttft_s is not None
    assert result.timings.total_s >= result.timings.ttft_s
    assert engine.load().tokens_per_s > 0  # the speed estimate learned from the stream
    assert engine.in_flight() == []


async def test_max_tokens_finish_reason_passes_through() -> None:
    result = await FakeEngine().generate(_req(params=SamplingParams(max_tokens=2)))
    assert result.text == "Hello there"
    assert result.finish_reason == "length"


async def test_start_is_idempotent_and_safe_concurrently() -> None:
    engine = FakeEngine()
    assert not engine.started
    await asyncio.gather(engine.start(), engine.start(), engine.start())
    await engine.start()
    assert engine.started
    assert engine.starts == 1


async def test_generate_before_start_starts_the_engine() -> None:
    engine = FakeEngine()
    await engine.generate(_req())
    assert engine.started
    assert engine.starts == 1


async def test_context_manager_starts_and_closes() -> None:
    engine = FakeEngine()
    async with engine as same:
        assert same is engine
        assert engine.started
    assert not engine.started
    assert engine.closes == 1


async def test_health_before_start_after_start_and_when_failing() -> None:
    engine = FakeEngine()
    before = await engine.health()
    assert not before.ok
    assert before.detail == "not started"
    await engine.start()
    after = await engine.health()
    assert after.ok
    assert after.detail == "fake ok"
    engine.healthy = False
    broken = await engine.health()  # reports, does not raise
    assert not broken.ok
    assert "RuntimeError: model is gone" in broken.detail


async def test_features_are_a_copy() -> None:
    engine = FakeEngine()
    assert engine.features == {}
    await engine.start()
    features = engine.features
    assert features["speculative_ngram"].enabled
    features.clear()
    features["x"] = FeatureStatus(requested=True, enabled=False)
    assert list(engine.features) == ["speculative_ngram"]


async def test_duplicate_request_id_is_refused_while_in_flight() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    task = asyncio.create_task(engine.generate(_req("same")))
    await _until(lambda: "same" in engine.in_flight())
    with pytest.raises(EngineError, match="already in flight"):
        await engine.generate(_req("same"))
    engine.gate.set()
    assert (await task).text == "Hello there, friend."
    # Once finished, the id may be used again.
    assert (await engine.generate(_req("same"))).text == "Hello there, friend."


async def test_cancel_ends_the_stream_with_cancelled_and_aborts_the_backend() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    got: list[str] = []

    async def consume() -> None:
        async for delta in engine.stream(_req("c1")):
            got.append(delta.text)
            engine.gate.clear()  # one word at a time

    task = asyncio.create_task(consume())
    await _until(lambda: "c1" in engine.in_flight())
    engine.gate.set()
    await _until(lambda: got == ["Hello"])
    assert await engine.cancel("c1", reason="client gone") is True
    engine.gate.set()
    with pytest.raises(Cancelled, match="client gone"):
        await task
    assert got == ["Hello"]
    assert "c1" in engine.aborted
    assert engine.in_flight() == []
    assert await engine.cancel("c1") is False  # no longer in flight
    assert await engine.cancel("never-seen") is False


async def test_deadline_raises_engine_timeout_and_aborts() -> None:
    engine = FakeEngine()
    engine.gate.clear()  # the backend never answers
    with pytest.raises(EngineTimeout, match="deadline"):
        await engine.generate(_req("d1", deadline=time.time() + 0.05))
    assert engine.aborted == ["d1"]
    assert engine.in_flight() == []


async def test_request_past_its_deadline_never_reaches_the_backend() -> None:
    engine = FakeEngine()
    with pytest.raises(EngineTimeout, match="after its deadline"):
        await engine.generate(_req("late", deadline=time.time() - 1))
    assert "late" not in engine.emitted


async def test_engine_timeout_applies_without_a_deadline() -> None:
    engine = FakeEngine(timeout_s=0.05)
    engine.gate.clear()
    with pytest.raises(EngineTimeout, match="timeout"):
        await engine.generate(_req("t1"))
    assert engine.aborted == ["t1"]


async def test_consumer_break_aborts_the_request() -> None:
    engine = FakeEngine()
    async with contextlib.aclosing(engine.stream(_req("b1"))) as stream:
        async for delta in stream:
            assert delta.text == "Hello"
            break
    assert engine.aborted == ["b1"]
    assert engine.in_flight() == []
    assert engine.emitted["b1"] == 1


async def test_task_cancellation_aborts_the_request() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    task = asyncio.create_task(engine.generate(_req("x1")))
    await _until(lambda: "x1" in engine.in_flight())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == ["x1"]
    assert engine.in_flight() == []


async def test_cancel_that_lands_with_a_token_is_not_lost() -> None:
    # The next token and the client's cancel arrive in the same loop tick. Python 3.11's wait_for returned the
    # token and dropped the cancel (gh-86296), so the request ran to its end; the deadline loop must not.
    engine = FakeEngine(timeout_s=60.0)  # a timeout, so each step is under one
    engine.gate.clear()
    task = asyncio.create_task(engine.generate(_req("race")))
    await _until(lambda: "race" in engine.in_flight())
    for _ in range(3):
        await asyncio.sleep(0)
    engine.gate.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done
    assert task.cancelled()
    assert engine.aborted == ["race"]
    assert engine.emitted["race"] < len(engine.words)


async def test_load_counts_waiting_and_running() -> None:
    engine = FakeEngine()
    await engine.start()
    assert engine.load().utilisation == 0
    engine.gate.clear()
    a = asyncio.create_task(engine.generate(_req("a")))
    b = asyncio.create_task(engine.generate(_req("b")))
    await _until(lambda: len(engine.in_flight()) == 2)
    load = engine.load()
    assert (load.waiting, load.running) == (2, 0)  # nothing yielded yet: both waiting
    assert load.max_concurrency == 2
    assert load.utilisation == 1.0
    engine.gate.set()
    await asyncio.gather(a, b)
    assert (engine.load().waiting, engine.load().running) == (0, 0)

    # A request counts as running once its first delta arrived (here the consumer then holds it).
    hold = asyncio.Event()

    async def read_one_then_hold() -> None:
        async for _delta in engine.stream(_req("c")):
            await hold.wait()

    c = asyncio.create_task(read_one_then_hold())
    await _until(lambda: engine.emitted.get("c", 0) == 1)
    assert (engine.load().waiting, engine.load().running) == (0, 1)
    hold.set()
    await c
    assert engine.load().running == 0


async def test_stream_without_a_final_delta_is_an_error() -> None:
    engine = FakeEngine()
    engine.final = False
    with pytest.raises(EngineError, match="without finishing"):
        await engine.generate(_req())
    assert engine.in_flight() == []


async def test_empty_stream_is_an_error() -> None:
    engine = FakeEngine(words=[])
    engine.final = False
    with pytest.raises(EngineError, match="without finishing"):
        await engine.generate(_req())


async def test_close_cancels_what_is_in_flight() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    task = asyncio.create_task(engine.generate(_req("z1")))
    await _until(lambda: "z1" in engine.in_flight())
    await engine.close()
    engine.gate.set()
    with pytest.raises(Cancelled, match="engine closing"):
        await task
    assert "z1" in engine.aborted
    assert not engine.started
