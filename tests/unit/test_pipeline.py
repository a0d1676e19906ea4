"""EchoPipeline on scripted engines and an in-memory store: routing, fallbacks, streaming, learning, sync wrappers.

The engines and the store are fakes (the real ones run in tests/integration/test_pipeline_real.py); everything else is
the real pipeline: ranker, policy, prompt assembly, learner.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from pipeline_fakes import MemoryStore, ScriptedEngine, last_user

from echo_middleware.config import build_settings
from echo_middleware.errors import ConfigError, EngineTimeout, EngineUnavailable, StoreUnavailable
from echo_middleware.pipeline import EchoPipeline
from echo_middleware.rank import LogisticModel, UtilityRanker
from echo_middleware.types import EchoRequest, EngineRequest, Message, SamplingParams

QUESTION = "What is the capital of France?"
LARGE_ANSWER = "The capital of France is Paris."


def ask(text: str = QUESTION, **kwargs: object) -> EchoRequest:
    kwargs.setdefault("params", SamplingParams(max_tokens=32))
    return EchoRequest(messages=[Message(role="user", content=text)], **kwargs)  # type: ignore[arg-type]


def large_answer(request: EngineRequest) -> str:
    return LARGE_ANSWER if "France" in last_user(request) else f"Large answer to: {last_user(request)}"


def copy_example(request: EngineRequest) -> str:
    """The small model copies the answer of the first example in its prompt, else gives up."""
    messages = request.messages or []
    answers = [m.content for m in messages if m.role == "assistant"]
    return answers[0] if answers else "I am not sure."


def similarity_ranker() -> UtilityRanker:
    # utility = sigmoid(20 * (similarity - 0.6)): deterministic, similarity-driven
    return UtilityRanker(model=LogisticModel(("similarity",), [0.0], [1.0], [20.0], -12.0))


def make(
    small_answer: object = copy_example, store: MemoryStore | None = None, seed: int = 0, **settings: object
) -> tuple[EchoPipeline, ScriptedEngine, ScriptedEngine, MemoryStore]:
    settings.setdefault("route", {"threshold": 0.8})
    settings.setdefault("learn", {"shadow_rate": 0.0, "probe_rate": 0.0, "idle_poll_s": 0.01})
    large = ScriptedEngine("large", large_answer)
    small = ScriptedEngine("small", small_answer)  # type: ignore[arg-type]
    store = store if store is not None else MemoryStore()
    pipeline = EchoPipeline(
        build_settings(**settings), large=large, small=small, store=store, ranker=similarity_ranker(), seed=seed
    )
    return pipeline, large, small, store


@pytest.fixture
async def pipe() -> AsyncIterator[tuple[EchoPipeline, ScriptedEngine, ScriptedEngine, MemoryStore]]:
    parts = make()
    yield parts
    await parts[0].close()


async def until(predicate: object, steps: int = 2000) -> None:
    for _ in range(steps):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


# --------------------------------------------------------------------------------------- routing


async def test_a_new_question_goes_large_and_becomes_an_example(pipe: tuple) -> None:
    pipeline, _large, small, store = pipe
    result = await pipeline.agenerate(ask())
    assert result.text == LARGE_ANSWER
    d = result.decision
    assert not d.offloaded
    assert d.engine == "large"
    assert d.model == "large-model"
    assert "no similar past request" in d.reason
    assert d.fallback is None
    assert set(d.stage_s) >= {"retrieve", "route", "generate", "learn"}
    assert store.count() == 1  # durable before the call returned
    stored = next(iter(store.examples["default"].values()))
    assert stored.request == QUESTION
    assert stored.response == LARGE_ANSWER
    assert stored.quality == 1.0
    assert stored.metadata["source"] == "large"
    assert stored.model == "large-model"
    assert small.requests == []


async def test_a_repeat_is_offloaded_with_the_example_in_the_prompt(pipe: tuple) -> None:
    pipeline, large, small, store = pipe
    await pipeline.agenerate(ask())
    result = await pipeline.agenerate(ask())
    d = result.decision
    assert d.offloaded
    assert d.engine == "small"
    assert result.text == LARGE_ANSWER  # the small model copied the demonstration
    assert len(d.examples) == 1
    assert d.examples[0].distance == 0.0
    assert d.predicted_quality == pytest.approx(d.examples[0].utility)
    assert d.predicted_quality is not None
    assert d.threshold is not None
    assert d.predicted_quality >= d.threshold
    sent = small.requests[-1].messages
    assert [m.role for m in sent] == ["user", "assistant", "user"]
    assert sent[1].content == LARGE_ANSWER
    assert len(large.requests) == 1
    assert store.count() == 1  # small answers are not stored as examples
    assert store.uses[-1][1] == {d.examples[0].id: None}  # the use is counted


async def test_a_dissimilar_question_is_not_offloaded(pipe: tuple) -> None:
    pipeline, *_ = pipe
    await pipeline.agenerate(ask())
    d = (await pipeline.agenerate(ask("How many legs does a spider have?"))).decision
    assert not d.offloaded
    assert "no usable example" in d.reason


async def test_forced_modes_and_requires_large(pipe: tuple) -> None:
    pipeline, _large, _small, store = pipe
    await pipeline.agenerate(ask())
    queries = store.queries
    never = (await pipeline.agenerate(ask(offload="never"))).decision
    assert not never.offloaded
    assert never.mode == "never"
    assert store.queries == queries  # no retrieval for a request that cannot be offloaded
    tools = (await pipeline.agenerate(ask(requires_large=True))).decision
    assert not tools.offloaded
    assert "tool calls or structured output" in tools.reason
    forced = (await pipeline.agenerate(ask("Something unrelated entirely", offload="always"))).decision
    assert forced.offloaded
    assert forced.examples == []
    assert "offload='always'" in forced.reason


async def test_system_prompt_and_conversation_reach_the_small_model(pipe: tuple) -> None:
    pipeline, _large, small, _store = pipe
    await pipeline.agenerate(ask())
    request = EchoRequest(
        messages=[Message(role="system", content="Be brief."), Message(role="user", content=QUESTION)],
        params=SamplingParams(max_tokens=32),
    )
    assert (await pipeline.agenerate(request)).decision.offloaded
    assert [m.role for m in small.requests[-1].messages] == ["system", "user", "assistant", "user"]


# ------------------------------------------------------------------------------------- fallbacks


async def test_store_down_the_large_model_answers_and_says_why() -> None:
    store = MemoryStore()
    pipeline, _large, _small, _ = make(store=store)
    try:
        await pipeline.agenerate(ask())
        store.fail_query = StoreUnavailable("chroma is down")
        result = await pipeline.agenerate(ask())
        d = result.decision
        assert not d.offloaded
        assert result.text == LARGE_ANSWER
        assert d.fallback is not None
        assert "store unavailable (StoreUnavailable: chroma is down)" in d.fallback
        assert "store unavailable" in d.reason
    finally:
        await pipeline.close()


async def test_a_failing_store_write_does_not_fail_the_answer() -> None:
    store = MemoryStore()
    store.fail_add = StoreUnavailable("disk full")
    pipeline, *_ = make(store=store)
    try:
        result = await pipeline.agenerate(ask())
        assert result.text == LARGE_ANSWER
        assert "not learned: store failed (StoreUnavailable: disk full)" in result.decision.reason
    finally:
        await pipeline.close()


async def test_small_model_failing_falls_back_to_large(pipe: tuple) -> None:
    pipeline, _large, small, _store = pipe
    await pipeline.agenerate(ask())
    small.fail_with = EngineUnavailable("small crashed")
    result = await pipeline.agenerate(ask())
    d = result.decision
    assert not d.offloaded
    assert d.engine == "large"
    assert result.text == LARGE_ANSWER
    assert d.fallback is not None
    assert "small model failed (EngineUnavailable: small crashed)" in d.fallback
    assert d.predicted_quality is not None  # the routing decision is still reported


async def test_small_model_that_cannot_start_is_reported_in_every_decision() -> None:
    pipeline, _large, small, _store = make()
    small.fail_start = EngineUnavailable("no weights")
    try:
        await pipeline.agenerate(ask())
        d = (await pipeline.agenerate(ask())).decision
        assert not d.offloaded
        assert d.fallback is not None
        assert "small model unavailable (EngineUnavailable: no weights)" in d.fallback
    finally:
        await pipeline.close()


async def test_large_model_failing_with_an_offload_possible_uses_the_small_one(pipe: tuple) -> None:
    pipeline, large, _small, _store = pipe
    await pipeline.agenerate(ask())
    large.fail_with = EngineTimeout("large too slow")
    # raise the bar so the router picks the large model, which then fails
    pipeline.policy.config.threshold = 0.999999999
    result = await pipeline.agenerate(ask())
    d = result.decision
    assert d.offloaded
    assert d.engine == "small"
    assert result.text == LARGE_ANSWER
    assert d.fallback is not None
    assert "large model failed (EngineTimeout: large too slow)" in d.fallback
    assert "offload was possible" in d.fallback


async def test_large_model_failing_without_an_offload_raises_and_says_why(pipe: tuple) -> None:
    pipeline, large, *_ = pipe
    large.fail_with = EngineUnavailable("large is down")
    with pytest.raises(EngineUnavailable, match="large is down") as info:
        await pipeline.agenerate(ask())
    assert any("offload was not possible" in note for note in info.value.__notes__)


async def test_bad_requests_are_refused(pipe: tuple) -> None:
    pipeline, *_ = pipe
    with pytest.raises(ConfigError, match="EchoRequest"):
        await pipeline.agenerate("hello")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_concurrency"):
        await pipeline.abatch([ask()], max_concurrency=0)
    with pytest.raises(ConfigError, match="from_defaults"):
        EchoPipeline({"large": {}})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ streaming and batch


async def test_stream_yields_text_then_a_final_chunk_with_the_decision(pipe: tuple) -> None:
    pipeline, *_ = pipe
    chunks = [c async for c in pipeline.astream(ask())]
    assert "".join(c.text for c in chunks) == LARGE_ANSWER
    assert all(c.decision is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.decision is not None
    assert last.usage is not None
    assert last.usage.completion_tokens == len(LARGE_ANSWER.split())
    assert not last.decision.offloaded


async def test_closing_the_stream_cancels_the_engine_request() -> None:
    pipeline, large, _small, store = make()
    large.answer = lambda r: " ".join(["word"] * 200)
    large.delay_s = 0.01
    try:
        stream = pipeline.astream(ask(params=SamplingParams(max_tokens=200)))
        first = await stream.__anext__()
        assert first.text == "word"
        await stream.aclose()
        assert large.aborted == [large.requests[-1].request_id]
        assert large.in_flight() == []
        assert store.count() == 0  # an abandoned answer is not learned
    finally:
        await pipeline.close()


async def test_cancelling_the_consumer_task_cancels_the_engine_request() -> None:
    pipeline, large, _small, _store = make()
    large.answer = lambda r: " ".join(["word"] * 500)
    large.delay_s = 0.01
    try:
        got: list[str] = []

        async def consume() -> None:
            async for chunk in pipeline.astream(ask(params=SamplingParams(max_tokens=500))):
                got.append(chunk.text)

        task = asyncio.create_task(consume())
        await until(lambda: len(got) >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: bool(large.aborted))
        assert large.in_flight() == []
    finally:
        await pipeline.close()


async def test_abatch_keeps_request_order(pipe: tuple) -> None:
    pipeline, *_ = pipe
    questions = [f"Question number {i} about topic {i}" for i in range(6)]
    results = await pipeline.abatch([ask(q) for q in questions], max_concurrency=3)
    assert [r.text for r in results] == [f"Large answer to: {q}" for q in questions]


async def test_abatch_can_return_exceptions(pipe: tuple) -> None:
    pipeline, large, *_ = pipe
    large.fail_with = EngineUnavailable("down")
    results = await pipeline.abatch([ask("a b c"), ask("d e f")], return_exceptions=True)
    assert all(isinstance(r, EngineUnavailable) for r in results)
    with pytest.raises(ExceptionGroup):
        await pipeline.abatch([ask("a b c")])


async def test_sync_wrappers_work_inside_a_running_loop() -> None:
    pipeline, large, _small, store = make()
    try:
        first = pipeline.generate(ask())  # this test's loop is running: the call must not deadlock
        assert not first.decision.offloaded
        chunks = list(pipeline.stream(ask()))
        assert chunks[-1].decision is not None
        assert chunks[-1].decision.offloaded
        assert "".join(c.text for c in chunks) == LARGE_ANSWER
        results = pipeline.batch([ask("one two three"), ask()], max_concurrency=2)
        assert [r.decision.offloaded for r in results] == [False, True]
    finally:
        pipeline.close_sync()
    assert pipeline.learner is None
    # engines and stores handed in belong to the caller: the pipeline does not close them
    assert large.started
    assert not store.closed


async def test_async_context_manager_starts_and_closes() -> None:
    pipeline, large, small, _store = make()
    async with pipeline as p:
        assert p is pipeline
        assert large.started
        assert small.started
        assert p.learner is not None
    assert pipeline.learner is None


def test_from_defaults_builds_nothing_until_used() -> None:
    pipeline = EchoPipeline.from_defaults(route={"threshold": 0.5}, small={"model": "smollm2-135m-instruct"})
    assert pipeline.settings.route.threshold == 0.5
    assert pipeline.store is None
    assert pipeline.learner is None
    assert pipeline.small_engine.model == "smollm2-135m-instruct"
    assert not pipeline.small_engine.started
    with pytest.raises(ConfigError, match="target_retention"):
        EchoPipeline.from_defaults(route={"target_retention": 2})


# ---------------------------------------------------------------------------------------- learning


async def test_shadow_checks_recalibrate_and_demote_misleading_examples() -> None:
    # The small model gets the example but answers something else: every shadow check measures disagreement.
    pipeline, large, _small, store = make(
        small_answer=lambda r: "Madrid is a city in Spain.",
        learn={"shadow_rate": 1.0, "probe_rate": 0.0, "idle_poll_s": 0.01},
    )
    try:
        await pipeline.agenerate(ask())
        example_id = next(iter(store.examples["default"]))
        before = len(pipeline.policy.calibrator)
        result = await pipeline.agenerate(ask())
        assert result.decision.offloaded
        learner = pipeline.learner
        assert learner is not None
        await until(lambda: learner.stats.shadow_checked == 1)
        assert learner.stats.agreements[-1] == 0.0
        assert len(pipeline.policy.calibrator) == before + 1
        assert pipeline.policy.calibrator.pairs()[-1] == (pytest.approx(result.decision.predicted_quality), 0.0)
        _tenant, utilities, success = store.uses[-1]
        assert utilities == {example_id: 0.0}
        assert success is False
        demoted = store.examples["default"][example_id]
        assert demoted.utility_n == 1
        assert demoted.utility_sum == 0.0
        assert large.requests[-1].priority >= 1_000_000  # background work goes last
        assert pipeline.ranker.model.updates == 1  # type: ignore[attr-defined]
    finally:
        await pipeline.close()


async def test_shadow_check_of_a_good_offload_counts_a_success() -> None:
    pipeline, _large, _small, store = make(learn={"shadow_rate": 1.0, "probe_rate": 0.0, "idle_poll_s": 0.01})
    try:
        await pipeline.agenerate(ask())
        await pipeline.agenerate(ask())
        learner = pipeline.learner
        assert learner is not None
        await until(lambda: learner.stats.shadow_checked == 1)
        assert learner.stats.agreements[-1] == 1.0
        assert store.uses[-1][2] is True
        example = next(iter(store.examples["default"].values()))
        assert example.offload_successes == 1
    finally:
        await pipeline.close()


async def test_probes_try_large_answers_on_the_small_model() -> None:
    pipeline, _large, small, _store = make(
        route={"threshold": 0.999999999}, learn={"shadow_rate": 0.0, "probe_rate": 1.0, "idle_poll_s": 0.01}
    )
    try:
        await pipeline.agenerate(ask())
        result = await pipeline.agenerate(ask())  # usable example, but the bar is too high: large answers
        assert not result.decision.offloaded
        learner = pipeline.learner
        assert learner is not None
        await until(lambda: learner.stats.probes_done == 1)
        assert small.requests[-1].priority >= 1_000_000
        assert [m.role for m in small.requests[-1].messages] == ["user", "assistant", "user"]
        assert learner.stats.agreements[-1] == 1.0  # the small model copied the right answer
        assert pipeline.policy.calibrator.pairs()[-1][1] == 1.0
    finally:
        await pipeline.close()


async def test_learning_samples_are_reproducible_with_a_seed() -> None:
    def sampled(seed: int) -> list[bool]:
        pipeline, *_ = make(seed=seed, learn={"shadow_rate": 0.5, "probe_rate": 0.0})
        # the learner is created on start; the sampler is its seeded RNG
        from echo_middleware.learn.learner import Learner

        learner = Learner(
            pipeline.settings.learn,
            store=None,
            large=pipeline.large_engine,
            small=None,
            ranker=pipeline.ranker,
            policy=pipeline.policy,
            seed=seed,
        )
        return [learner._sample(0.5) for _ in range(20)]

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_rows_of_used_examples_are_kept_for_learning() -> None:
    pipeline, *_ = make()
    model = pipeline.ranker
    assert isinstance(model, UtilityRanker)
    assert isinstance(model.model.coef, np.ndarray)


# ------------------------------------------------------------------------ length prediction and scheduling


async def test_length_predictor_fills_the_decision_and_learns() -> None:
    from echo_middleware.predict import LengthPredictor

    pipeline, _large, _small, _store = make()
    pipeline._predictor = LengthPredictor()
    try:
        first = await pipeline.agenerate(ask())
        assert first.decision.predicted_length is not None
        assert "predict" in first.decision.stage_s
        assert pipeline.predictor.observations == 1
        second = await pipeline.agenerate(ask())  # the stored neighbour's length now informs the guess
        assert second.decision.predicted_length is not None
        assert pipeline.predictor.observations == 2
    finally:
        await pipeline.close()


async def test_schedulers_sit_in_front_of_the_engines_and_report_queue_wait() -> None:
    large = ScriptedEngine("large", large_answer)
    small = ScriptedEngine("small", copy_example)
    large.delay_s = 0.005
    pipeline = EchoPipeline.from_defaults(
        large=large,
        small=small,
        store=MemoryStore(),
        ranker=similarity_ranker(),
        predictor=True,
        scheduling=True,
        route={"threshold": 0.8},
        learn={"shadow_rate": 0.0, "probe_rate": 0.0},
        schedule={"max_concurrency": 1},
    )
    try:
        results = await pipeline.abatch([ask(f"Question {i} about thing {i}") for i in range(4)], max_concurrency=4)
        assert set(pipeline.schedulers) == {"large", "small"}
        assert all(not r.decision.offloaded for r in results)
        waits = [r.decision.queue_wait_s for r in results]
        assert max(waits) > 0  # one slot: three of four requests waited in the scheduler's queue
        assert all(r.decision.predicted_length is not None for r in results)
        snapshot = pipeline.schedulers["large"].metrics.snapshot()
        assert snapshot["all"]["requests"] == 4  # type: ignore[index]
        assert snapshot["all"]["outcomes"] == {"ok": 4}  # type: ignore[index]
    finally:
        await pipeline.close()
    assert pipeline.schedulers == {}


async def test_the_same_request_object_can_be_answered_twice_at_once(pipe: tuple) -> None:
    pipeline, large, *_ = pipe
    request = ask("A question asked twice at the same time", offload="never")
    first, second = await pipeline.abatch([request, request], max_concurrency=2)
    assert first.text == second.text
    assert len({r.request_id for r in large.requests}) == 2  # distinct engine request ids


async def test_replay_items_without_a_pending_check_are_answered_and_stored_when_idle() -> None:
    store = MemoryStore()
    await store.push_replay("default", "What is the capital of France?", None, 0.9)
    pipeline, large, _small, _ = make(store=store, learn={"shadow_rate": 0.0, "probe_rate": 0.0, "idle_poll_s": 0.01})
    try:
        await pipeline.start()
        learner = pipeline.learner
        assert learner is not None
        await until(lambda: learner.stats.replayed == 1)
        assert store.count() == 1
        stored = next(iter(store.examples["default"].values()))
        assert stored.response == LARGE_ANSWER
        assert large.requests[-1].priority >= 1_000_000
    finally:
        await pipeline.close()
