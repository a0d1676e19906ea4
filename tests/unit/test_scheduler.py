"""The Scheduler's ordering (FCFS, SJF with aging, EDF), admission, cancellation, timeouts and metrics.

A gated fake engine emits a first delta when a request starts and finishes it only when the test opens that
request's gate, and a settable clock drives ranks and waiting times, so every interleaving and every time here
is chosen by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest

from echo_middleware.config import ScheduleConfig, SpeculationConfig
from echo_middleware.engines.base import Engine
from echo_middleware.errors import Cancelled, ConfigError, EngineTimeout, Overloaded
from echo_middleware.schedule import FinishedRequest, Scheduler, SpeculationPolicy, queue_rank, speculation_hint
from echo_middleware.types import SLO, EngineRequest, FeatureStatus, SamplingParams, StreamDelta, Usage


class GatedEngine(Engine):
    kind = "gated"

    def __init__(self, speculative: bool = True) -> None:
        super().__init__("gated", "fake-model", max_concurrency=1)
        self.order: list[str] = []
        self.seen: dict[str, EngineRequest] = {}
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.aborted: list[str] = []
        self.hints: dict[str, object] = {}
        self.speculative = speculative

    async def _start(self) -> None:
        self._features = {
            "speculative_ngram": FeatureStatus(requested=self.speculative, enabled=self.speculative, detail="fake")
        }

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        rid = request.request_id
        self.order.append(rid)
        self.seen[rid] = request
        self.hints[rid] = speculation_hint()
        yield StreamDelta(request_id=rid, text="first ")
        await self.gates[rid].wait()
        yield StreamDelta(request_id=rid, text="last")
        yield StreamDelta(request_id=rid, finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=7))

    async def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.gates[request_id].set()  # the backend stops: the stream wakes up and sees the cancel flag


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def req(rid: str, **kwargs: object) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt="hi", **kwargs)  # type: ignore[arg-type]


async def until(predicate: object, steps: int = 2000) -> None:
    for _ in range(steps):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def make(policy: str = "sjf", clock: Clock | None = None, **cfg: object) -> tuple[Scheduler, GatedEngine, Clock]:
    engine = GatedEngine()
    clock = clock or Clock()
    config = ScheduleConfig(policy=policy, max_concurrency=1, **cfg)  # type: ignore[arg-type]
    return Scheduler(engine, config, clock=clock), engine, clock


async def fill(
    sched: Scheduler, engine: GatedEngine, jobs: list[tuple[str, float, SLO | None]]
) -> dict[str, asyncio.Task[object]]:
    """Start a blocker that holds the one slot, then queue ``jobs``; return all tasks by id."""
    tasks: dict[str, asyncio.Task[object]] = {
        "blocker": asyncio.create_task(sched.submit(req("blocker"), predicted_tokens=1))
    }
    await until(lambda: engine.order == ["blocker"])
    for rid, pred, slo in jobs:
        tasks[rid] = asyncio.create_task(sched.submit(req(rid), predicted_tokens=pred, slo=slo))
    await until(lambda: sched.waiting == len(jobs))
    return tasks


async def drain(engine: GatedEngine, tasks: dict[str, asyncio.Task[object]]) -> list[str]:
    """Finish requests one at a time, in the order the engine starts them; return that order."""
    for _ in range(len(tasks)):
        await until(lambda: any(rid not in engine.gates or not engine.gates[rid].is_set() for rid in engine.order))
        running = next(rid for rid in engine.order if not engine.gates[rid].is_set())
        engine.gates[running].set()
        await tasks[running]
    return engine.order


# ------------------------------------------------------------------------------------------ ordering


async def test_sjf_serves_shortest_predicted_first() -> None:
    sched, engine, _ = make("sjf")
    tasks = await fill(sched, engine, [("long", 500, None), ("short", 5, None), ("medium", 60, None)])
    assert sched.queued() == ["short", "medium", "long"]
    assert await drain(engine, tasks) == ["blocker", "short", "medium", "long"]


async def test_fcfs_keeps_arrival_order() -> None:
    sched, engine, clock = make("fcfs")
    tasks = {"blocker": asyncio.create_task(sched.submit(req("blocker"), predicted_tokens=1))}
    await until(lambda: engine.order == ["blocker"])
    for i, (rid, pred) in enumerate([("long", 500), ("short", 5), ("medium", 60)]):
        clock.t = float(i + 1)
        tasks[rid] = asyncio.create_task(sched.submit(req(rid), predicted_tokens=pred))
        await until(lambda n=i + 1: sched.waiting == n)
    assert await drain(engine, tasks) == ["blocker", "long", "short", "medium"]


async def test_aging_lets_a_long_job_ahead_of_later_short_ones() -> None:
    # aging_s=10: a 1023-token job ranks 10 doublings = 100 s after its arrival; a 1-token job ranks 10 s after.
    sched, engine, clock = make("sjf", aging_s=10.0)
    tasks = {"blocker": asyncio.create_task(sched.submit(req("blocker"), predicted_tokens=1))}
    await until(lambda: engine.order == ["blocker"])
    tasks["long"] = asyncio.create_task(sched.submit(req("long", params=SamplingParams(max_tokens=2048)), 1023))
    await until(lambda: sched.waiting == 1)
    for i, t in enumerate([10.0, 50.0, 89.0, 91.0, 200.0]):  # shorts arriving before t=90 rank ahead of it
        clock.t = t
        tasks[f"short{i}"] = asyncio.create_task(sched.submit(req(f"short{i}"), predicted_tokens=1))
        await until(lambda n=i + 2: sched.waiting == n)
    assert sched.queued() == ["short0", "short1", "short2", "long", "short3", "short4"]
    order = await drain(engine, tasks)
    assert order.index("long") < order.index("short3")


async def test_max_wait_s_serves_the_oldest_next() -> None:
    sched, engine, clock = make("sjf", aging_s=1e6, max_wait_s=5.0)  # aging alone would take forever here
    tasks = await fill(sched, engine, [("long", 1000, None), ("short", 1, None)])
    assert sched.queued() == ["short", "long"]
    clock.t = 6.0  # the long job has waited more than max_wait_s
    assert await drain(engine, tasks) == ["blocker", "long", "short"]


async def test_slo_policy_is_edf_for_deadlines_and_sjf_for_the_rest() -> None:
    sched, engine, _ = make("slo", aging_s=10.0)
    jobs = [
        ("loose", 5, SLO(ttft_s=30.0)),  # deadline 30 s
        ("tight", 500, SLO(ttft_s=5.0)),  # deadline 5 s: first although it is long
        ("plain", 3, None),  # SJF rank 10 * log2(4) = 20 s
    ]
    tasks = await fill(sched, engine, jobs)
    # "loose" is also short: its SJF rank (10 * log2(6) = 25.8 s) is earlier than its deadline, and wins.
    assert sched.queued() == ["tight", "plain", "loose"]
    assert await drain(engine, tasks) == ["blocker", "tight", "plain", "loose"]


def test_latency_slo_becomes_a_latest_start_time() -> None:
    cfg = ScheduleConfig(policy="slo", aging_s=10.0)
    slo = SLO(latency_s=100.0)
    # 1000 tokens at 20 tok/s take 50 s: the request must start by t=50 (its SJF rank would be ~100 s).
    assert queue_rank("slo", arrival=0.0, predicted_tokens=1000, slo=slo, config=cfg, tokens_per_s=20) == 50.0
    # an infeasible deadline ranks as the arrival time, not earlier
    assert queue_rank("slo", arrival=7.0, predicted_tokens=1e6, slo=slo, config=cfg, tokens_per_s=20) == 7.0
    # the sjf policy ignores deadlines
    sjf = queue_rank("sjf", arrival=0.0, predicted_tokens=1000, slo=slo, config=cfg, tokens_per_s=20)
    assert sjf == pytest.approx(10.0 * 9.967, abs=0.01)


async def test_priority_classes_shift_the_rank() -> None:
    sched, engine, _ = make("slo", aging_s=10.0, class_delay_s={"interactive": -20.0, "standard": 0.0, "batch": 60.0})
    jobs = [
        ("batch", 5, SLO(priority="batch")),
        ("standard", 50, None),
        ("interactive", 200, SLO(priority="interactive")),
    ]
    tasks = await fill(sched, engine, jobs)
    assert sched.queued() == ["interactive", "standard", "batch"]
    await drain(engine, tasks)


def test_the_sjf_policy_ignores_classes_and_deadlines() -> None:
    cfg = ScheduleConfig(aging_s=10.0)
    plain = queue_rank("sjf", arrival=0.0, predicted_tokens=7, slo=None, config=cfg, tokens_per_s=20)
    for slo in (SLO(priority="batch"), SLO(priority="interactive", ttft_s=0.5)):
        assert queue_rank("sjf", arrival=0.0, predicted_tokens=7, slo=slo, config=cfg, tokens_per_s=20) == plain
    assert plain == 30.0


async def test_rank_is_handed_to_the_engine_as_priority() -> None:
    sched, engine, _ = make("sjf")
    original = req("short")
    tasks = await fill(sched, engine, [("long", 500, None)])
    tasks["short"] = asyncio.create_task(sched.submit(original, predicted_tokens=5))
    await until(lambda: sched.waiting == 2)
    await drain(engine, tasks)
    assert engine.seen["short"].priority < engine.seen["long"].priority
    assert original.priority == 0  # the caller's request is not mutated


async def test_engine_priority_can_be_left_alone() -> None:
    sched, engine, _ = make("sjf", engine_priority=False)
    tasks = await fill(sched, engine, [("a", 500, None)])
    await drain(engine, tasks)
    assert engine.seen["a"].priority == 0


async def test_predicted_tokens_are_capped_at_max_tokens_and_validated() -> None:
    sched, engine, _ = make("sjf")
    tasks = await fill(sched, engine, [])
    capped = asyncio.create_task(sched.submit(req("capped", params=SamplingParams(max_tokens=4)), 10_000))
    other = asyncio.create_task(sched.submit(req("other"), predicted_tokens=8))
    await until(lambda: sched.waiting == 2)
    assert sched.queued() == ["capped", "other"]  # 10,000 predicted but at most 4 can come
    with pytest.raises(ConfigError, match="predicted_tokens"):
        await sched.submit(req("bad"), predicted_tokens=-1)
    await drain(engine, {**tasks, "capped": capped, "other": other})


# ------------------------------------------------------------------------------------------ admission


async def test_full_queue_rejects_with_overloaded() -> None:
    sched, engine, _ = make("sjf", max_queue=1, on_full="reject")
    tasks = await fill(sched, engine, [("queued", 5, None)])
    with pytest.raises(Overloaded, match="max_queue=1"):
        await sched.submit(req("refused"), predicted_tokens=1)
    assert sched.metrics.snapshot()["all"]["outcomes"]["rejected"] == 1
    await drain(engine, tasks)
    assert "refused" not in engine.order


async def test_full_queue_makes_callers_wait_in_arrival_order() -> None:
    sched, engine, _ = make("sjf", max_queue=1, on_full="wait")
    tasks = await fill(sched, engine, [("queued", 500, None)])
    tasks["late1"] = asyncio.create_task(sched.submit(req("late1"), predicted_tokens=400))
    tasks["late2"] = asyncio.create_task(sched.submit(req("late2"), predicted_tokens=1))
    for _ in range(50):
        await asyncio.sleep(0)
    assert sched.waiting == 1  # back-pressure: the late ones wait outside the queue
    assert sched.queued() == ["queued"]
    order = await drain(engine, tasks)
    # room is handed out in arrival order, so late1 enters (and runs) before late2 despite being longer
    assert order == ["blocker", "queued", "late1", "late2"]


# ------------------------------------------------------------------------------------------ cancellation


async def test_client_cancel_while_queued_never_reaches_the_engine() -> None:
    sched, engine, _ = make("sjf")
    tasks = await fill(sched, engine, [("gone", 5, None), ("stays", 50, None)])
    tasks["gone"].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks["gone"]
    del tasks["gone"]
    assert sched.queued() == ["stays"]
    assert await drain(engine, tasks) == ["blocker", "stays"]
    assert sched.metrics.snapshot()["all"]["outcomes"] == {"ok": 2, "cancelled": 1}


async def test_client_cancel_while_running_aborts_the_engine_and_frees_the_slot() -> None:
    sched, engine, _ = make("sjf")
    tasks = await fill(sched, engine, [("next", 5, None)])
    tasks["blocker"].cancel()  # the client of the running request disconnects
    with pytest.raises(asyncio.CancelledError):
        await tasks["blocker"]
    assert engine.aborted == ["blocker"]
    await until(lambda: engine.order == ["blocker", "next"])  # its slot went to the next request
    assert sched.running == 1
    engine.gates["next"].set()
    await tasks["next"]
    assert engine.in_flight() == []


async def test_cancel_by_id_queued_and_running() -> None:
    sched, engine, _ = make("sjf")
    tasks = await fill(sched, engine, [("queued", 5, None)])
    assert await sched.cancel("queued", reason="user pressed stop")
    with pytest.raises(Cancelled, match="queued"):
        await tasks["queued"]
    assert await sched.cancel("blocker")
    with pytest.raises(Cancelled):
        await tasks["blocker"]
    assert "blocker" in engine.aborted
    assert not await sched.cancel("unknown")
    assert sched.running == 0
    assert sched.waiting == 0


async def test_closing_a_stream_cancels_the_request_in_the_engine() -> None:
    sched, engine, _ = make("sjf")
    stream = sched.stream(req("s"), predicted_tokens=3)
    first = await anext(stream)
    assert first.text == "first "
    await stream.aclose()  # the consumer stops reading (e.g. HTTP client gone)
    assert engine.aborted == ["s"]
    assert sched.running == 0
    assert sched.metrics.snapshot()["all"]["outcomes"] == {"cancelled": 1}


async def test_close_fails_waiting_requests() -> None:
    sched, engine, _ = make("sjf")
    tasks = await fill(sched, engine, [("w", 5, None)])
    await sched.close()
    with pytest.raises(Cancelled, match="closed"):
        await tasks["w"]
    engine.gates["blocker"].set()
    await tasks["blocker"]


# ------------------------------------------------------------------------------------------ timeouts


async def test_queue_timeout_fails_a_request_still_waiting() -> None:
    sched, engine, _ = make("sjf", queue_timeout_s=0.01)
    tasks = await fill(sched, engine, [("slow", 5, None)])
    with pytest.raises(EngineTimeout, match="queue_timeout_s"):
        await tasks.pop("slow")
    assert sched.waiting == 0
    await drain(engine, tasks)
    assert sched.metrics.snapshot()["all"]["outcomes"] == {"ok": 1, "timeout": 1}


async def test_request_deadline_is_honoured_in_the_queue() -> None:
    sched, engine, _ = make("sjf")
    tasks = await fill(sched, engine, [])
    late = asyncio.create_task(sched.submit(req("late", deadline=time.time() + 0.01), predicted_tokens=1))
    with pytest.raises(EngineTimeout, match="deadline"):
        await late
    assert "late" not in engine.order
    await drain(engine, tasks)


async def test_slo_deadline_factor_sets_the_engine_deadline() -> None:
    sched, engine, _ = make("slo", slo_deadline_factor=2.0)
    tasks = await fill(sched, engine, [("d", 5, SLO(latency_s=30.0))])
    before = time.time()
    await drain(engine, tasks)
    deadline = engine.seen["d"].deadline
    assert deadline is not None
    assert before + 59 < deadline <= time.time() + 60


# ------------------------------------------------------------------------------------------ metrics


async def test_metrics_per_class_and_on_finish() -> None:
    finished: list[FinishedRequest] = []
    engine = GatedEngine()
    clock = Clock()
    sched = Scheduler(engine, ScheduleConfig(policy="slo", max_concurrency=1), clock=clock, on_finish=finished.append)
    met = asyncio.create_task(sched.submit(req("met"), 5, SLO(ttft_s=1.0, priority="interactive")))
    await until(lambda: engine.order == ["met"])
    missed = asyncio.create_task(sched.submit(req("missed"), 5, SLO(ttft_s=1.0, priority="interactive")))
    await until(lambda: sched.waiting == 1)
    clock.t = 3.0
    engine.gates["met"].set()
    gen = await met
    assert gen.timings.queued_s == 0.0
    assert gen.timings.total_s == 3.0
    await until(lambda: engine.order == ["met", "missed"])  # first token at t=3: 3 s > 1 s
    clock.t = 4.0
    engine.gates["missed"].set()
    gen2 = await missed
    assert gen2.timings.queued_s == 3.0
    assert gen2.timings.ttft_s == 3.0
    assert gen2.text == "first last"
    snap = sched.metrics.snapshot()["by_class"]["interactive"]
    assert snap["slo_attainment"] == 0.5
    assert snap["queue_wait_s"]["max"] == 3.0
    assert snap["jct_s"]["max"] == 4.0
    assert sched.metrics.slo_attainment("interactive") == 0.5
    assert [(f.request_id, f.completion_tokens, f.slo_met) for f in finished] == [
        ("met", 7, True),
        ("missed", 7, False),
    ]


async def test_a_failing_on_finish_callback_does_not_break_requests() -> None:
    def boom(_: FinishedRequest) -> None:
        raise RuntimeError("observer bug")

    engine = GatedEngine()
    engine.gates["x"].set()
    sched = Scheduler(engine, ScheduleConfig(), on_finish=boom)
    gen = await sched.submit(req("x"), predicted_tokens=3)
    assert gen.text == "first last"


# ------------------------------------------------------------------------------------------ speculation


def test_speculation_policy_per_class_and_load() -> None:
    from echo_middleware.types import EngineLoad

    on = {"speculative_ngram": FeatureStatus(requested=True, enabled=True)}
    policy = SpeculationPolicy(SpeculationConfig(), on, engine_tokens=4)
    idle = EngineLoad(waiting=0, running=1, max_concurrency=8)
    busy = EngineLoad(waiting=10, running=8, max_concurrency=8)
    assert policy.for_request(SLO(priority="interactive"), busy).num_tokens == 4
    assert policy.for_request(SLO(priority="batch"), idle).enabled is False
    assert policy.for_request(None, idle).enabled is True
    saturated = policy.for_request(None, busy)
    assert saturated.enabled is False
    assert "saturated" in saturated.reason
    off = {"speculative_ngram": FeatureStatus(requested=True, enabled=False, detail="refused")}
    assert SpeculationPolicy(SpeculationConfig(), off).for_request(SLO(priority="interactive"), idle).enabled is False
    fixed = SpeculationPolicy(SpeculationConfig(num_tokens=2), on, engine_tokens=4)
    assert fixed.for_request(SLO(priority="interactive"), idle).num_tokens == 2


async def test_the_engine_sees_the_speculation_decision_of_its_request() -> None:
    engine = GatedEngine()
    sched = Scheduler(engine, ScheduleConfig(max_concurrency=4))
    for rid in ("i", "b"):
        engine.gates[rid].set()
    await sched.submit(req("i"), 5, SLO(priority="interactive"))
    await sched.submit(req("b"), 5, SLO(priority="batch"))
    assert engine.hints["i"].enabled is True  # type: ignore[union-attr]
    assert engine.hints["b"].enabled is False  # type: ignore[union-attr]
    assert speculation_hint() is None  # nothing leaks into the caller afterwards

    no_spec = GatedEngine(speculative=False)
    no_spec.gates["x"].set()
    with contextlib.suppress(Exception):
        await no_spec.start()
    await Scheduler(no_spec, ScheduleConfig()).submit(req("x"), 5, SLO(priority="interactive"))
    assert no_spec.hints["x"].enabled is False  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["sjf", "slo"])
def test_no_later_arrival_can_overtake_a_request_forever(policy: str) -> None:
    """The bounded-wait argument of docs/scheduling.md, checked on random requests.

    Every rank lies in [arrival + low, arrival + high] for fixed offsets, so a request that arrives after
    ``rank_i - low`` ranks behind request i: only the finitely many earlier arrivals can be served before it.
    """
    import math
    import random

    cfg = ScheduleConfig(aging_s=30.0)
    max_tokens = 1024
    low = min(0.0, min(cfg.class_delay_s.values()) + cfg.aging_s) if policy == "slo" else cfg.aging_s
    high = cfg.aging_s * math.log2(1 + max_tokens) + (max(cfg.class_delay_s.values()) if policy == "slo" else 0.0)
    rng = random.Random(7)
    requests = []
    for _ in range(2000):
        arrival = rng.uniform(0, 1000)
        slo = rng.choice(
            [None, SLO(priority="batch"), SLO(priority="interactive", ttft_s=rng.uniform(0.1, 50)), SLO(latency_s=5)]
        )
        pred = rng.uniform(1, max_tokens)
        rank = queue_rank(policy, arrival=arrival, predicted_tokens=pred, slo=slo, config=cfg, tokens_per_s=20)
        assert arrival + low - 1e-9 <= rank <= arrival + high + 1e-9
        requests.append((arrival, rank))
    for _, rank_i in requests[:200]:
        for arrival_j, rank_j in requests:
            if arrival_j > rank_i - low:
                assert rank_j > rank_i
