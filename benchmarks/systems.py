"""The systems the benchmark compares, each answering the same trace on the same engines.

- ``always-large``: every request to the large model (the quality reference).
- ``always-small``: every request to the small model, no examples.
- ``semantic-cache``: a plain semantic response cache: when a past request's embedding has cosine >= threshold,
  its stored answer is returned verbatim; otherwise the large model answers and the pair is cached. GPTCache
  (``gptcache`` on PyPI, with our embedder and its Chroma vector store) when it is installed, else the same idea
  as LangChain's semantic caches, implemented directly over a Chroma collection (cosine space).
- ``similarity-examples``: every request to the small model with the nearest stored examples (no learned
  utility, no routing): in-context examples "by similarity only".
- ``echo``: :class:`~echo_middleware.pipeline.EchoPipeline` as shipped (utility ranking, calibrated routing,
  learning from outcomes in idle time).

Every system talks to engines through :class:`MeteredEngine`, which records each generation (tokens, start,
end, priority), so cost (large-model tokens) and background work (the learner's shadow checks and probes) are
counted the same way for all of them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from workloads import Item

from echo_middleware.engines.base import Engine
from echo_middleware.types import (
    EchoRequest,
    EngineRequest,
    Generation,
    Message,
    SamplingParams,
    StreamDelta,
    Usage,
)

logger = logging.getLogger(__name__)

BACKGROUND_PRIORITY = 1_000_000
"""Engine priority at or above which a generation counts as background work (the learner's)."""


# ------------------------------------------------------------------------------------------ metering


@dataclass
class Call:
    """One generation an engine did."""

    engine: str
    request_id: str
    priority: int
    began: float
    ended: float
    prompt_tokens: int
    completion_tokens: int
    ok: bool

    @property
    def background(self) -> bool:
        """Whether it was background work (the learner's), not a user's request."""
        return self.priority >= BACKGROUND_PRIORITY

    @property
    def seconds(self) -> float:
        """Wall time of the generation."""
        return self.ended - self.began


class MeteredEngine(Engine):
    """Wraps an engine and records every generation; everything else is the wrapped engine's.

    Args:
        inner: The engine doing the work (started and closed by whoever built it).
        role: ``large`` or ``small`` (how calls are counted).
    """

    def __init__(self, inner: Engine, role: str) -> None:
        super().__init__(inner.name, inner.model, inner.max_concurrency)
        self.inner = inner
        self.role = role
        self.kind = inner.kind
        self.calls: list[Call] = []

    async def _start(self) -> None:
        await self.inner.start()
        self._features = dict(self.inner.features)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        began = time.monotonic()
        usage: Usage | None = None
        ok = False
        try:
            async for delta in self.inner.stream(request):
                if delta.usage is not None:
                    usage = delta.usage
                yield delta
            ok = True
        finally:
            self.calls.append(
                Call(
                    engine=self.role,
                    request_id=request.request_id,
                    priority=request.priority,
                    began=began,
                    ended=time.monotonic(),
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    ok=ok,
                )
            )

    async def _abort(self, request_id: str) -> None:
        await self.inner.cancel(request_id, reason="cancelled through the benchmark's meter")

    async def _close(self) -> None:
        """The wrapped engine is shared between systems: its owner closes it."""

    async def count_tokens(self, text: str) -> int:
        return await self.inner.count_tokens(text)

    @property
    def context_window(self) -> int:
        return self.inner.context_window

    def since(self, mark: int) -> list[Call]:
        """Calls recorded after ``mark`` (a previous ``len(self.calls)``)."""
        return self.calls[mark:]


@dataclass
class EngineSet:
    """The large and small engine one group of systems shares."""

    large: MeteredEngine
    small: MeteredEngine
    label: str = ""

    def marks(self) -> tuple[int, int]:
        """Positions in both call logs, to collect the calls of one request."""
        return len(self.large.calls), len(self.small.calls)


# ------------------------------------------------------------------------------------------ outcomes


@dataclass
class Outcome:
    """How one system handled one request."""

    item_id: str
    text: str
    route: str
    """``large``, ``small`` or ``cache`` (a stored answer returned verbatim)."""
    service_s: float
    """Wall time of the request alone: retrieval, ranking, generation and storing."""
    cpu_s: float = 0.0
    """CPU seconds this process spent on the request (all threads): insensitive to other processes' load."""
    load1: float = 0.0
    """The machine's 1-minute load average when the request started (how busy the machine was)."""
    large_prompt_tokens: int = 0
    large_completion_tokens: int = 0
    small_prompt_tokens: int = 0
    small_completion_tokens: int = 0
    background_s: float = 0.0
    """Engine time of background work this request caused (shadow checks, probes), done in idle time."""
    background_large_tokens: int = 0
    background_small_tokens: int = 0
    predicted_tokens: float | None = None
    n_examples: int = 0
    reused_from: str | None = None
    """Semantic cache: the cached request whose answer was returned."""
    finish_reason: str = "stop"
    decision: dict[str, Any] | None = None
    error: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def large_tokens(self) -> int:
        """Tokens the large model processed for this request, foreground and background: the cost proxy."""
        return self.large_prompt_tokens + self.large_completion_tokens + self.background_large_tokens


def _account(outcome: Outcome, calls: Sequence[Call]) -> Outcome:
    for call in calls:
        tokens = call.prompt_tokens + call.completion_tokens
        if call.background:
            outcome.background_s += call.seconds
            if call.engine == "large":
                outcome.background_large_tokens += tokens
            else:
                outcome.background_small_tokens += tokens
        elif call.engine == "large":
            outcome.large_prompt_tokens += call.prompt_tokens
            outcome.large_completion_tokens += call.completion_tokens
        else:
            outcome.small_prompt_tokens += call.prompt_tokens
            outcome.small_completion_tokens += call.completion_tokens
    return outcome


def engine_request(item: Item, request_id: str | None = None) -> EngineRequest:
    """The item as an engine request: its messages, greedy decoding, its answer budget."""
    kwargs: dict[str, Any] = {}
    if request_id:
        kwargs["request_id"] = request_id
    return EngineRequest(
        messages=messages(item),
        params=SamplingParams(max_tokens=item.max_tokens, temperature=0.0),
        **kwargs,
    )


def messages(item: Item) -> list[Message]:
    """The item's chat messages."""
    out = [Message(role="system", content=item.system)] if item.system else []
    out.append(Message(role="user", content=item.prompt))
    return out


# ------------------------------------------------------------------------------------------ systems


class System(abc.ABC):
    """One way of answering requests; :meth:`answer` handles one request end to end."""

    name: str = "system"
    description: str = ""

    def __init__(self, engines: EngineSet) -> None:
        self.engines = engines

    async def warm(self, pairs: Sequence[tuple[Item, Generation]]) -> None:  # noqa: B027  (stateless by default)
        """Fill whatever the system remembers with the warm-up history (the large model's answers)."""

    async def answer(self, item: Item) -> Outcome:
        """Answer one request, timing it and counting its engine calls."""
        marks = self.engines.marks()
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        cpu = time.process_time()
        began = time.monotonic()
        outcome = await self._answer(item)
        outcome.service_s = time.monotonic() - began
        outcome.cpu_s = time.process_time() - cpu
        outcome.load1 = load1
        await self.settle()
        calls = [*self.engines.large.since(marks[0]), *self.engines.small.since(marks[1])]
        return _account(outcome, calls)

    async def settle(self) -> None:  # noqa: B027  (nothing runs in the background by default)
        """Let background work this request caused finish, so the next request is timed alone."""

    @abc.abstractmethod
    async def _answer(self, item: Item) -> Outcome:
        """Produce the outcome (text, route); service time and tokens are filled in by :meth:`answer`."""

    async def close(self) -> None:  # noqa: B027
        """Release what the system built (not the shared engines)."""

    def describe(self) -> dict[str, Any]:
        """What this system is, for the results file."""
        return {"name": self.name, "description": self.description, "engines": self.engines.label}


class AlwaysLarge(System):
    """Every request to the large model."""

    name = "always-large"
    description = "every request to the large model"

    async def _answer(self, item: Item) -> Outcome:
        generation = await self.engines.large.generate(engine_request(item))
        return Outcome(item.id, generation.text, "large", 0.0, finish_reason=generation.finish_reason)


class AlwaysSmall(System):
    """Every request to the small model, without examples."""

    name = "always-small"
    description = "every request to the small model, no examples"

    async def _answer(self, item: Item) -> Outcome:
        generation = await self.engines.small.generate(engine_request(item))
        return Outcome(item.id, generation.text, "small", 0.0, finish_reason=generation.finish_reason)


class SemanticCache(System):
    """A plain semantic response cache in front of the large model.

    Args:
        engines: The engines (only the large one is used).
        embedder: Our sentence embedder (``embed(list[str]) -> unit rows``).
        threshold: Cosine similarity at or above which a stored answer is returned.
        implementation: ``gptcache`` (needs the ``gptcache`` package), ``chroma`` (our own), or ``auto``.
    """

    name = "semantic-cache"

    def __init__(self, engines: EngineSet, embedder: Any, threshold: float = 0.8, implementation: str = "auto"):
        super().__init__(engines)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"semantic cache threshold={threshold} must be in (0, 1]")
        self.embedder = embedder
        self.threshold = threshold
        if implementation == "auto":
            try:
                import gptcache  # noqa: F401

                implementation = "gptcache"
            except ImportError:
                implementation = "chroma"
        if implementation not in ("gptcache", "chroma"):
            raise ValueError(f"implementation={implementation!r}: use gptcache, chroma or auto")
        self.implementation = implementation
        self.description = f"cached answer returned when cosine >= {threshold} ({implementation}), else large model"
        self._tmp = tempfile.TemporaryDirectory(prefix="echo-bench-semcache-")
        self._texts: dict[str, str] = {}
        self._ids: dict[str, str] = {}
        self._gpt: Any = None
        self._collection: Any = None
        self._count = 0
        self._setup()

    def _vector(self, text: str) -> Any:
        return self.embedder.embed([text])[0]

    def _setup(self) -> None:
        if self.implementation == "gptcache":
            from gptcache import Cache, Config
            from gptcache.manager import CacheBase, VectorBase, get_data_manager
            from gptcache.processor.pre import get_prompt
            from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

            # Chroma's default space is squared L2; for unit vectors d = 2 - 2 cos, so with max_distance=2 the
            # score GPTCache compares with the threshold, 2 - d = 2 cos, clears 2 * threshold exactly when
            # cos >= threshold: the same rule as the Chroma implementation.
            manager = get_data_manager(
                CacheBase("sqlite", sql_url=f"sqlite:///{self._tmp.name}/cache.db"),
                VectorBase("chromadb", collection_name=f"bench-{id(self)}", top_k=1),
            )
            cache = Cache()
            cache.init(
                pre_embedding_func=get_prompt,
                embedding_func=lambda text, **_: self._vector(text),
                data_manager=manager,
                similarity_evaluation=SearchDistanceEvaluation(max_distance=2.0),
                config=Config(similarity_threshold=self.threshold),
            )
            self._gpt = cache
        else:
            import chromadb

            client = chromadb.EphemeralClient()
            self._collection = client.create_collection(
                name=f"bench-semcache-{id(self)}", metadata={"hnsw:space": "cosine"}, embedding_function=None
            )

    def _lookup(self, text: str) -> tuple[str, str] | None:
        if self.implementation == "gptcache":
            from gptcache.adapter.api import get

            hit = get(text, cache_obj=self._gpt)
            if hit is None:
                return None
            return str(hit), self._ids.get(str(hit), "")
        if self._count == 0:
            return None
        result = self._collection.query(
            query_embeddings=[self._vector(text).tolist()], n_results=1, include=["distances", "documents"]
        )
        distance = result["distances"][0][0]
        if 1.0 - distance < self.threshold:
            return None
        return str(result["documents"][0][0]), str(result["ids"][0][0])

    def _put(self, item_id: str, text: str, answer: str) -> None:
        self._ids.setdefault(answer, item_id)
        if self.implementation == "gptcache":
            from gptcache.adapter.api import put

            put(text, answer, cache_obj=self._gpt)
        else:
            self._collection.add(ids=[item_id], embeddings=[self._vector(text).tolist()], documents=[answer])
        self._count += 1

    async def warm(self, pairs: Sequence[tuple[Item, Generation]]) -> None:
        for item, generation in pairs:
            if generation.text.strip():
                await asyncio.to_thread(self._put, item.id, item.prompt, generation.text)

    async def _answer(self, item: Item) -> Outcome:
        hit = await asyncio.to_thread(self._lookup, item.prompt)
        if hit is not None:
            text, source = hit
            return Outcome(item.id, text, "cache", 0.0, reused_from=source or None)
        generation = await self.engines.large.generate(engine_request(item))
        if generation.text.strip():
            await asyncio.to_thread(self._put, item.id, item.prompt, generation.text)
        return Outcome(item.id, generation.text, "large", 0.0, finish_reason=generation.finish_reason)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._tmp.cleanup()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": self.threshold, "implementation": self.implementation}


class PipelineSystem(System):
    """echo-middleware's pipeline on the shared engines, with a fresh store.

    Args:
        engines: The shared engines (metered).
        name: The system's name in the results.
        overrides: Settings overrides for :meth:`EchoPipeline.from_defaults` (e.g. ``rank={"kind":
            "similarity"}``); the store always goes to a fresh temporary folder.
        offload: The requests' ``offload`` mode: ``auto`` (the router decides) or ``always``.
        embedder: The embedder to share (loaded once per run).
        seed: Seed of the learner's sampling.
        settle_timeout_s: Most seconds to wait for background learning after each request.
        scheduling: Give the pipeline its per-engine schedulers and length predictor, as deployed: the router
            sees the queue, and each decision carries ``predicted_length``, by which the replay orders SJF.
    """

    def __init__(
        self,
        engines: EngineSet,
        name: str,
        *,
        overrides: dict[str, Any] | None = None,
        offload: str = "auto",
        embedder: Any = None,
        seed: int = 0,
        description: str = "",
        settle_timeout_s: float = 600.0,
        scheduling: bool = True,
    ) -> None:
        super().__init__(engines)
        from echo_middleware.pipeline import EchoPipeline

        self.name = name
        self.description = description
        self.offload = offload
        self.settle_timeout_s = settle_timeout_s
        self.scheduling = scheduling
        self._tmp = tempfile.TemporaryDirectory(prefix=f"echo-bench-{name}-")
        settings = dict(overrides or {})
        store = dict(settings.pop("store", {}) or {})
        store["path"] = self._tmp.name
        self.overrides = {**settings, "store": store}
        components: dict[str, Any] = {"large": engines.large, "small": engines.small, "seed": seed}
        if scheduling:
            components.update(predictor=True, scheduling=True)
        if embedder is not None:
            components["embedder"] = embedder
        self.pipeline = EchoPipeline.from_defaults(**self.overrides, **components)

    def _request(self, item: Item, offload: str | None = None) -> EchoRequest:
        return EchoRequest(
            messages=messages(item),
            params=SamplingParams(max_tokens=item.max_tokens, temperature=0.0),
            offload=offload or self.offload,  # type: ignore[arg-type]
        )

    async def warm(self, pairs: Sequence[tuple[Item, Generation]]) -> None:
        """Store the warm-up history as the pipeline stores large answers (its learner's own path)."""
        await self.pipeline.start()
        learner = self.pipeline.learner
        if learner is None:
            raise RuntimeError(f"{self.name}: the pipeline started without a learner (no store?)")
        tenant = self.pipeline.settings.tenant
        for item, generation in pairs:
            await learner.store_answer(tenant, self._request(item, "never"), generation)

    async def _answer(self, item: Item) -> Outcome:
        result = await self.pipeline.agenerate(self._request(item))
        decision = result.decision
        return Outcome(
            item.id,
            result.text,
            "small" if decision.offloaded else "large",
            0.0,
            predicted_tokens=decision.predicted_length,
            n_examples=len(decision.examples),
            finish_reason=result.finish_reason,
            decision=decision.model_dump(mode="json"),
        )

    async def settle(self) -> None:
        learner = self.pipeline.learner
        if learner is None:
            return
        if not await learner.drain(self.settle_timeout_s):
            logger.warning("%s: background learning still busy after %.0f s", self.name, self.settle_timeout_s)

    async def close(self) -> None:
        await self.pipeline.close()
        with contextlib.suppress(Exception):
            self._tmp.cleanup()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "overrides": _jsonable(self.overrides),
            "offload": self.offload,
            "scheduling": self.scheduling,
            "length_predictions": "pipeline (LengthPredictor)" if self.pipeline.predictor is not None else None,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
