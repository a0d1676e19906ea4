"""EchoPipeline on real parts: embedded Chroma in a temporary folder, the real all-MiniLM-L6-v2 embedder, the shipped
ranker weights, and SmolLM2-135M-Instruct as both the small and the large model on the transformers engine.

SmolLM2 is the smallest real chat model; using it for both roles keeps the test affordable on a CPU while every
stage runs for real (tokenizer budgets, chat templates, Chroma writes and queries, background learning). Greedy
decoding makes the answers deterministic. Each test uses its own tenant, so they share one pipeline (the models
load once) without seeing each other's examples.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from echo_middleware.pipeline import EchoPipeline
from echo_middleware.types import EchoRequest, Message, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
PARAPHRASE = "Which city is the capital of France?"
UNRELATED = "How many legs does a spider have?"


def engine(**extra: Any) -> dict[str, Any]:
    return {
        "backend": "transformers",
        "model": MODEL,
        "speculative": {"method": "off"},
        "kv_cache_dtype": "auto",
        "max_model_len": 2048,
        **extra,
    }


def build(store_path: Path, share: EchoPipeline | None = None, **overrides: Any) -> EchoPipeline:
    """A pipeline with a fresh store; ``share``: reuse that pipeline's started engines (they stay its own)."""
    overrides.setdefault("route", {"threshold": 0.3})
    overrides.setdefault("rank", {"min_utility": 0.3})
    overrides.setdefault("learn", {"shadow_rate": 0.0, "probe_rate": 0.0, "idle_poll_s": 0.05})
    if share is not None:
        overrides.update(large=share.large_engine, small=share.small_engine)
    else:
        overrides.update(large=engine(), small=engine())
    return EchoPipeline.from_defaults(store={"path": store_path}, seed=0, **overrides)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pipeline(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, embedder_dir: Path
) -> AsyncIterator[EchoPipeline]:
    pipe = build(tmp_path_factory.mktemp("echo-store"))
    await pipe.start()
    yield pipe
    await pipe.close()


def ask(text: str, tenant: str, **kwargs: Any) -> EchoRequest:
    return EchoRequest(
        messages=[Message(role="user", content=text)], tenant=tenant, params=SamplingParams(max_tokens=24), **kwargs
    )


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def test_a_repeat_and_a_paraphrase_are_offloaded_with_the_large_answer_as_example(
    pipeline: EchoPipeline,
) -> None:
    t = tenant()
    first = await pipeline.agenerate(ask(QUESTION, t))
    assert not first.decision.offloaded
    assert first.decision.engine == pipeline.large_engine.name
    assert "no similar past request" in first.decision.reason
    assert first.text.strip()
    assert await pipeline.store.count(t) == 1  # durable before the call returned

    repeat = await pipeline.agenerate(ask(QUESTION, t))
    d = repeat.decision
    assert d.offloaded, d.reason
    assert d.engine == pipeline.small_engine.name
    assert len(d.examples) == 1
    assert d.examples[0].distance == pytest.approx(0.0, abs=1e-3)
    assert d.predicted_quality is not None
    assert d.threshold == 0.3
    assert d.predicted_quality >= 0.3
    assert {"embed", "retrieve", "rank", "route", "prompt", "generate", "learn"} <= set(d.stage_s)
    # the example really was in the small model's prompt: it used more prompt tokens than the bare question
    assert repeat.usage.prompt_tokens > first.usage.prompt_tokens

    paraphrase = await pipeline.agenerate(ask(PARAPHRASE, t))
    assert paraphrase.decision.offloaded, paraphrase.decision.reason
    assert paraphrase.decision.examples[0].distance > 0.01

    unrelated = await pipeline.agenerate(ask(UNRELATED, t))
    assert not unrelated.decision.offloaded
    assert "no usable example" in unrelated.decision.reason
    assert await pipeline.store.count(t) == 2  # the unrelated question's large answer became an example


async def test_the_calibrated_path_decides_with_the_shipped_calibration(pipeline: EchoPipeline, tmp_path: Path) -> None:
    auto = build(tmp_path / "store", pipeline, route={"target_retention": 0.9}, rank={})
    try:
        t = tenant()
        await auto.agenerate(ask(QUESTION, t))
        repeat = (await auto.agenerate(ask(QUESTION, t))).decision
        threshold, source = auto.policy.threshold()
        assert "calibrated for 90% retention" in source
        assert repeat.threshold == pytest.approx(threshold)
        assert repeat.predicted_quality is not None
        # a verbatim repeat of a large answer is what the shipped ranker is surest about
        assert repeat.predicted_quality > 0.9
        assert repeat.offloaded == (repeat.predicted_quality >= threshold)
        assert repeat.offloaded, repeat.reason
        assert "calibrated for 90% retention" in repeat.reason
    finally:
        await auto.close()
    assert pipeline.large_engine.started  # engines handed in stay open


async def test_shadow_checks_run_when_the_large_model_is_idle_and_record_utility(
    tmp_path: Path, pipeline: EchoPipeline
) -> None:
    learning = build(tmp_path / "store", pipeline, learn={"shadow_rate": 1.0, "probe_rate": 0.0, "idle_poll_s": 0.05})
    try:
        t = tenant()
        await learning.agenerate(ask(QUESTION, t))
        offloaded = await learning.agenerate(ask(QUESTION, t))
        assert offloaded.decision.offloaded
        learner = learning.learner
        assert learner is not None
        assert learner.stats.shadow_queued == 1
        assert await learner.drain(timeout_s=300)
        assert learner.stats.shadow_checked == 1
        measured = learner.stats.agreements[-1]
        # SmolLM2 copies its own earlier answer: the check measures agreement with the large (same) model
        assert 0.0 <= measured <= 1.0
        used = offloaded.decision.examples[0].id
        [example] = await learning.store.get(t, [used])
        assert example.utility_n >= 1
        assert example.utility_sum == pytest.approx(measured * example.utility_n, abs=1e-6)
        assert example.hits >= 2  # counted when used and when checked
        pairs = learning.policy.calibrator.pairs()
        assert pairs[-1] == (pytest.approx(offloaded.decision.predicted_quality), pytest.approx(measured))
    finally:
        await learning.close()


async def test_stream_ends_with_the_decision_and_matches_generate(pipeline: EchoPipeline) -> None:
    t = tenant()
    request = ask(QUESTION, t, offload="never")
    whole = await pipeline.agenerate(request)
    chunks = [c async for c in pipeline.astream(ask(QUESTION, t, offload="never"))]
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == whole.text
    assert all(c.decision is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.decision is not None
    assert not final.decision.offloaded
    assert final.decision.mode == "never"
    assert final.usage is not None
    assert final.usage.completion_tokens > 0


async def test_closing_a_stream_cancels_generation(pipeline: EchoPipeline) -> None:
    request = EchoRequest(
        messages=[Message(role="user", content="Count from 1 to 500, comma separated.")],
        tenant=tenant(),
        params=SamplingParams(max_tokens=400),
        offload="never",
    )
    stream = pipeline.astream(request)
    got = [await stream.__anext__() for _ in range(3)]
    assert all(c.text for c in got)
    await stream.aclose()
    for _ in range(200):
        if not pipeline.large_engine.in_flight():
            break
        await asyncio.sleep(0.05)
    assert pipeline.large_engine.in_flight() == []


async def test_sync_wrappers_inside_a_running_event_loop(pipeline: EchoPipeline) -> None:
    t = tenant()
    result = pipeline.generate(ask(QUESTION, t))  # blocks this running loop's thread; must not deadlock
    assert result.text
    assert not result.decision.offloaded
    chunks = list(pipeline.stream(ask(QUESTION, t)))
    assert chunks[-1].decision is not None
    assert chunks[-1].decision.offloaded
    results = pipeline.batch([ask(QUESTION, t), ask(UNRELATED, t)], max_concurrency=2)
    assert [r.decision.offloaded for r in results] == [True, False]


async def test_store_failure_falls_back_to_the_large_model(tmp_path: Path, pipeline: EchoPipeline) -> None:
    broken = build(tmp_path / "store", pipeline)
    try:
        t = tenant()
        await broken.agenerate(ask(QUESTION, t))
        await broken.store.close()  # the store goes away under the pipeline
        result = await broken.agenerate(ask(QUESTION, t))
        d = result.decision
        assert not d.offloaded
        assert result.text
        assert d.fallback is not None
        assert "store unavailable" in d.fallback
    finally:
        await broken.close()
