"""The store's pure policy: tenant names, input limits, value, dedupe wording, merging, and the record codec."""

from __future__ import annotations

import asyncio
import math
import threading

import numpy as np
import pytest

from echo_middleware.errors import ConfigError
from echo_middleware.store.base import (
    better_answer,
    example_value,
    example_values,
    is_expired,
    mean_utility,
    merge_examples,
    same_wording,
    validate_tenant,
    validate_text,
    validate_utility,
)
from echo_middleware.store.chroma import _Writer, from_record, replay_id, to_record
from echo_middleware.types import Example, Message

DAY = 86_400.0


def ex(**kw: object) -> Example:
    base: dict[str, object] = {"request": "q", "response": "a", "created_at": 1000.0, "last_used": 1000.0}
    return Example(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "acme", "Team-42", "a_b", "x" * 64, "0"])
def test_good_tenant_names(name: str) -> None:
    assert validate_tenant(name) == name


@pytest.mark.parametrize("name", ["", "_replay", "-a", "a-", "a b", "a.b", "a/b", "x" * 65, "é", None, 3])
def test_bad_tenant_names(name: object) -> None:
    with pytest.raises(ConfigError, match="tenant="):
        validate_tenant(name)


def test_text_limits_name_the_field() -> None:
    assert validate_text("hello", "request", 5) == "hello"
    with pytest.raises(ConfigError, match="request is empty"):
        validate_text(" \t", "request", 5)
    with pytest.raises(ConfigError, match="response has 6 characters.*max_text_chars=5"):
        validate_text("hello!", "response", 5)
    with pytest.raises(ConfigError, match="must be a string"):
        validate_text(None, "request", 5)


@pytest.mark.parametrize("bad", [-0.1, 1.01, math.nan, math.inf, True, "0.5"])
def test_utilities_are_bounded(bad: object) -> None:
    with pytest.raises(ConfigError, match="u="):
        validate_utility(bad, "u")  # type: ignore[arg-type]
    assert validate_utility(None, "u") is None
    assert validate_utility(1, "u") == 1.0


def test_value_grows_with_utility_hits_and_recency() -> None:
    now = 1000.0 + 10 * DAY
    base = ex(last_used=now)
    assert example_value(base.model_copy(update={"utility_sum": 9.0, "utility_n": 10}), now, 7 * DAY) > example_value(
        base.model_copy(update={"utility_sum": 1.0, "utility_n": 10}), now, 7 * DAY
    )
    assert example_value(base.model_copy(update={"hits": 10}), now, 7 * DAY) > example_value(base, now, 7 * DAY)
    stale = base.model_copy(update={"last_used": now - 7 * DAY})
    assert example_value(stale, now, 7 * DAY) == pytest.approx(example_value(base, now, 7 * DAY) / 2)
    assert example_value(base, now, 7 * DAY) > 0


def test_value_of_arrays_matches_value_of_one() -> None:
    now = 5 * DAY
    items = [ex(hits=h, utility_sum=s, utility_n=n, last_used=u) for h, s, n, u in [(0, 0, 0, 0), (5, 2.5, 3, DAY)]]
    values = example_values(
        np.array([e.created_at for e in items]),
        np.array([e.last_used for e in items]),
        np.array([e.hits for e in items]),
        np.array([e.utility_sum for e in items]),
        np.array([e.utility_n for e in items]),
        now,
        DAY,
    )
    assert values.tolist() == pytest.approx([example_value(e, now, DAY) for e in items])


def test_prior_keeps_unscored_examples_in_the_middle() -> None:
    assert mean_utility(ex()) == 0.5
    assert mean_utility(ex(utility_sum=2.0, utility_n=2)) == pytest.approx(0.75)


def test_ttl_counts_from_creation() -> None:
    item = ex(created_at=0.0, last_used=99.0)
    assert is_expired(item, 100.0, 50.0)
    assert not is_expired(item, 40.0, 50.0)
    assert not is_expired(item, 1e12, None)


def test_better_answer_prefers_known_quality_then_utility() -> None:
    a, b = ex(quality=0.4), ex(quality=0.9)
    assert better_answer(a, b) is b
    assert better_answer(ex(), ex(quality=0.1)).quality == 0.1
    high = ex(utility_sum=3.0, utility_n=3)
    assert better_answer(ex(), high) is high
    same = ex()
    assert better_answer(same, ex()) is same


def test_merge_keeps_the_better_answer_and_sums_usage() -> None:
    stored = ex(id="old", response="It is Paris, I think.", quality=0.3, hits=4, utility_sum=1.0, utility_n=2)
    new = ex(id="new", response="Paris.", quality=0.9, hits=1, created_at=2000.0, last_used=3000.0, utility_n=1)
    merged = merge_examples(stored, new, keep_id="old")
    assert (merged.id, merged.response, merged.quality) == ("old", "Paris.", 0.9)
    assert (merged.hits, merged.utility_n, merged.utility_sum) == (5, 3, 1.0)
    assert (merged.created_at, merged.last_used) == (1000.0, 3000.0)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is the capital of France?", "what is the capital of france"),
        ("How do I change the email address on my account?", "How do I chnage the email adress on my acount?"),
        ("How do I request a repeat prescription?", "How do I reqest a repeat perscription?"),
        ("Can I add an extra bag to my flight booking?", "Hello there, can I add an extra bag to my flight booking?"),
        ("How do I apply for a student loan?", "Hiya, how do I apply for a student loan? Thanks in advance"),
        ("What's the best way to remove limescale?", "so whats the best way to remove limescale"),
        ("How do I set up my e-mail?", "how do i set up my email please"),
    ],
)
def test_same_wording_accepts_retries_and_typos(a: str, b: str) -> None:
    assert same_wording(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Transfer £50 from my savings to my current account", "Transfer £50 from my current account to my savings"),
        ("Can I take 2 paracetamol every 4 hours?", "Can I take 2 paracetamol every 2 hours?"),
        ("Is ibuprofen safe to take with alcohol?", "Is ibuprofen unsafe to take with alcohol?"),
        ("How much is delivery for orders under £50?", "How much is delivery for orders over £50?"),
        ("What's the capital of Australia?", "What's the capital of Austria?"),
        ("What's Mary's phone number?", "What's Mark's phone number?"),
        ("What's the legal drinking age in the UK?", "What's the legal drinking age in the US?"),
        ("How do I increase the font size?", "How do I decrease the font size?"),
        ("How do I archive a project?", "How do I unarchive a project?"),
        ("Should I cancel my subscription?", "Should I not cancel my subscription?"),
        ("How do I convert a Word document to PDF?", "How do I convert a PDF to a Word document?"),
    ],
)
def test_same_wording_refuses_traps(a: str, b: str) -> None:
    assert not same_wording(a, b)


def test_record_codec_round_trips_every_field() -> None:
    original = Example(
        id="e1",
        tenant="acme",
        request="Capital of France?",
        messages=[Message(role="user", content="Capital of France?")],
        response="Paris",
        model="m",
        created_at=1.5,
        last_used=2.5,
        hits=3,
        prompt_tokens=4,
        response_tokens=5,
        quality=0.7,
        utility_sum=1.25,
        utility_n=2,
        offload_successes=1,
        metadata={"k": [1, "two"]},
    )
    rid, document, meta = to_record(original)
    assert (rid, document) == ("e1", "Capital of France?")
    assert all(isinstance(v, str | int | float) or v is None for v in meta.values())
    assert from_record("acme", rid, document, meta) == original
    plain = ex(id="p")
    _, _, plain_meta = to_record(plain)
    assert plain_meta["quality"] is None
    assert plain_meta["messages"] is None  # written as None so an upsert clears an old value
    assert from_record("default", "p", "q", {k: v for k, v in plain_meta.items() if v is not None}) == plain


def test_record_codec_refuses_metadata_that_is_not_json() -> None:
    with pytest.raises(ConfigError, match="JSON"):
        to_record(ex(metadata={"bad": object()}))


def test_replay_ids_normalise_the_request_per_tenant() -> None:
    assert replay_id("a", "Why is the sky  blue") == replay_id("a", "why is the sky blue")
    assert replay_id("a", "why is the sky blue") != replay_id("b", "why is the sky blue")
    assert replay_id("a", "why is the sky blue") != replay_id("a", "why is the sea blue")


async def test_writer_batches_concurrent_operations_in_order() -> None:
    batches: list[list[tuple[str, int]]] = []
    gate = threading.Event()

    def apply(ops: list) -> list:  # type: ignore[type-arg]
        gate.wait(5)
        batches.append([(op.kind, op.payload) for op in ops])
        return [ValueError("bad") if op.payload == 3 else op.payload * 10 for op in ops]

    writer = _Writer(apply)
    first = asyncio.create_task(writer.submit("add", 0))
    await asyncio.sleep(0.05)  # the writer has taken the first batch (held at the gate in its thread)
    rest = [asyncio.create_task(writer.submit("use", i)) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert results[:2] == [10, 20]
    assert isinstance(results[2], ValueError)
    assert results[3:] == [40, 50]
    assert batches == [[("add", 0)], [("use", i) for i in range(1, 6)]]  # queued callers became one batch
