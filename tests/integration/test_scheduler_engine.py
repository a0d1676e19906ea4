"""The Scheduler and hedge() in front of real TransformersEngines running SmolLM2-135M-Instruct.

Checks that matter only with a real engine: queue order decides which real generation runs next, a cancelled
client aborts the real generation mid-way (the engine records it as aborted, short of max_tokens), the rank
reaches the engine as its priority, and a hedge loser is cancelled before it ever runs. Lengths are exact because
the raw counting prompt ("1, 2, 3, ...") makes the model continue until max_tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from echo_middleware.config import EngineConfig, ScheduleConfig
from echo_middleware.engines.transformers import TransformersEngine
from echo_middleware.schedule import FinishedRequest, Scheduler, hedge
from echo_middleware.types import EngineRequest, Message, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

MODEL = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def counting(rid: str, max_tokens: int) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt=COUNTING, params=SamplingParams(max_tokens=max_tokens))


def _engine(name: str) -> TransformersEngine:
    config = EngineConfig(
        backend="transformers", model=MODEL, speculative={"method": "off"}, kv_cache_dtype="auto", max_num_seqs=1
    )
    return TransformersEngine(config, name=name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engines(tiny_model_dir: object) -> AsyncIterator[tuple[TransformersEngine, TransformersEngine]]:
    first, second = _engine("sched-a"), _engine("sched-b")
    await first.start()  # one at a time: two threads importing transformers at once race (ImportError)
    await second.start()
    yield first, second
    await asyncio.gather(first.close(), second.close())


async def until(predicate: object, timeout_s: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.01)


async def test_shortest_predicted_job_runs_first_on_a_real_engine(
    engines: tuple[TransformersEngine, TransformersEngine],
) -> None:
    engine = engines[0]
    done: list[FinishedRequest] = []
    sched = Scheduler(engine, ScheduleConfig(policy="sjf", max_concurrency=1), on_finish=done.append)
    blocker = asyncio.create_task(sched.submit(counting("blocker", 24), predicted_tokens=24))
    await until(lambda: "blocker" in engine.in_flight())
    long = asyncio.create_task(sched.submit(counting("long", 20), predicted_tokens=300))
    short = asyncio.create_task(sched.submit(counting("short", 6), predicted_tokens=6))
    await until(lambda: sched.waiting == 2)
    assert sched.queued() == ["short", "long"]
    results = await asyncio.gather(blocker, long, short)
    assert [r.request_id for r in done] == ["blocker", "short", "long"]
    assert [g.usage.completion_tokens for g in results] == [24, 20, 6]
    assert results[1].timings.queued_s > results[2].timings.queued_s  # the long one waited for the short one
    assert results[2].text.strip().startswith("11")
    snap = sched.metrics.snapshot()["all"]
    assert snap["outcomes"] == {"ok": 3}


async def test_client_cancel_aborts_the_real_generation(engines: tuple[TransformersEngine, TransformersEngine]) -> None:
    engine = engines[0]
    sched = Scheduler(engine, ScheduleConfig(max_concurrency=1))
    victim = asyncio.create_task(sched.submit(counting("victim", 400), predicted_tokens=400))
    stream = sched.stream(counting("streamed", 400), predicted_tokens=400)
    await until(lambda: "victim" in engine.in_flight() and engine.load().running == 1)
    await asyncio.sleep(0.3)  # a few tokens in
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    await until(lambda: any(j.request_id == "victim" for j in engine.finished))
    job = next(j for j in engine.finished if j.request_id == "victim")
    assert job.outcome == "aborted"
    assert job.completion_tokens < 400

    # a streaming consumer that stops reading aborts its generation too
    first = await anext(stream)
    assert first.text
    await stream.aclose()
    await until(lambda: any(j.request_id == "streamed" for j in engine.finished))
    job = next(j for j in engine.finished if j.request_id == "streamed")
    assert (job.outcome, job.completion_tokens < 400) == ("aborted", True)
    assert engine.in_flight() == []
    assert sched.running == 0
    assert sched.metrics.snapshot()["all"]["outcomes"] == {"cancelled": 2}


async def test_hedge_returns_the_free_engines_answer_and_cancels_the_queued_leg(
    engines: tuple[TransformersEngine, TransformersEngine],
) -> None:
    busy_engine, free_engine = engines
    busy = Scheduler(busy_engine, ScheduleConfig(max_concurrency=1))
    free = Scheduler(free_engine, ScheduleConfig(max_concurrency=1))
    blocker = asyncio.create_task(busy.submit(counting("busy-blocker", 120), predicted_tokens=120))
    await until(lambda: "busy-blocker" in busy_engine.in_flight())
    question = EngineRequest(
        request_id="q",
        messages=[Message(role="user", content="What is the capital of France?")],
        params=SamplingParams(max_tokens=8),
    )
    result = await hedge(busy, free, question, predicted_tokens=8)
    assert result.winner == 1
    assert result.accepted
    assert result.cancelled == [0]
    assert "Paris" in result.generation.text
    assert busy.metrics.snapshot()["all"]["outcomes"] == {"cancelled": 1}
    blocker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocker
    await until(lambda: busy_engine.in_flight() == [])
    assert all(j.request_id != "q.h0" for j in busy_engine.finished)  # the loser never reached the engine
