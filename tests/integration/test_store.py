"""The example store against real Chroma with the real all-MiniLM-L6-v2 embedder.

Every behaviour is checked twice: embedded (``PersistentClient`` in a temporary folder) and against a real
``chroma run --host 127.0.0.1`` server started once for the session (each test gets its own collection prefix).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from echo_middleware.config import EmbedConfig, StoreConfig
from echo_middleware.embed import SentenceEmbedder
from echo_middleware.errors import ConfigError, EmbeddingMismatch, StoreError, StoreUnavailable
from echo_middleware.store import ExampleStore
from echo_middleware.types import Example, Message

pytestmark = pytest.mark.integration

CHROMA = Path(sys.executable).parent / "chroma"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def embedder(embedder_dir: Path) -> SentenceEmbedder:
    return SentenceEmbedder(EmbedConfig(), models_dir=embedder_dir.parent)


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A real Chroma server on a free local port, for the whole session."""
    if not CHROMA.exists():
        pytest.skip(f"no chroma CLI at {CHROMA}")
    port = _free_port()
    data = tmp_path_factory.mktemp("chroma-server")
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(CHROMA), "run", "--host", "127.0.0.1", "--port", str(port), "--path", str(data / "db")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"chroma run did not start: {(data / 'server.log').read_text()[-2000:]}")
        time.sleep(0.3)
    yield "127.0.0.1", port
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _config(mode: str, tmp_path: Path, server: tuple[str, int] | None, **extra: object) -> StoreConfig:
    if mode == "embedded":
        return StoreConfig(path=tmp_path / "store", **extra)
    assert server is not None
    prefix = f"t{uuid.uuid4().hex[:10]}_"  # each test its own collections on the shared server
    return StoreConfig(host=server[0], port=server[1], collection_prefix=prefix, timeout_s=30, **extra)


@pytest.fixture(params=["embedded", "server"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(
    mode: str, tmp_path: Path, embedder: SentenceEmbedder, request: pytest.FixtureRequest
) -> Iterator[object]:
    """A factory of stores in the current mode; all are closed at the end of the test."""
    server = request.getfixturevalue("chroma_server") if mode == "server" else None
    made: list[ExampleStore] = []
    shared: dict[str, StoreConfig] = {}

    def make(**extra: object) -> ExampleStore:
        if "config" not in shared or extra:
            shared["config"] = _config(mode, tmp_path, server, **extra)
        store = ExampleStore(shared["config"], embedder)
        made.append(store)
        return store

    yield make
    for store in made:
        asyncio.run(store.close())


@pytest.fixture
async def store(make_store: object) -> AsyncIterator[ExampleStore]:
    s = make_store()  # type: ignore[operator]
    yield s
    await s.close()


def same(a: list[Example], b: list[Example]) -> bool:
    """Equal, with timestamps compared to a microsecond (Chroma keeps float metadata to about one ulp)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("created_at", "last_used"):
            assert getattr(x, name) == pytest.approx(getattr(y, name), abs=1e-6)
        assert x.model_dump(exclude={"created_at", "last_used"}) == y.model_dump(exclude={"created_at", "last_used"})
    return True


def ex(request: str, response: str = "an answer", tenant: str = "acme", **kw: object) -> Example:
    return Example(tenant=tenant, request=request, response=response, **kw)  # type: ignore[arg-type]


QUESTIONS = [
    "when was the last time anyone was on the moon",
    "who wrote he ain't heavy he's my brother lyrics",
    "how many seasons of the bastard executioner are there",
    "when did the eagles win last super bowl",
    "who won last year's ncaa women's basketball",
    "when did the isle of wight become an island",
    "What kind of work does Ralph Ulveling do?",
    "Where was Alison Kreviazuk born?",
    "Janet's ducks lay 16 eggs per day. How much does she make at the farmers' market?",
    "What is the capital of arrondissement of Guingamp?",
]


# ------------------------------------------------------------------------------------------- basic operations


async def test_add_get_round_trip_keeps_every_field(store: ExampleStore) -> None:
    original = ex(
        "What is the capital of France?",
        "Paris.",
        messages=[Message(role="system", content="Be brief."), Message(role="user", content="Capital of France?")],
        model="qwen2.5-coder-1.5b-instruct",
        created_at=1_700_000_000.25,
        last_used=1_700_000_100.5,
        hits=3,
        prompt_tokens=17,
        response_tokens=2,
        quality=0.875,
        utility_sum=1.5,
        utility_n=2,
        offload_successes=1,
        metadata={"source": "test", "nested": {"a": [1, 2]}},
    )
    [eid] = await store.add([original])
    assert eid == original.id
    [got] = await store.get("acme", [eid])
    assert got == original
    assert await store.get("acme", ["missing", eid, "missing-too"]) == [original]
    assert await store.count("acme") == 1


async def test_query_returns_nearest_first_with_cosine_distances(store: ExampleStore) -> None:
    ids = await store.add([ex(q, f"answer {i}") for i, q in enumerate(QUESTIONS)])
    assert len(set(ids)) == len(QUESTIONS)
    found = await store.query("when did anyone last walk on the moon", "acme", k=3)
    assert found[0].example.id == ids[0]
    distances = [c.distance for c in found]
    assert distances == sorted(distances)
    assert len(found) == 3
    assert 0.0 <= distances[0] < 0.5 < distances[-1] <= 2.0
    exact = await store.query(QUESTIONS[3], "acme", k=1)
    assert exact[0].example.id == ids[3]
    assert exact[0].distance == pytest.approx(0.0, abs=1e-4)
    everything = await store.query(QUESTIONS[0], "acme", k=50)
    assert len(everything) == len(QUESTIONS)


async def test_query_with_a_precomputed_embedding_matches_text_query(
    store: ExampleStore, embedder: SentenceEmbedder
) -> None:
    await store.add([ex(q) for q in QUESTIONS])
    text = "who sang he ain't heavy"
    by_text = await store.query(text, "acme", k=4)
    by_vector = await store.query(text, "acme", k=4, embedding=embedder.embed([text])[0])
    assert [c.example.id for c in by_text] == [c.example.id for c in by_vector]


async def test_unknown_tenant_reads_empty_and_is_not_created(store: ExampleStore) -> None:
    assert await store.query("anything at all", "ghost", k=5) == []
    assert await store.get("ghost", ["x"]) == []
    assert await store.count("ghost") == 0
    assert await store.record_use("ghost", {"x": 0.5}) == 0
    assert await store.delete("ghost", ["x"]) == 0
    assert (await store.stats("ghost")).count == 0
    assert "ghost" not in await store.tenants()


async def test_update_and_delete(store: ExampleStore) -> None:
    ids = await store.add([ex(q) for q in QUESTIONS[:4]])
    [first] = await store.get("acme", [ids[0]])
    await store.update(first.model_copy(update={"response": "14 December 1972", "quality": 1.0}))
    [changed] = await store.get("acme", [ids[0]])
    assert (changed.response, changed.quality) == ("14 December 1972", 1.0)
    moved = first.model_copy(update={"request": "Who painted the Mona Lisa?"})
    await store.update(moved)
    assert (await store.query("Mona Lisa painter", "acme", k=1))[0].example.id == ids[0]
    with pytest.raises(StoreError, match="no example"):
        await store.update(ex("a question never stored", id="nope"))
    assert await store.delete("acme", [ids[1], ids[2], "not-there"]) == 2
    assert await store.count("acme") == 2
    assert await store.get("acme", [ids[1]]) == []


async def test_store_survives_close_and_reopen(make_store: object) -> None:
    first = make_store()  # type: ignore[operator]
    ids = await first.add([ex(q) for q in QUESTIONS])
    await first.close()
    with pytest.raises(StoreError, match="closed"):
        await first.count("acme")
    second = make_store()  # type: ignore[operator]
    assert await second.count("acme") == len(QUESTIONS)
    assert [e.id for e in await second.get("acme", ids)] == ids


# ------------------------------------------------------------------------------------------- tenants


async def test_tenants_are_isolated(store: ExampleStore) -> None:
    [a_id] = await store.add([ex("Who wrote Hamlet?", "Shakespeare", tenant="alpha")])
    [b_id] = await store.add([ex("Who wrote Hamlet?", "William Shakespeare", tenant="beta")])
    await store.add([ex(q, tenant="beta") for q in QUESTIONS])
    assert sorted(await store.tenants()) == ["alpha", "beta"]
    alpha = await store.query("Hamlet author", "alpha", k=10)
    assert [c.example.id for c in alpha] == [a_id]
    assert alpha[0].example.tenant == "alpha"
    assert await store.get("alpha", [b_id]) == []
    assert await store.delete_tenant("alpha") == 1
    assert await store.tenants() == ["beta"]
    assert await store.count("beta") == len(QUESTIONS) + 1
    assert (await store.query("Hamlet author", "beta", k=1))[0].example.id == b_id
    assert await store.delete_tenant("alpha") == 0


async def test_add_spanning_tenants_returns_ids_in_input_order(store: ExampleStore) -> None:
    items = [ex(q, tenant=("t1", "t2", "t3")[i % 3]) for i, q in enumerate(QUESTIONS)]
    ids = await store.add(items)
    assert ids == [e.id for e in items]
    assert [await store.count(t) for t in ("t1", "t2", "t3")] == [4, 3, 3]


@pytest.mark.parametrize("bad", ["", "_replay", "a b", "x" * 65, "-lead", "trail-", "a/b", "ü", "a.b"])
async def test_bad_tenant_names_are_refused(store: ExampleStore, bad: str) -> None:
    with pytest.raises(ConfigError, match="tenant"):
        await store.add([ex("a question", tenant=bad)])
    with pytest.raises(ConfigError, match="tenant"):
        await store.query("a question", bad, k=1)
    with pytest.raises(ConfigError, match="tenant"):
        await store.count(bad)
    with pytest.raises(ConfigError, match="tenant"):
        await store.delete_tenant(bad)
    assert await store.tenants() == []


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("request_text", "response", "field"),
    [
        ("", "fine", "request"),
        ("   \n", "fine", "request"),
        ("fine", "", "response"),
        ("x" * 2001, "fine", "request"),
        ("fine", "y" * 2001, "response"),
    ],
)
async def test_empty_or_oversized_text_is_refused_and_nothing_is_written(
    make_store: object, request_text: str, response: str, field: str
) -> None:
    store = make_store(max_text_chars=2000)  # type: ignore[operator]
    good = ex("a perfectly fine question")
    with pytest.raises(ConfigError, match=rf"examples\[1\]\.{field}"):
        await store.add([good, Example(tenant="acme", request=request_text, response=response)])
    assert await store.count("acme") == 0
    if field == "request":
        with pytest.raises(ConfigError, match="text"):
            await store.query(request_text, "acme", k=3)


async def test_other_bad_arguments(store: ExampleStore) -> None:
    [eid] = await store.add([ex("a stored question")])
    with pytest.raises(ConfigError, match="k="):
        await store.query("q", "acme", k=0)
    with pytest.raises(ConfigError, match="utilities"):
        await store.record_use("acme", {eid: 1.5})
    with pytest.raises(ConfigError, match="utilities"):
        await store.record_use("acme", {eid: float("nan")})
    with pytest.raises(ConfigError, match="quality"):
        await store.add([ex("another question", quality=2.0)])
    with pytest.raises(ConfigError, match="list"):
        await store.add(ex("a lone example"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="list"):
        await store.get("acme", eid)
    [kept] = await store.get("acme", [eid])
    assert kept.hits == 0


async def test_dimension_mismatch_is_refused(
    make_store: object, embedder: SentenceEmbedder, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = make_store()  # type: ignore[operator]
    await store.add([ex("What is the capital of France?")])
    with pytest.raises(EmbeddingMismatch, match="shape"):
        await store.query("capital of France", "acme", k=1, embedding=np.ones(128, dtype=np.float32))
    await store.close()
    # A real second embedder: SmolLM2's hidden states, mean-pooled by sentence-transformers (576 dimensions).
    other = SentenceEmbedder(EmbedConfig(model=str(tiny_model_dir), batch_size=1, cache_size=0))
    reopened = ExampleStore(store.config, other)
    try:
        assert other.dim != embedder.dim
        with pytest.raises(EmbeddingMismatch, match=r"dimension 384.*dimension 576"):
            await reopened.query("capital of France", "acme", k=1)
        with pytest.raises(EmbeddingMismatch, match="export_jsonl"):
            await reopened.add([ex("What is the capital of Spain?")])
        # The way out works across the mismatch: export, drop, import (re-embeds with the new model).
        path = tmp_path / "move.jsonl"
        assert await reopened.export_jsonl("acme", path) == 1
        assert await reopened.delete_tenant("acme") == 1
        assert await reopened.import_jsonl(path) == 1
        found = await reopened.query("capital of France", "acme", k=1)
        assert found[0].example.request == "What is the capital of France?"
    finally:
        await reopened.close()


# ------------------------------------------------------------------------------------------- broken stores


def test_corrupt_store_raises_a_clear_error(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "chroma.sqlite3").write_bytes(b"this is not a database" * 200)
    store = ExampleStore(StoreConfig(path=folder), embedder)
    with pytest.raises(StoreError, match="corrupt") as info:
        asyncio.run(store.count("acme"))
    assert not isinstance(info.value, StoreUnavailable)
    assert (folder / "chroma.sqlite3").read_bytes().startswith(b"this is not a database")  # left for the user


def test_truncated_store_raises_a_clear_error(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    folder = tmp_path / "store"
    store = ExampleStore(StoreConfig(path=folder), embedder)
    asyncio.run(store.add([ex(q) for q in QUESTIONS]))
    asyncio.run(store.close())
    db = folder / "chroma.sqlite3"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3] + b"\0" * 4096)
    broken = ExampleStore(StoreConfig(path=folder), embedder)
    with pytest.raises(StoreError, match="corrupt"):
        asyncio.run(broken.count("acme"))


def test_store_path_that_is_a_file(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        asyncio.run(ExampleStore(StoreConfig(path=target), embedder).count("acme"))


async def test_a_locked_store_refuses_a_second_opener(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    config = StoreConfig(path=tmp_path / "store", lock_timeout_s=0.5)
    first = ExampleStore(config, embedder)
    await first.add([ex("held by the first store")])
    second = ExampleStore(config, embedder)
    with pytest.raises(StoreUnavailable, match=f"pid {os.getpid()}"):
        await second.count("acme")
    await first.close()
    assert await second.count("acme") == 1
    await second.close()


async def test_unreachable_server_is_store_unavailable(embedder: SentenceEmbedder) -> None:
    store = ExampleStore(StoreConfig(host="127.0.0.1", port=_free_port(), timeout_s=1, max_retries=1), embedder)
    with pytest.raises(StoreUnavailable, match="chroma run"):
        await store.query("is anyone there", "acme", k=1)


async def test_server_that_accepts_but_never_answers_times_out(embedder: SentenceEmbedder) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        store = ExampleStore(StoreConfig(host="127.0.0.1", port=port, timeout_s=0.5, max_retries=0), embedder)
        with pytest.raises(StoreUnavailable, match="ReadTimeout"):  # the timeout fired; no hang
            await store.count("acme")
    finally:
        silent.close()


# ------------------------------------------------------------------------------------------- concurrency


async def test_concurrent_record_use_loses_no_update(store: ExampleStore) -> None:
    ids = await store.add([ex(q) for q in QUESTIONS[:3]])
    calls = 120

    async def use(i: int) -> int:
        utilities: dict[str, float | None] = {ids[0]: 0.25, ids[1]: None}
        if i % 2:
            utilities[ids[2]] = 1.0
        return await store.record_use("acme", utilities, success=(i % 3 == 0))

    counts = await asyncio.gather(*(use(i) for i in range(calls)))
    assert sum(counts) == 2 * calls + calls // 2
    a, b, c = await store.get("acme", ids)
    assert (a.hits, a.utility_n, a.utility_sum) == (calls, calls, pytest.approx(0.25 * calls))
    assert (b.hits, b.utility_n, b.utility_sum) == (calls, 0, 0.0)
    assert (c.hits, c.utility_n, c.utility_sum) == (calls // 2, calls // 2, pytest.approx(calls / 2))
    successes = len([i for i in range(calls) if i % 3 == 0])
    assert a.offload_successes == b.offload_successes == successes
    assert c.offload_successes == len([i for i in range(calls) if i % 3 == 0 and i % 2])
    assert a.last_used >= a.created_at


async def test_concurrent_adds_queries_and_uses(store: ExampleStore) -> None:
    texts = [f"{q} (variant {i})" for i in range(4) for q in QUESTIONS]
    first = await store.add([ex("seed question about rivers")])

    async def writer(i: int) -> list[str]:
        return await store.add([ex(texts[i])])

    async def reader() -> int:
        return len(await store.query("rivers and seas", "acme", k=5))

    results = await asyncio.gather(
        *(writer(i) for i in range(len(texts))),
        *(reader() for _ in range(10)),
        *(store.record_use("acme", {first[0]: 0.5}) for _ in range(30)),
        store.add([ex(q, tenant="other") for q in QUESTIONS]),
    )
    added = [r[0] for r in results[: len(texts)]]
    assert await store.count("acme") == len(set(added)) + 1
    assert all(isinstance(n, int) and n >= 1 for n in results[len(texts) : len(texts) + 10])
    [seed] = await store.get("acme", first)
    assert seed.hits == 30
    assert await store.count("other") == len(QUESTIONS)


# ------------------------------------------------------------------------------------------- export / import


async def test_export_import_round_trip(store: ExampleStore, tmp_path: Path) -> None:
    items = [ex(q, f"answer {i}", quality=i / 10, hits=i, metadata={"i": i}) for i, q in enumerate(QUESTIONS)]
    await store.add(items)
    path = tmp_path / "backup" / "acme.jsonl"
    assert await store.export_jsonl("acme", path) == len(items)
    lines = path.read_text().splitlines()
    assert len(lines) == len(items)
    assert "embedding" not in json.loads(lines[0])
    assert await store.delete_tenant("acme") == len(items)
    assert await store.import_jsonl(path) == len(items)
    restored = await store.get("acme", [e.id for e in items])
    assert same(restored, items)
    # Seeding another tenant from the same file.
    assert await store.import_jsonl(path, tenant="copy") == len(items)
    assert {e.id for e in await store.get("copy", [e.id for e in items])} == {e.id for e in items}
    # With embeddings: the vectors are reused (same embedder) and queries still find the right rows.
    with_vectors = tmp_path / "vectors.jsonl"
    assert await store.export_jsonl("acme", with_vectors, include_embeddings=True) == len(items)
    record = json.loads(with_vectors.read_text().splitlines()[0])
    assert len(record["embedding"]) == 384
    assert record["embedder"] == "sentence-transformers/all-minilm-l6-v2"
    assert await store.import_jsonl(with_vectors, tenant="fast") == len(items)
    assert (await store.query(QUESTIONS[4], "fast", k=1))[0].example.id == items[4].id


async def test_import_refuses_a_bad_file_without_writing(store: ExampleStore, tmp_path: Path) -> None:
    path = tmp_path / "seed.jsonl"
    good = ex("a good seed question").model_dump_json()
    path.write_text(good + "\n" + good.replace('"a good seed question"', '""') + "\n")
    with pytest.raises(ConfigError, match="line 2"):
        await store.import_jsonl(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ConfigError, match="line 2"):
        await store.import_jsonl(path)
    assert await store.count("acme") == 0
    with pytest.raises(ConfigError, match="does not exist"):
        await store.import_jsonl(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------- management


async def test_dedupe_keeps_the_better_answer_and_sums_usage(store: ExampleStore) -> None:
    [first] = await store.add([ex("What is the capital of France?", "It is Paris, I think.", quality=0.4, hits=2)])
    [second] = await store.add([ex("what is the capital of france?", "Paris.", quality=0.95, hits=1)])
    assert second == first  # merged into the stored id
    assert await store.count("acme") == 1
    [merged] = await store.get("acme", [first])
    assert (merged.response, merged.quality, merged.hits) == ("Paris.", 0.95, 3)
    [third] = await store.add([ex("What is the capital of France ?", "Lyon", quality=0.1)])
    assert third == first
    [still] = await store.get("acme", [first])
    assert still.response == "Paris."
    # Within one call, and not for different questions.
    ids = await store.add(
        [ex("How tall is Mount Everest?", "8849 m"), ex("how tall is mount everest?", "8,849 metres", quality=1.0)]
    )
    assert ids[0] == ids[1]
    [everest] = await store.get("acme", [ids[0]])
    assert everest.response == "8,849 metres"
    assert len(set(await store.add([ex(q) for q in QUESTIONS]))) == len(QUESTIONS)
    assert await store.count("acme") == 2 + len(QUESTIONS)
    # Off by argument.
    [separate] = await store.add([ex("WHAT IS THE CAPITAL OF FRANCE?", "Paris")], dedupe=False)
    assert separate != first


async def test_eviction_keeps_the_valuable_examples(make_store: object) -> None:
    store = make_store(capacity_per_tenant=10, evict_low_water=0.8)  # type: ignore[operator]
    now = time.time()
    valuable = [
        ex(q, hits=20, utility_sum=9.0, utility_n=10, last_used=now, created_at=now - 60) for q in QUESTIONS[:8]
    ]
    stale_questions = [
        "How long should I boil an egg?",
        "Which planet has the most moons?",
        "What does a sommelier do?",
        "How do I reset a router?",
    ]
    stale = [ex(q, last_used=now - 30 * 86400, created_at=now - 30 * 86400) for q in stale_questions]
    await store.add(valuable + stale)  # 12 > 10: cut to 8
    assert await store.count("acme") == 8
    assert {e.id for e in await store.get("acme", [e.id for e in valuable])} == {e.id for e in valuable}
    assert await store.evict("acme") == 0  # under capacity: nothing to do


async def test_ttl_hides_and_evicts_old_examples(make_store: object) -> None:
    store = make_store(ttl_s=3600)  # type: ignore[operator]
    now = time.time()
    old = ex("What is the boiling point of water?", "100 C", created_at=now - 7200)
    fresh = ex("What is the freezing point of water?", "0 C", created_at=now - 60)
    await store.add([old, fresh])
    found = await store.query("boiling point of water", "acme", k=5)
    assert [c.example.id for c in found] == [fresh.id]
    assert (await store.stats("acme")).expired == 1
    assert await store.evict("acme") == 1
    assert same(await store.get("acme", [old.id, fresh.id]), [fresh])


async def test_stats(store: ExampleStore) -> None:
    ids = await store.add([ex(q) for q in QUESTIONS[:5]])
    await store.record_use("acme", {ids[0]: 1.0, ids[1]: 0.0}, success=True)
    stats = await store.stats("acme")
    assert (stats.count, stats.never_used, stats.total_hits, stats.offload_successes) == (5, 3, 2, 2)
    assert stats.mean_utility == pytest.approx(0.5)
    assert stats.dim == 384
    assert stats.hnsw["space"] == "cosine"
    assert stats.hnsw["ef_search"] == store.config.hnsw_ef_search


async def test_replay_queue(make_store: object) -> None:
    store = make_store(replay_capacity=3)  # type: ignore[operator]
    low = await store.push_replay("acme", "why is the sky blue", None, 0.2)
    again = await store.push_replay("acme", "Why is the  sky blue", [Message(role="user", content="why?")], 0.9)
    assert again == low  # the same request keeps one entry, with the higher value
    await store.push_replay("beta", "how do magnets work", None, 0.5)
    await store.push_replay("acme", "what is a black hole", None, 0.1)
    await store.push_replay("acme", "how do vaccines work", None, 0.7)  # 4 > capacity 3: the 0.1 one goes
    assert await store.tenants() == []  # the queue is not a tenant
    popped = await store.pop_replay(2)
    assert [(p.tenant, p.value) for p in popped] == [("acme", 0.9), ("acme", 0.7)]
    rest = await store.pop_replay(10)
    assert [(p.tenant, p.request, p.value) for p in rest] == [("beta", "how do magnets work", 0.5)]
    assert await store.pop_replay(1) == []
    with pytest.raises(ConfigError, match="tenant"):
        await store.push_replay("bad name", "q", None, 1.0)


# ------------------------------------------------------------------------------------------- durability

_WRITER = """
import asyncio, sys
from echo_middleware.config import EmbedConfig, StoreConfig
from echo_middleware.embed import SentenceEmbedder
from echo_middleware.store import ExampleStore
from echo_middleware.types import Example

async def main() -> None:
    store = ExampleStore(StoreConfig(path=sys.argv[1]), SentenceEmbedder(EmbedConfig(), models_dir=sys.argv[2]))
    await store.count("acme")
    print("ready", flush=True)
    i = 0
    while True:
        batch = [Example(tenant="acme", request=f"durability probe {i} item {j}", response="ok") for j in range(4)]
        ids = await store.add(batch)
        print(" ".join(ids), flush=True)
        i += 1

asyncio.run(main())
"""


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_example(tmp_path: Path, embedder_dir: Path, embedder: SentenceEmbedder) -> None:
    folder = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(folder), str(embedder_dir.parent)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    acked: list[str] = []
    assert proc.stdout.readline().strip() == "ready"
    while len(acked) < 200:
        line = proc.stdout.readline()
        assert line, "the writer died on its own"
        acked += line.split()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acked += proc.stdout.read().split()  # lines printed before the kill
    store = ExampleStore(StoreConfig(path=folder, lock_timeout_s=5), embedder)
    try:
        present = {e.id for e in asyncio.run(store.get("acme", acked))}
        assert set(acked) - present == set()  # not one acknowledged example lost
        assert len(set(acked)) == len(acked)  # numbered probes never merge (dedupe keeps changed numbers apart)
        assert asyncio.run(store.count("acme")) >= len(acked)
        probe = asyncio.run(store.query("durability probe 3 item 2", "acme", k=1))
        assert probe[0].example.request == "durability probe 3 item 2"
    finally:
        asyncio.run(store.close())
