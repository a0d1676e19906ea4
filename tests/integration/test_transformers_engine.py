"""The transformers engine on the real SmolLM2-135M-Instruct: generation, streaming, cancellation, deadlines,
stop strings, speculation, priority queueing and the honest feature report.

Greedy decoding is deterministic, so answers are compared exactly. Long generations use a raw counting prompt
("1, 2, 3, ...") that the model continues for hundreds of tokens, so a cancel or deadline always lands mid-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from echo_middleware.config import EngineConfig
from echo_middleware.engines import create_engine
from echo_middleware.engines.transformers import TransformersEngine
from echo_middleware.errors import Cancelled, ConfigError, EngineError, EngineTimeout, FeatureUnsupported, ModelNotFound
from echo_middleware.types import EngineRequest, Message, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A raw prompt the model continues for hundreds of tokens (greedy: 11, 12, 13, ...)."""
CAPITAL = [Message(role="user", content="What is the capital of France?")]


def _chat(content: str, max_tokens: int = 48, **params: Any) -> EngineRequest:
    return EngineRequest(
        messages=[Message(role="user", content=content)], params=SamplingParams(max_tokens=max_tokens, **params)
    )


def _counting(max_tokens: int = 400, **kwargs: Any) -> EngineRequest:
    return EngineRequest(prompt=COUNTING, params=SamplingParams(max_tokens=max_tokens), **kwargs)


def _quantized_cache_backend() -> bool:
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    return bool(is_hqq_available() or is_optimum_quanto_available())


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    """The default configuration: speculation auto, fp8 KV and prefix caching requested, priority queue."""
    built = create_engine(EngineConfig(backend="transformers", model=MODEL))
    assert isinstance(built, TransformersEngine)
    await built.start()
    yield built
    await built.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def plain_engine(tiny_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    """Nothing requested: the reference for speculation tests (speculation must not change greedy output).

    float32, as the speculating engines in those tests: speculation verifies several tokens in one forward pass,
    and in bfloat16 those logits differ from one-token steps enough to flip a near-tie (seen with SmolLM2).
    """
    built = TransformersEngine(
        EngineConfig(
            backend="transformers",
            model=MODEL,
            dtype="float32",
            speculative={"method": "off"},
            kv_cache_dtype="auto",
            enable_prefix_caching=False,
            max_num_seqs=1,
        ),
        name="plain",
    )
    await built.start()
    yield built
    await built.close()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _record(engine: TransformersEngine, request_id: str) -> Any:
    return next(job for job in reversed(engine.finished) if job.request_id == request_id)


# ------------------------------------------------------------------------------------ generate


async def test_greedy_generate_is_deterministic_and_counts_tokens(engine: TransformersEngine, tokenizer: Any) -> None:
    first = await engine.generate(EngineRequest(messages=CAPITAL, params=SamplingParams(max_tokens=40)))
    second = await engine.generate(EngineRequest(messages=CAPITAL, params=SamplingParams(max_tokens=40)))
    assert "Paris" in first.text
    assert first.text == second.text
    assert first.finish_reason == "stop"
    prompt_ids = tokenizer.apply_chat_template(
        [m.model_dump() for m in CAPITAL], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert first.usage.prompt_tokens == len(prompt_ids)
    # The answer's tokens plus the end-of-turn token the model stopped on.
    assert first.usage.completion_tokens == len(tokenizer.encode(first.text, add_special_tokens=False)) + 1
    assert first.engine == engine.name
    assert first.model == MODEL
    assert first.timings.ttft_s is not None


async def test_max_tokens_ends_with_length(engine: TransformersEngine) -> None:
    result = await engine.generate(_counting(max_tokens=7))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 7
    assert result.text.startswith(" 11, 12")


async def test_stream_deltas_join_to_the_generated_text(engine: TransformersEngine) -> None:
    request = _chat("Name three colours.", max_tokens=40)
    whole = await engine.generate(request)
    deltas = [d async for d in engine.stream(request.model_copy(update={"request_id": "stream-1"}))]
    assert len([d for d in deltas if d.text]) > 5  # it really streams, piece by piece
    assert "".join(d.text for d in deltas) == whole.text
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == whole.finish_reason == "length"
    assert deltas[-1].usage == whole.usage


async def test_stop_string_is_cut_out_and_ends_generation(engine: TransformersEngine) -> None:
    full = await engine.generate(_counting(max_tokens=40))
    assert " 19," in full.text
    stopped = await engine.generate(
        _counting(max_tokens=40).model_copy(update={"params": SamplingParams(max_tokens=40, stop=["19", "zzz"])})
    )
    assert stopped.text == full.text[: full.text.index("19")]
    assert "19" not in stopped.text
    assert stopped.finish_reason == "stop"
    assert stopped.usage.completion_tokens < full.usage.completion_tokens


async def test_stop_string_across_stream_deltas(engine: TransformersEngine) -> None:
    request = EngineRequest(prompt=COUNTING, params=SamplingParams(max_tokens=40, stop=[" 15, 16"]))
    deltas = [d async for d in engine.stream(request)]
    text = "".join(d.text for d in deltas)
    assert text == " 11, 12, 13, 14,"
    assert deltas[-1].finish_reason == "stop"


async def test_seeded_sampling_is_reproducible(engine: TransformersEngine) -> None:
    a = await engine.generate(_chat("Tell me a story.", max_tokens=24, temperature=0.9, seed=7))
    b = await engine.generate(_chat("Tell me a story.", max_tokens=24, temperature=0.9, seed=7))
    assert a.text == b.text
    assert a.usage.completion_tokens == 24


async def test_count_tokens_and_context_window(engine: TransformersEngine, tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    assert await engine.count_tokens(text) == len(tokenizer.encode(text, add_special_tokens=False))
    assert engine.context_window == 4096  # min(model's 8192 positions, max_model_len=4096)
    health = await engine.health()
    assert health.ok
    assert "cpu" in health.detail or "cuda" in health.detail


async def test_prompt_longer_than_the_context_window_is_refused(engine: TransformersEngine) -> None:
    with pytest.raises(EngineError, match="context window is 4096"):
        await engine.generate(EngineRequest(prompt="word " * 5000))
    assert (await engine.generate(_counting(max_tokens=2))).usage.completion_tokens == 2  # still serving


# ------------------------------------------------------------------------------------ cancel, deadline


async def test_cancel_mid_stream_stops_generation(engine: TransformersEngine) -> None:
    request = _counting(max_tokens=400, request_id="cancel-me")
    seen: list[str] = []

    async def consume() -> None:
        async for delta in engine.stream(request):
            seen.append(delta.text)
            if len(seen) == 3:
                assert await engine.cancel("cancel-me", reason="client gone")

    with pytest.raises(Cancelled, match="client gone"):
        await consume()
    assert len(seen) == 3
    after = await engine.generate(_counting(max_tokens=3))  # served after the cancelled one's thread ended
    assert after.usage.completion_tokens == 3
    record = _record(engine, "cancel-me")
    assert record.outcome == "aborted"
    assert record.completion_tokens < 100  # the worker really stopped, far before its 400 tokens
    assert engine.in_flight() == []


async def test_consumer_leaving_stops_generation(engine: TransformersEngine) -> None:
    request = _counting(max_tokens=400, request_id="walk-away")
    async with contextlib.aclosing(engine.stream(request)) as stream:
        async for _delta in stream:
            break
    await engine.generate(_counting(max_tokens=2))
    record = _record(engine, "walk-away")
    assert record.outcome == "aborted"
    assert record.completion_tokens < 100


async def test_deadline_stops_generation_with_engine_timeout(engine: TransformersEngine) -> None:
    request = _counting(max_tokens=400, request_id="too-slow", deadline=time.time() + 1.5)
    with pytest.raises(EngineTimeout):
        await engine.generate(request)
    assert (await engine.generate(_counting(max_tokens=2))).usage.completion_tokens == 2
    record = _record(engine, "too-slow")
    assert record.outcome == "aborted"
    assert record.completion_tokens < 400


# ------------------------------------------------------------------------------------ priority


async def test_waiting_requests_are_served_by_priority_then_arrival(engine: TransformersEngine) -> None:
    served: list[str] = []

    async def run(name: str, priority: int) -> None:
        await engine.generate(_counting(max_tokens=2, request_id=name, priority=priority))
        served.append(name)

    blocker = engine.stream(_counting(max_tokens=400, request_id="blocker"))
    async with contextlib.aclosing(blocker):
        await blocker.__anext__()  # the blocker holds the one generation slot
        tasks = []
        for name, priority in [("p5", 5), ("p1-first", 1), ("p3", 3), ("p1-second", 1), ("p0", 0)]:
            tasks.append(asyncio.create_task(run(name, priority)))
            await asyncio.sleep(0.01)  # a distinct arrival order
        for _ in range(1000):
            if engine.load().waiting == 5:
                break
            await asyncio.sleep(0.01)
        assert engine.load().waiting == 5
        assert engine.load().running == 1
    await asyncio.gather(*tasks)  # closing the blocker freed the slot
    assert served == ["p0", "p1-first", "p1-second", "p3", "p5"]


async def test_cancel_while_waiting_in_the_queue(engine: TransformersEngine) -> None:
    blocker = engine.stream(_counting(max_tokens=400, request_id="blocker-2"))
    async with contextlib.aclosing(blocker):
        await blocker.__anext__()
        waiting = asyncio.create_task(engine.generate(_counting(max_tokens=2, request_id="queued")))
        for _ in range(1000):
            if "queued" in engine.in_flight():
                break
            await asyncio.sleep(0.01)
        assert await engine.cancel("queued")
        with pytest.raises(Cancelled):
            await waiting
    assert (await engine.generate(_counting(max_tokens=2))).usage.completion_tokens == 2


# ------------------------------------------------------------------------------------ features


async def test_feature_report_is_honest(engine: TransformersEngine) -> None:
    features = engine.features
    ngram = features["speculative_ngram"]
    if engine.device == "cpu":  # speculative.method="auto": prompt lookup is slower on CPU and left off
        assert not ngram.requested
        assert not ngram.enabled
        assert "speculative.method='ngram'" in ngram.detail
    else:
        assert ngram.requested
        assert ngram.enabled
    assert not features["speculative_draft"].requested
    assert features["priority"].enabled
    assert features["prefix_caching"].requested
    assert not features["prefix_caching"].enabled
    assert features["batching"].requested
    assert not features["batching"].enabled
    kv = features["kv_cache_quantized"]
    assert kv.requested  # kv_cache_dtype='fp8' is the default
    assert kv.enabled == _quantized_cache_backend()
    if not kv.enabled:
        assert "no fp8 KV cache" in kv.detail
        assert "optimum-quanto" in kv.detail


async def test_plain_engine_requests_nothing(plain_engine: TransformersEngine) -> None:
    features = plain_engine.features
    assert not any(status.requested for status in features.values() if status is not features["priority"])
    assert not any(status.enabled for name, status in features.items() if name != "priority")


async def test_strict_mode_refuses_fp8_kv_cache_naming_the_field(tiny_model_dir: Path) -> None:
    if _quantized_cache_backend():
        pytest.skip("a quantized-cache backend is installed: the fp8 request is served, not refused")
    strict = TransformersEngine(
        EngineConfig(backend="transformers", model=MODEL, strict=True, enable_prefix_caching=False)
    )
    with pytest.raises(FeatureUnsupported, match=r"kv_cache_dtype.*Fix: set kv_cache_dtype='auto'"):
        await strict.start()
    assert not strict.started


async def test_ngram_speculation_keeps_greedy_output(
    engine: TransformersEngine, plain_engine: TransformersEngine
) -> None:
    # An answer that copies from its prompt: where prompt lookup proposes tokens that are accepted.
    text = "The quarterly report shows revenue grew by twelve percent while costs fell by three percent."
    request = _chat(f"Repeat this sentence exactly, then say done: {text}", max_tokens=48)
    lookup = TransformersEngine(
        EngineConfig(
            backend="transformers",
            model=MODEL,
            dtype="float32",
            speculative={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
            kv_cache_dtype="auto",
            enable_prefix_caching=False,
        ),
        name="lookup",
    )
    async with lookup:
        assert lookup.features["speculative_ngram"].enabled
        with_lookup = await lookup.generate(request)
        streamed = "".join([d.text async for d in lookup.stream(request.model_copy(update={"request_id": "s"}))])
    without = await plain_engine.generate(request)
    assert text in without.text  # the model does copy: prompt lookup has something to find
    assert with_lookup.text == without.text == streamed
    assert with_lookup.usage == without.usage
    # The default engine (bfloat16) runs the same lookup path.
    assert (await engine.generate(request)).usage.prompt_tokens == without.usage.prompt_tokens


async def test_draft_model_speculation_keeps_greedy_output(
    plain_engine: TransformersEngine, tiny_model_dir: Path
) -> None:
    drafted = TransformersEngine(
        EngineConfig(
            backend="transformers",
            model=MODEL,
            dtype="float32",
            speculative={"method": "draft", "draft_model": MODEL, "num_speculative_tokens": 3},
            kv_cache_dtype="auto",
            enable_prefix_caching=False,
        ),
        name="drafted",
    )
    async with drafted:
        status = drafted.features["speculative_draft"]
        assert status.requested
        assert status.enabled, status.detail
        assert not drafted.features["speculative_ngram"].requested
        for request in (_chat("Name three colours.", max_tokens=32), EngineRequest(messages=CAPITAL)):
            assert (await drafted.generate(request)).text == (await plain_engine.generate(request)).text
        streamed = "".join([d.text async for d in drafted.stream(_chat("Name three colours.", max_tokens=32))])
        assert streamed == (await plain_engine.generate(_chat("Name three colours.", max_tokens=32))).text


async def test_draft_with_another_tokenizer_is_refused(tiny_model_dir: Path) -> None:
    from echo_middleware.models import model_path

    try:
        model_path("qwen2.5-coder-0.5b-instruct")
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    mismatched = TransformersEngine(
        EngineConfig(
            backend="transformers",
            model=MODEL,
            speculative={"method": "draft", "draft_model": "qwen2.5-coder-0.5b-instruct"},
            kv_cache_dtype="auto",
        )
    )
    with pytest.raises(ConfigError, match=r"speculative\.draft_model='qwen2\.5-coder-0\.5b-instruct'.*tokenizer"):
        await mismatched.start()


async def test_missing_model_folder_names_the_fetch_command(tmp_path: Path) -> None:
    missing = TransformersEngine(EngineConfig(backend="transformers", model=MODEL), models_dir=tmp_path)
    with pytest.raises(ModelNotFound, match=f"echo-middleware models fetch {MODEL}"):
        await missing.generate(_counting(max_tokens=2))
    assert not missing.started
    health = await missing.health()
    assert not health.ok


async def test_model_given_as_a_folder_with_one_cpu_thread(tiny_model_dir: Path) -> None:
    import torch

    by_path = TransformersEngine(
        EngineConfig(backend="transformers", model=str(tiny_model_dir), speculative={"method": "off"}, cpu_threads=1)
    )
    async with by_path:
        result = await by_path.generate(_counting(max_tokens=7))
        if by_path._device == "cpu":
            assert by_path._executor is not None
            assert by_path._executor.submit(torch.get_num_threads).result() == 1
            assert "1 threads" in (await by_path.health()).detail
    assert result.text.startswith(" 11, 12")
    assert not by_path.started
