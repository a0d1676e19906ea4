"""Fakes for the pipeline's unit tests: scripted engines and an in-memory example store.

They implement the real interfaces (:class:`~echo_middleware.engines.base.Engine`, the store's async methods),
so the pipeline runs its real code paths on them; only the models and Chroma are replaced.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from echo_middleware.engines.base import Engine
from echo_middleware.errors import EngineUnavailable, StoreUnavailable
from echo_middleware.types import Candidate, EngineRequest, Example, Message, StreamDelta, Usage

Answer = Callable[[EngineRequest], str]


@dataclass
class ReplayItem:
    """What the store's ``pop_replay`` returns (the fields the learner reads)."""

    id: str
    tenant: str
    request: str
    value: float
    messages: list[Message] = field(default_factory=list)


class ScriptedEngine(Engine):
    """Answers with ``answer(request)`` word by word; tokens are words; can be made to fail or to stall."""

    kind = "fake"

    def __init__(self, name: str, answer: Answer, *, window: int = 4096) -> None:
        super().__init__(name, f"{name}-model", max_concurrency=1)
        self.answer = answer
        self.window = window
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.fail_with: Exception | None = None
        self.fail_start: Exception | None = None
        self.delay_s = 0.0

    async def _start(self) -> None:
        if self.fail_start is not None:
            raise self.fail_start

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        words = self.answer(request).split(" ")
        n = 0
        for i, word in enumerate(words[: request.params.max_tokens]):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            n += 1
            yield StreamDelta(request_id=request.request_id, text=word if i == 0 else " " + word)
        yield StreamDelta(
            request_id=request.request_id,
            finish_reason="length" if n < len(words) else "stop",
            usage=Usage(prompt_tokens=sum(len(m.content.split()) for m in request.messages or []), completion_tokens=n),
        )

    async def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def context_window(self) -> int:
        return self.window


def last_user(request: EngineRequest) -> str:
    messages = request.messages or []
    return next(m.content for m in reversed(messages) if m.role == "user")


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


class MemoryStore:
    """The example store's async interface in memory; distance is 1 - word Jaccard of the requests."""

    def __init__(self) -> None:
        self.examples: dict[str, dict[str, Example]] = {}
        self.uses: list[tuple[str, dict[str, float | None], bool | None]] = []
        self.replay: list[ReplayItem] = []
        self.fail_query: Exception | None = None
        self.fail_add: Exception | None = None
        self.closed = False
        self.queries = 0

    async def add(self, examples: Sequence[Example]) -> list[str]:
        if self.fail_add is not None:
            raise self.fail_add
        ids = []
        for ex in examples:
            self.examples.setdefault(ex.tenant, {})[ex.id] = ex
            ids.append(ex.id)
        return ids

    async def query(self, text: str, tenant: str, k: int, *, embedding: object = None) -> list[Candidate]:
        self.queries += 1
        if self.fail_query is not None:
            raise self.fail_query
        q = _words(text)
        out = []
        for ex in self.examples.get(tenant, {}).values():
            e = _words(ex.request)
            distance = 1.0 - len(q & e) / max(1, len(q | e))
            out.append(Candidate(example=ex, distance=distance))
        return sorted(out, key=lambda c: c.distance)[:k]

    async def get(self, tenant: str, ids: Sequence[str]) -> list[Example]:
        pool = self.examples.get(tenant, {})
        return [pool[i] for i in ids if i in pool]

    async def record_use(self, tenant: str, id_utilities: dict[str, float | None], success: bool | None = None) -> int:
        self.uses.append((tenant, dict(id_utilities), success))
        pool = self.examples.get(tenant, {})
        n = 0
        for ex_id, utility in id_utilities.items():
            ex = pool.get(ex_id)
            if ex is None:
                continue
            n += 1
            update: dict[str, object] = {"hits": ex.hits + 1, "last_used": time.time()}
            if utility is not None:
                update["utility_sum"] = ex.utility_sum + utility
                update["utility_n"] = ex.utility_n + 1
            if success:
                update["offload_successes"] = ex.offload_successes + 1
            pool[ex_id] = ex.model_copy(update=update)
        return n

    async def push_replay(
        self, tenant: str, request_text: str, messages: Sequence[Message] | None, value: float
    ) -> str:
        item = ReplayItem(
            id=f"r{len(self.replay)}", tenant=tenant, request=request_text, messages=list(messages or []), value=value
        )
        self.replay.append(item)
        return item.id

    async def pop_replay(self, n: int) -> list[ReplayItem]:
        self.replay.sort(key=lambda r: -r.value)
        taken, self.replay = self.replay[:n], self.replay[n:]
        return taken

    async def close(self) -> None:
        self.closed = True

    def count(self, tenant: str = "default") -> int:
        return len(self.examples.get(tenant, {}))


__all__ = ["EngineUnavailable", "MemoryStore", "ScriptedEngine", "StoreUnavailable", "last_user"]
