"""EchoPipeline: retrieve, rank, route, generate, learn: one async core behind every front door.

For each request the pipeline

1. **embeds** the last user turn and **retrieves** the ``rank.top_k`` nearest past requests of the tenant
   (:class:`~echo_middleware.store.ExampleStore` on Chroma);
2. **ranks** them by *utility* with a proxy model (:class:`~echo_middleware.rank.UtilityRanker`): how likely the
   small model, shown that example, answers as the large model would; similarity is one feature of many;
3. **routes** (:class:`~echo_middleware.route.OffloadPolicy`): offload to the small model when the best selected
   utility clears a threshold calibrated to ``route.target_retention``, lowered when the large engine is
   overloaded and the request's SLO needs it; never for what the small model cannot be judged on;
4. **generates** with the chosen engine; offloaded requests get their examples as prior chat turns, best first,
   within the small model's context window;
5. **learns**: large answers become examples before the call returns; a sample of offloads is shadow-checked by
   the large model when it is idle, a sample of large answers is probed on the small model, and the outcomes
   recalibrate the router, update the ranker and demote examples that mislead.

If the store or the small model fails, the large model answers and ``Decision.fallback`` says why; if the large
model fails where the small one could answer, the small one does, and the decision says so.

All async methods run on the process's one background event loop (:mod:`echo_middleware._sync`), whichever loop
calls them, so the engines, the store and the background learner live on one loop; the sync methods wait on
that loop and so work inside Jupyter or any running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from echo_middleware._sync import background_loop, iterate_sync, run_sync
from echo_middleware.config import EchoSettings, build_settings
from echo_middleware.engines.base import Engine
from echo_middleware.errors import Cancelled, ConfigError
from echo_middleware.learn.learner import Learner
from echo_middleware.rank.base import Ranker, Ranking
from echo_middleware.rank.features import RankQuery
from echo_middleware.rank.prompt import assemble_prompt, select_examples
from echo_middleware.route.policy import OffloadPolicy, RouteDecision
from echo_middleware.types import (
    Candidate,
    Decision,
    EchoChunk,
    EchoRequest,
    EchoResult,
    EngineRequest,
    ExampleUse,
    FinishReason,
    Generation,
    Message,
    Usage,
    new_request_id,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = object()
STORE_RETRY_S = 30.0
"""Seconds before a store that failed to open is tried again."""
_PRIORITY_OF_CLASS = {"interactive": 0, "standard": 10, "batch": 20}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class _Plan:
    """Everything decided for one request before generation."""

    request: EchoRequest
    tenant: str
    query: RankQuery
    began: float
    stage_s: dict[str, float] = field(default_factory=dict)
    ranking: Ranking | None = None
    selected: list[Candidate] = field(default_factory=list)
    route: RouteDecision | None = None
    fallback: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    used: list[Candidate] = field(default_factory=list)
    prediction: Any = None
    embedding: Any = None
    engine_ids: dict[str, str] = field(default_factory=dict)

    def rows(self, candidates: Sequence[Candidate]) -> np.ndarray | None:
        if self.ranking is None or not candidates:
            return None
        rows = [self.ranking.row(c.example.id) for c in candidates]
        kept = [r for r in rows if r is not None]
        return np.vstack(kept) if kept else None


class EchoPipeline:
    """In-context caching with offload routing: the product core every integration calls.

    Setup:
        ``pip install echo-middleware`` and ``echo-middleware models fetch`` (the bundled models).

    Instantiate:
        .. code-block:: python

            from echo_middleware.pipeline import EchoPipeline

            pipeline = EchoPipeline.from_defaults()                       # everything from EchoSettings
            pipeline = EchoPipeline.from_defaults(store={"path": "/tmp/echo-store"})
            pipeline = EchoPipeline(large=my_engine)                      # any Engine as the large model

    Invoke:
        .. code-block:: python

            from echo_middleware.types import EchoRequest, Message

            result = pipeline.generate(EchoRequest(messages=[Message(role="user", content="Hi")]))
            print(result.text, result.decision.offloaded, result.decision.reason)

    Stream:
        .. code-block:: python

            for chunk in pipeline.stream(request):
                print(chunk.text, end="")        # the last chunk carries chunk.decision and chunk.usage

    Async:
        .. code-block:: python

            async with EchoPipeline.from_defaults() as pipeline:
                result = await pipeline.agenerate(request)
                async for chunk in pipeline.astream(request):
                    ...
                results = await pipeline.abatch([request, request], max_concurrency=4)

    Args:
        settings: All settings (default: from ``ECHO_*`` environment variables and defaults).
        large: The large engine (default: built from ``settings.large``).
        small: The small engine (default: built from ``settings.small``).
        store: The example store (default: an embedded Chroma store from ``settings.store``).
        embedder: The sentence embedder (default: from ``settings.embed``).
        ranker: The utility ranker (default: ``settings.rank.kind`` with the shipped weights).
        policy: The offload policy (default: from ``settings.route``, calibrated on the ranker's pairs).
        predictor: A :class:`~echo_middleware.predict.LengthPredictor` (or ``True`` for one from
            ``settings.predict``): predicts each answer's length from its neighbours (``Decision.predicted_length``)
            and learns from every answer; None: no prediction.
        scheduling: Put a :class:`~echo_middleware.schedule.Scheduler` (``settings.schedule``) in front of each
            engine: shortest predicted job first with aging, SLO deadlines, bounded queues; the router then sees
            the scheduler's queue in the large engine's load, and ``Decision.queue_wait_s`` is measured.
        seed: Seed of the learner's sampling (shadow checks, probes), for reproducible runs.

    Nothing is loaded or connected here; :meth:`start` (or the first request) does it. :meth:`close` closes what
    the pipeline built itself; engines, stores and embedders handed in belong to the caller and stay open.
    """

    def __init__(
        self,
        settings: EchoSettings | None = None,
        *,
        large: Engine | None = None,
        small: Engine | None = None,
        store: Any = None,
        embedder: Any = None,
        ranker: Ranker | None = None,
        policy: OffloadPolicy | None = None,
        predictor: Any = None,
        scheduling: bool = False,
        seed: int | None = None,
    ) -> None:
        if settings is not None and not isinstance(settings, EchoSettings):
            raise ConfigError(
                f"settings must be an EchoSettings, not {type(settings).__name__}: use "
                "EchoPipeline.from_defaults(**overrides) to build one from keyword arguments"
            )
        self.settings = settings if settings is not None else build_settings()
        self._large = large
        self._small = small
        self._store = store
        self._embedder = embedder
        self._ranker = ranker
        self._policy = policy
        self._seed = seed
        self._predictor = predictor
        self._scheduling = scheduling
        self._schedulers: dict[str, Any] = {}
        self._queue_wait: dict[str, float] = {}
        self._owned: list[Any] = []
        self._learner: Learner | None = None
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._store_error: str | None = None
        self._store_failed_at = 0.0
        self._small_error: str | None = None
        self._inflight = {"large": 0, "small": 0}

    @classmethod
    def from_defaults(cls, **overrides: Any) -> EchoPipeline:
        """A pipeline built from :class:`EchoSettings` with ``overrides`` (nested dicts for sections).

        Example: ``EchoPipeline.from_defaults(small={"model": "smollm2-135m-instruct"}, route={"threshold": 0.8})``.
        Component keyword arguments of :class:`EchoPipeline` (``large``, ``small``, ``store``, ``embedder``,
        ``ranker``, ``policy``, ``predictor``, ``scheduling``, ``seed``) may be passed here too when they are not
        settings.
        """
        components: dict[str, Any] = {}
        for key in ("ranker", "policy", "embedder", "seed", "predictor", "scheduling"):
            if key in overrides:
                components[key] = overrides.pop(key)
        for key in ("large", "small", "store"):
            if (
                key in overrides
                and not isinstance(overrides[key], dict | type(None))
                and not hasattr(overrides[key], "model_dump")
            ):
                components[key] = overrides.pop(key)
        return cls(build_settings(**overrides), **components)

    # ------------------------------------------------------------------------------ components

    @property
    def large_engine(self) -> Engine:
        """The large engine (built from settings on first access; not started)."""
        if self._large is None:
            from echo_middleware.engines import create_engine

            self._large = create_engine(self.settings.large, models_dir=self.settings.models_dir)
            self._owned.append(self._large)
        return self._large

    @property
    def small_engine(self) -> Engine:
        """The small engine (built from settings on first access; not started)."""
        if self._small is None:
            from echo_middleware.engines import create_engine

            self._small = create_engine(self.settings.small, models_dir=self.settings.models_dir)
            self._owned.append(self._small)
        return self._small

    @property
    def ranker(self) -> Ranker:
        """The utility ranker (weights load on first use)."""
        if self._ranker is None:
            from echo_middleware.rank.utility import create_ranker

            self._ranker = create_ranker(self.settings.rank)
        return self._ranker

    @property
    def policy(self) -> OffloadPolicy:
        """The offload policy."""
        if self._policy is None:
            self._policy = OffloadPolicy(self.settings.route)
        return self._policy

    @property
    def store(self) -> Any:
        """The example store (None until :meth:`start` opened the default one)."""
        return self._store

    @property
    def predictor(self) -> Any:
        """The length predictor (None when the pipeline does not predict lengths)."""
        return self._predictor

    @property
    def schedulers(self) -> dict[str, Any]:
        """The per-engine schedulers by role (``large``, ``small``); empty unless ``scheduling=True``."""
        return dict(self._schedulers)

    @property
    def learner(self) -> Learner | None:
        """The background learner (after :meth:`start`)."""
        return self._learner

    def _build_embedder(self) -> Any:
        if self._embedder is None:
            from echo_middleware.embed import create_embedder

            self._embedder = create_embedder(self.settings.embed, models_dir=self.settings.models_dir)
            self._owned.append(self._embedder)
        return self._embedder

    async def _open_store(self) -> None:
        """Open the default store; on failure remember why (requests fall back to the large model)."""
        if self._store is not None:
            return
        try:
            from echo_middleware.store import ExampleStore

            store = ExampleStore(self.settings.store, self._build_embedder())
            start = getattr(store, "start", None)
            if start is not None:
                await start()
        except Exception as exc:  # the large model must still answer
            self._store_error = _short(exc)
            self._store_failed_at = time.monotonic()
            logger.warning("example store unavailable, the large model answers everything: %s", self._store_error)
            return
        self._store = store
        self._owned.append(store)
        self._store_error = None
        if self._learner is not None:
            self._learner.store = store

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the engines, open the store and start background learning; idempotent.

        Raises:
            EngineError / ModelError: the large engine cannot start (nothing could answer). A small engine or a
                store that fails to start is logged and reported in each decision instead: the large model answers.
        """
        await self._on_home(self._start())

    async def _start(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            large, small = self.large_engine, self.small_engine
            if self._store is None:
                await self._open_store()
            else:
                start = getattr(self._store, "start", None)
                if start is not None:
                    await start()
            # One after the other: two engines importing their backend in two threads at once can see a
            # half-initialised module (transformers raised ImportError that way).
            await large.start()
            try:
                await small.start()
            except Exception as exc:  # the large model answers everything; each decision says why
                self._small_error = _short(exc)
                logger.warning("small engine unavailable, the large model answers everything: %s", self._small_error)
            self.policy.attach_calibration(self.ranker.calibration)
            if self._predictor is True:
                from echo_middleware.predict import LengthPredictor

                self._predictor = LengthPredictor(self.settings.predict)
            if self._scheduling and not self._schedulers:
                from echo_middleware.schedule import Scheduler

                for role, engine in (("large", large), ("small", small)):
                    self._schedulers[role] = Scheduler(engine, self.settings.schedule, on_finish=self._finished)
            self._learner = Learner(
                self.settings.learn,
                store=self._store,
                large=large,
                small=None if self._small_error else small,
                ranker=self.ranker,
                policy=self.policy,
                seed=self._seed,
                large_busy=lambda: self._busy("large"),
                small_busy=lambda: self._busy("small"),
            )
            if self._store is not None:
                self._learner.start()
            self._started = True

    async def close(self) -> None:
        """Stop background learning, save the ranker's online state, close what the pipeline built."""
        await self._on_home(self._close())

    async def _close(self) -> None:
        if self._learner is not None:
            await self._learner.close()
            self._learner = None
        for scheduler in self._schedulers.values():
            try:
                await scheduler.close()
            except Exception:
                logger.exception("closing the scheduler of %s failed", scheduler.name)
        self._schedulers.clear()
        if self._ranker is not None:
            try:
                await asyncio.to_thread(self._ranker.save)
            except Exception:
                logger.exception("could not save the ranker's state")
        for component in reversed(self._owned):
            closer = getattr(component, "close", None)
            if closer is None:
                continue
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                logger.exception("closing %s failed", type(component).__name__)
        self._owned.clear()
        self._started = False

    async def __aenter__(self) -> EchoPipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------- async API

    async def agenerate(self, request: EchoRequest) -> EchoResult:
        """Answer one request; the result's ``decision`` says which model answered and why."""
        return await self._on_home(self._agenerate(request))

    async def astream(self, request: EchoRequest) -> AsyncIterator[EchoChunk]:
        """Stream one answer; the last chunk carries ``finish_reason``, ``usage`` and the ``decision``.

        Closing the iterator (or cancelling its consumer) cancels the engine request.
        """
        home = background_loop()
        if asyncio.get_running_loop() is home:
            async for chunk in self._astream(request):
                yield chunk
            return
        caller = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                caller.call_soon_threadsafe(items.put_nowait, item)

        async def pump() -> None:
            try:
                async for chunk in self._astream(request):
                    put(chunk)
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # handed to the consumer
                put(exc)
            finally:
                put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), home)
        finished = False
        try:
            while True:
                item = await items.get()
                if item is _DONE:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not finished:
                future.cancel()
                # wait until the pump has unwound (the engine request is aborted) before returning
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(30):
                        while await items.get() is not _DONE:
                            pass

    async def abatch(
        self, requests: Sequence[EchoRequest], max_concurrency: int = 8, *, return_exceptions: bool = False
    ) -> list[Any]:
        """Answer many requests, at most ``max_concurrency`` at a time, results in request order.

        Args:
            requests: The requests.
            max_concurrency: Requests in flight at once.
            return_exceptions: Put a failed request's exception in its place instead of raising the first one.
        """
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency={max_concurrency} must be at least 1")
        return await self._on_home(self._abatch(list(requests), max_concurrency, return_exceptions))

    async def _abatch(self, requests: list[EchoRequest], limit: int, return_exceptions: bool) -> list[Any]:
        semaphore = asyncio.Semaphore(limit)

        async def one(request: EchoRequest) -> EchoResult:
            async with semaphore:
                return await self._agenerate(request)

        if return_exceptions:
            return list(await asyncio.gather(*(one(r) for r in requests), return_exceptions=True))
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(r)) for r in requests]
        return [t.result() for t in tasks]

    # ----------------------------------------------------------------------------------- sync API

    def generate(self, request: EchoRequest) -> EchoResult:
        """Sync :meth:`agenerate` (works inside a running event loop, e.g. Jupyter)."""
        return run_sync(self._agenerate(request))

    def stream(self, request: EchoRequest) -> Iterator[EchoChunk]:
        """Sync :meth:`astream`; closing the iterator cancels the request."""
        return iterate_sync(self._astream(request))

    def batch(self, requests: Sequence[EchoRequest], max_concurrency: int = 8) -> list[EchoResult]:
        """Sync :meth:`abatch`."""
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency={max_concurrency} must be at least 1")
        return run_sync(self._abatch(list(requests), max_concurrency, False))

    def start_sync(self) -> None:
        """Sync :meth:`start`."""
        run_sync(self._start())

    def close_sync(self) -> None:
        """Sync :meth:`close`."""
        run_sync(self._close())

    # ----------------------------------------------------------------------------------- internals

    @staticmethod
    async def _on_home(coro: Coroutine[Any, Any, T]) -> T:
        home = background_loop()
        if asyncio.get_running_loop() is home:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, home))

    async def _agenerate(self, request: EchoRequest) -> EchoResult:
        parts: list[str] = []
        last: EchoChunk | None = None
        async for chunk in self._astream(request):
            parts.append(chunk.text)
            last = chunk
        assert last is not None  # noqa: S101  (_astream always ends with a final chunk)
        assert last.decision is not None  # noqa: S101
        return EchoResult(
            request_id=request.request_id,
            text="".join(parts),
            finish_reason=last.finish_reason or "stop",
            usage=last.usage or Usage(),
            decision=last.decision,
        )

    async def _astream(self, request: EchoRequest) -> AsyncIterator[EchoChunk]:
        if not isinstance(request, EchoRequest):
            raise ConfigError(f"request must be an EchoRequest, not {type(request).__name__}")
        await self._start()
        plan = await self._prepare(request)
        route = plan.route
        assert route is not None  # noqa: S101
        offload = route.offload and self._small_error is None
        if route.offload and self._small_error is not None:
            plan.fallback.append(f"small model unavailable ({self._small_error}): the large model answers")
        attempts = ["small", "large"] if offload else ["large"]
        tried: set[str] = set()
        while attempts:
            role = attempts.pop(0)
            tried.add(role)
            engine = self.small_engine if role == "small" else self.large_engine
            began = time.monotonic()
            engine_request = await self._engine_request(plan, role)
            texts: list[str] = []
            finish: FinishReason | None = None
            usage: Usage | None = None
            self._inflight[role] += 1
            try:
                async with contextlib.aclosing(self._stream_on(role, engine, engine_request, plan)) as deltas:
                    async for delta in deltas:
                        if delta.text:
                            texts.append(delta.text)
                            yield EchoChunk(request_id=request.request_id, text=delta.text)
                        if delta.finish_reason is not None:
                            finish, usage = delta.finish_reason, delta.usage
            except Cancelled:
                raise
            except Exception as exc:
                plan.stage_s["generate"] = plan.stage_s.get("generate", 0.0) + time.monotonic() - began
                next_role = self._fallback_role(plan, role, exc, bool(texts), tried)
                if next_role is None:
                    raise
                attempts.insert(0, next_role)
                continue
            finally:
                self._inflight[role] -= 1
                if self._learner is not None:
                    self._learner.wake()
            plan.stage_s["generate"] = plan.stage_s.get("generate", 0.0) + time.monotonic() - began
            text = "".join(texts)
            decision = await self._finish(plan, role, engine, text, finish or "stop", usage or Usage())
            yield EchoChunk(
                request_id=request.request_id, finish_reason=finish or "stop", usage=usage, decision=decision
            )
            return

    def _stream_on(self, role: str, engine: Engine, request: EngineRequest, plan: _Plan) -> AsyncGenerator[Any, None]:
        """The engine's stream, through its scheduler when the pipeline schedules."""
        scheduler = self._schedulers.get(role)
        if scheduler is None:
            # Engine.stream is an async generator (it has aclose) though typed as an iterator
            return engine.stream(request)  # type: ignore[return-value]
        predicted = None if plan.prediction is None else plan.prediction.tokens
        return scheduler.stream(request, predicted_tokens=predicted, slo=plan.request.slo)  # type: ignore[no-any-return,unused-ignore]

    def _finished(self, finished: Any) -> None:
        """Scheduler callback: remember how long a request waited in the queue, for its decision."""
        self._queue_wait[finished.request_id] = float(finished.queue_wait_s)
        if len(self._queue_wait) > 10_000:
            self._queue_wait.clear()

    def _busy(self, role: str) -> bool:
        if self._inflight[role] > 0:
            return True
        scheduler = self._schedulers.get(role)
        return scheduler is not None and (scheduler.waiting + scheduler.running) > 0

    def _load(self, role: str) -> Any:
        scheduler = self._schedulers.get(role)
        return (
            scheduler.load()
            if scheduler is not None
            else (self.large_engine if role == "large" else self.small_engine).load()
        )

    def _fallback_role(self, plan: _Plan, role: str, exc: Exception, emitted: bool, tried: set[str]) -> str | None:
        """Which engine answers after ``role`` failed with ``exc``, noting why in the plan; None: re-raise."""
        route = plan.route
        assert route is not None  # noqa: S101
        if emitted:
            exc.add_note(f"the {role} model failed after streaming part of its answer: it cannot be retried")
            return None
        if role == "small":
            if "large" in tried:
                return None
            logger.warning(
                "request %s: small model failed, the large model answers: %s", plan.request.request_id, _short(exc)
            )
            plan.fallback.append(f"small model failed ({_short(exc)}): the large model answers")
            return "large"
        can_small = (
            self.settings.route.fallback_to_small
            and route.possible
            and plan.request.offload != "never"
            and self._small_error is None
            and "small" not in tried
        )
        if not can_small:
            why = "offload was not possible: " + route.reason if not route.possible else "no fallback configured"
            if plan.request.offload == "never":
                why = "offload='never'"
            exc.add_note(f"the large model failed and the small model was not used ({why})")
            return None
        logger.warning(
            "request %s: large model failed, the small model answers: %s", plan.request.request_id, _short(exc)
        )
        plan.fallback.append(
            f"large model failed ({_short(exc)}): the small model answers with {len(plan.selected)} example(s) "
            "(offload was possible)"
        )
        return "small"

    async def _engine_request(self, plan: _Plan, role: str) -> EngineRequest:
        request = plan.request
        messages: list[Message] = list(request.messages)
        if role == "small":
            began = time.monotonic()
            assembled = await assemble_prompt(messages, plan.selected, self.small_engine, request.params.max_tokens)
            messages = assembled.messages
            plan.used = assembled.used
            if assembled.skipped:
                plan.notes.append(f"{len(assembled.skipped)} example(s) did not fit the small model's context")
            plan.stage_s["prompt"] = time.monotonic() - began
        else:
            plan.used = []
        slo = request.slo
        priority = _PRIORITY_OF_CLASS.get(slo.priority if slo else "standard", 10)
        deadline = None
        factor = self.settings.schedule.slo_deadline_factor
        if slo is not None and slo.latency_s is not None and factor:
            deadline = time.time() + slo.latency_s * factor - (time.monotonic() - plan.began)
        return EngineRequest(
            request_id=plan.engine_ids.setdefault(role, f"{request.request_id}-{role}-{new_request_id()[:6]}"),
            messages=messages,
            params=request.params,
            priority=priority,
            deadline=deadline,
        )

    async def _prepare(self, request: EchoRequest) -> _Plan:
        """Retrieve, rank, select and route."""
        tenant = request.tenant or self.settings.tenant
        plan = _Plan(
            request=request, tenant=tenant, query=RankQuery.from_messages(request.messages), began=time.monotonic()
        )
        skip_retrieval = request.offload == "never" or (request.requires_large and request.offload != "always")
        candidates: list[Candidate] = []
        note = ""
        if not skip_retrieval:
            if (
                self._store is None
                and self._store_error is not None
                and (time.monotonic() - self._store_failed_at > STORE_RETRY_S)
            ):
                await self._open_store()
            if self._store is None:
                note = f"store unavailable ({self._store_error or 'not configured'})"
                plan.fallback.append(f"{note}: the large model answers")
            else:
                candidates, note = await self._retrieve(plan)
        best_utility = None
        if candidates:
            began = time.monotonic()
            plan.ranking = await asyncio.to_thread(self.ranker.rank, plan.query, candidates)
            plan.stage_s["rank"] = time.monotonic() - began
            ranked = plan.ranking.candidates
            best_utility = ranked[0].utility if ranked else None
            plan.selected = select_examples(ranked, self.settings.rank.min_utility, self.settings.rank.max_examples)
        if self._predictor is not None:
            began = time.monotonic()
            try:
                plan.prediction = await asyncio.to_thread(
                    self._predictor.predict, plan.query.text, candidates, embedding=plan.embedding
                )
            except Exception as exc:  # a guess that fails only costs the ordering
                logger.warning("request %s: length prediction failed: %s", request.request_id, _short(exc))
            plan.stage_s["predict"] = time.monotonic() - began
        began = time.monotonic()
        large_load = self._load("large")
        plan.route = self.policy.decide(request, plan.selected, large_load, best_utility=best_utility, note=note)
        plan.stage_s["route"] = time.monotonic() - began
        logger.debug("request %s: %s", request.request_id, plan.route.reason)
        return plan

    async def _retrieve(self, plan: _Plan) -> tuple[list[Candidate], str]:
        """The top-k candidates of the tenant; on a store or embedder failure, none and the reason."""
        store = self._store
        text = plan.query.text
        k = self.settings.rank.top_k
        try:
            embedding = None
            if self._embedder is not None:
                began = time.monotonic()
                vectors = await self._embedder.aembed([text])
                embedding = vectors[0]
                plan.embedding = embedding
                plan.stage_s["embed"] = time.monotonic() - began
            began = time.monotonic()
            if embedding is not None:
                candidates = await store.query(text, plan.tenant, k, embedding=embedding)
            else:
                candidates = await store.query(text, plan.tenant, k)
            plan.stage_s["retrieve"] = time.monotonic() - began
        except Exception as exc:  # the answer must still come: the large model gives it
            logger.warning(
                "request %s: retrieval failed, the large model answers: %s", plan.request.request_id, _short(exc)
            )
            note = f"store unavailable ({_short(exc)})"
            plan.fallback.append(f"{note}: the large model answers")
            return [], note
        return list(candidates), ""

    async def _finish(
        self, plan: _Plan, role: str, engine: Engine, text: str, finish: FinishReason, usage: Usage
    ) -> Decision:
        """Learn from the answer (durably, before returning) and build the decision."""
        route = plan.route
        assert route is not None  # noqa: S101
        request = plan.request
        learner = self._learner
        began = time.monotonic()
        if learner is not None and self._store is not None:
            try:
                if role == "large":
                    generation = Generation(
                        request_id=request.request_id,
                        text=text,
                        finish_reason=finish,
                        usage=usage,
                        engine=engine.name,
                        model=engine.model,
                    )
                    await learner.store_answer(plan.tenant, request, generation)
                    if not route.offload:
                        learner.after_large(
                            plan.tenant, request, text, plan.selected, route.predicted_quality, plan.rows(plan.selected)
                        )
                else:
                    await learner.after_offload(
                        plan.tenant, request, text, plan.used, route.predicted_quality, plan.rows(plan.used)
                    )
            except Exception as exc:  # the answer is good; only learning failed
                learner.stats.store_failures += 1
                logger.warning("request %s: learning failed: %s", request.request_id, _short(exc))
                plan.notes.append(f"not learned: store failed ({_short(exc)})")
        if self._predictor is not None and plan.prediction is not None and finish in ("stop", "length"):
            try:
                self._predictor.observe(plan.prediction, usage.completion_tokens)
            except Exception as exc:
                logger.warning("request %s: length predictor update failed: %s", request.request_id, _short(exc))
        plan.stage_s["learn"] = time.monotonic() - began
        offloaded = role == "small"
        queue_wait = self._queue_wait.pop(plan.engine_ids.get(role, ""), 0.0)
        reason = route.reason
        if plan.notes:
            reason = f"{reason}; " + "; ".join(plan.notes)
        shown = plan.used if offloaded else []
        return Decision(
            request_id=request.request_id,
            offloaded=offloaded,
            reason=reason,
            mode=request.offload,
            examples=[ExampleUse(id=c.example.id, distance=c.distance, utility=c.utility) for c in shown],
            predicted_quality=route.predicted_quality,
            threshold=route.threshold,
            predicted_length=None if plan.prediction is None else float(plan.prediction.tokens),
            queue_wait_s=queue_wait,
            engine=engine.name,
            model=engine.model,
            stage_s={k: round(v, 6) for k, v in plan.stage_s.items()},
            fallback="; ".join(plan.fallback) or None,
        )


__all__ = ["EchoPipeline"]
