"""hedge(): first acceptable answer wins, the loser is cancelled in its engine, failures and delays handled."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest

from echo_middleware.config import ScheduleConfig
from echo_middleware.engines.base import Engine
from echo_middleware.errors import EngineError
from echo_middleware.schedule import Scheduler, hedge
from echo_middleware.types import EngineRequest, StreamDelta, Usage


class ScriptedEngine(Engine):
    """Answers ``text`` when the request's gate opens; ``fail`` makes it raise instead."""

    kind = "scripted"

    def __init__(self, name: str, text: str = "answer", fail: bool = False) -> None:
        super().__init__(name, f"{name}-model", max_concurrency=4)
        self.text = text
        self.fail = fail
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.started_ids: list[str] = []
        self.aborted: list[str] = []

    async def _start(self) -> None:
        pass

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        rid = request.request_id
        self.started_ids.append(rid)
        await self.gates[rid].wait()
        if self.fail:
            raise EngineError(f"{self.name} broke")
        yield StreamDelta(request_id=rid, text=self.text)
        yield StreamDelta(request_id=rid, finish_reason="stop", usage=Usage(completion_tokens=1))

    async def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


async def until(predicate: object, steps: int = 2000) -> None:
    for _ in range(steps):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def request() -> EngineRequest:
    return EngineRequest(request_id="r", prompt="What is 2+2?")


async def test_first_acceptable_answer_wins_and_the_loser_is_aborted_in_its_engine() -> None:
    small, large = ScriptedEngine("small", "4"), ScriptedEngine("large", "four")
    task = asyncio.create_task(hedge(small, large, request()))
    await until(lambda: small.started_ids and large.started_ids)
    small.gates["r.h0"].set()
    result = await task
    assert result.winner == 0
    assert result.accepted
    assert result.generation.text == "4"
    assert result.generation.request_id == "r"
    assert result.cancelled == [1]
    assert large.aborted == ["r.h1"]
    assert large.in_flight() == []


async def test_an_unacceptable_answer_waits_for_the_other_leg() -> None:
    small, large = ScriptedEngine("small", "I don't know"), ScriptedEngine("large", "4")
    task = asyncio.create_task(hedge(small, large, request(), accept=lambda g: "know" not in g.text))
    await until(lambda: small.started_ids and large.started_ids)
    small.gates["r.h0"].set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()
    large.gates["r.h1"].set()
    result = await task
    assert (result.winner, result.accepted, result.generation.text) == (1, True, "4")
    assert result.cancelled == []


async def test_when_nothing_is_acceptable_the_second_legs_answer_is_returned_unaccepted() -> None:
    small, large = ScriptedEngine("small", "a"), ScriptedEngine("large", "b")
    for e, rid in ((small, "r.h0"), (large, "r.h1")):
        e.gates[rid].set()
    result = await hedge(small, large, request(), accept=lambda g: False)
    assert (result.winner, result.accepted, result.generation.text) == (1, False, "b")


async def test_a_failing_leg_leaves_the_other_and_both_failing_raise() -> None:
    broken, large = ScriptedEngine("small", fail=True), ScriptedEngine("large", "4")
    broken.gates["r.h0"].set()
    large.gates["r.h1"].set()
    result = await hedge(broken, large, request())
    assert result.winner == 1
    assert "small broke" in result.errors[0]

    a, b = ScriptedEngine("a", fail=True), ScriptedEngine("b", fail=True)
    a.gates["r.h0"].set()
    b.gates["r.h1"].set()
    with pytest.raises(EngineError, match="both legs failed"):
        await hedge(a, b, request())


async def test_delay_starts_the_second_leg_only_if_the_first_is_slow() -> None:
    fast, large = ScriptedEngine("small", "4"), ScriptedEngine("large", "4")
    fast.gates["r.h0"].set()
    result = await hedge(fast, large, request(), delay_s=5.0)
    assert result.winner == 0
    assert large.started_ids == []  # never started: the first answered within the delay

    slow, large2 = ScriptedEngine("small", "4"), ScriptedEngine("large", "4")
    large2.gates["r.h1"].set()
    result = await hedge(slow, large2, request(), delay_s=0.01)
    assert result.winner == 1
    assert slow.aborted == ["r.h0"]


async def test_cancelling_the_caller_cancels_both_legs() -> None:
    small, large = ScriptedEngine("small"), ScriptedEngine("large")
    task = asyncio.create_task(hedge(small, large, request()))
    await until(lambda: small.started_ids and large.started_ids)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert small.aborted == ["r.h0"]
    assert large.aborted == ["r.h1"]


async def test_hedging_through_schedulers_frees_the_losers_slot() -> None:
    small, large = ScriptedEngine("small", "4"), ScriptedEngine("large", "4")
    s_small = Scheduler(small, ScheduleConfig(max_concurrency=1))
    s_large = Scheduler(large, ScheduleConfig(max_concurrency=1))
    task = asyncio.create_task(hedge(s_small, s_large, request(), predicted_tokens=[3, 3]))
    await until(lambda: small.started_ids and large.started_ids)
    small.gates["r.h0"].set()
    result = await task
    assert result.winner == 0
    assert large.aborted == ["r.h1"]
    assert s_large.running == 0
    assert s_large.metrics.snapshot()["all"]["outcomes"] == {"cancelled": 1}
    with pytest.raises(ValueError, match="one per leg"):
        await hedge(s_small, s_large, request(), predicted_tokens=[1, 2, 3])
