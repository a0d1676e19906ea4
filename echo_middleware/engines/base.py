"""The one async protocol every engine speaks: generate, stream, cancel, health, load, features.

The pipeline, the scheduler and the router only ever see :class:`Engine`; in-process vLLM, a remote vLLM server
and transformers are interchangeable behind it. Subclasses implement :meth:`Engine._start`,
:meth:`Engine._stream` and :meth:`Engine._abort`; this base class owns what they share: the in-flight table
that makes ``cancel`` and ``load`` work, deadlines, timings, token usage, and the speed estimate the router reads.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from echo_middleware._aio import until_deadline
from echo_middleware.errors import Cancelled, EngineError, EngineTimeout, EngineUnavailable
from echo_middleware.types import (
    EngineHealth,
    EngineLoad,
    EngineRequest,
    FeatureStatus,
    Generation,
    StreamDelta,
    Timings,
    Usage,
)

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    request: EngineRequest
    submitted: float
    task: asyncio.Task[object] | None = None
    started: bool = False
    cancelled: bool = False
    cancel_reason: str = ""


@dataclass
class _Speed:
    """Exponentially weighted decode speed, tokens per second."""

    value: float = 0.0
    alpha: float = 0.3
    samples: int = field(default=0)

    def update(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.value = rate if self.samples == 0 else self.alpha * rate + (1 - self.alpha) * self.value
        self.samples += 1


class Engine(abc.ABC):
    """Base class of all engines.

    Lifecycle: construct (cheap, loads nothing) -> ``await start()`` (loads weights / connects) -> use ->
    ``await close()``. ``async with engine:`` does both. Generating before ``start()`` starts the engine.
    """

    kind: str = "engine"

    def __init__(self, name: str, model: str, max_concurrency: int = 8) -> None:
        self.name = name
        self.model = model
        self.max_concurrency = max_concurrency
        self._features: dict[str, FeatureStatus] = {}
        self._inflight: dict[str, _InFlight] = {}
        self._speed = _Speed()
        self._started = False
        self._start_lock: asyncio.Lock | None = None

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the model or connect; idempotent and safe to call concurrently."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            began = time.monotonic()
            await self._start()
            self._started = True
            logger.info(
                "engine %s (%s, %s) started in %.1f s",
                self.name,
                self.kind,
                self.model,
                time.monotonic() - began,
            )

    async def close(self) -> None:
        """Cancel what is in flight and release the model or connection."""
        for rid in list(self._inflight):
            await self.cancel(rid, reason="engine closing")
        if self._started:
            await self._close()
        self._started = False

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has finished."""
        return self._started

    # ---------------------------------------------------------------------------------- protocol

    @property
    def features(self) -> dict[str, FeatureStatus]:
        """What this engine was asked to enable and what it actually enabled (known after ``start``)."""
        return dict(self._features)

    def load(self) -> EngineLoad:
        """Queue depth, running requests and recent decode speed, for the router and the scheduler."""
        running = sum(1 for f in self._inflight.values() if f.started)
        return EngineLoad(
            waiting=len(self._inflight) - running,
            running=running,
            max_concurrency=self.max_concurrency,
            tokens_per_s=self._speed.value,
        )

    async def health(self) -> EngineHealth:
        """Whether the engine answers; remote engines ask the server, local ones check their model."""
        began = time.monotonic()
        if not self._started:
            return EngineHealth(ok=False, detail="not started")
        try:
            detail = await self._health()
        except Exception as exc:  # a health check reports, it does not raise
            return EngineHealth(ok=False, detail=f"{type(exc).__name__}: {exc}", latency_s=time.monotonic() - began)
        return EngineHealth(ok=True, detail=detail, latency_s=time.monotonic() - began)

    async def generate(self, request: EngineRequest) -> Generation:
        """Generate a whole answer (collects :meth:`stream`)."""
        parts: list[str] = []
        last: StreamDelta | None = None
        began = time.monotonic()
        first: float | None = None
        async for delta in self.stream(request):
            if delta.text and first is None:
                first = time.monotonic()
            parts.append(delta.text)
            last = delta
        if last is None:  # _stream broke its contract: a stream always ends with a final delta
            raise EngineError(f"{self.name} returned an empty stream for {request.request_id}")
        return Generation(
            request_id=request.request_id,
            text="".join(parts),
            finish_reason=last.finish_reason or "stop",
            usage=last.usage or Usage(),
            timings=Timings(ttft_s=None if first is None else first - began, total_s=time.monotonic() - began),
            engine=self.name,
            model=self.model,
        )

    async def stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        """Stream an answer as deltas; the last delta has ``finish_reason`` and ``usage``.

        Raises:
            Cancelled: the request was cancelled (``cancel``, or the consumer stopped iterating).
            EngineTimeout: the deadline or ``timeout_s`` passed.
        """
        if request.request_id in self._inflight:
            raise EngineError(f"request_id {request.request_id!r} is already in flight on {self.name}")
        await self.start()
        entry = _InFlight(request=request, submitted=time.monotonic())
        self._inflight[request.request_id] = entry
        began = time.monotonic()
        first: float | None = None
        completion = 0
        finished = False
        try:
            remaining = request.remaining_s()
            if remaining is not None and remaining <= 0:
                raise EngineTimeout(f"request {request.request_id} reached {self.name} after its deadline")
            async for delta in self._with_deadline(self._stream(request), request):
                entry.started = True
                if entry.cancelled:
                    raise Cancelled(f"request {request.request_id} cancelled: {entry.cancel_reason}")
                if delta.text and first is None:
                    first = time.monotonic()
                if delta.usage is not None:
                    completion = delta.usage.completion_tokens
                if delta.finish_reason is not None:
                    finished = True
                yield delta
            if entry.cancelled:
                raise Cancelled(f"request {request.request_id} cancelled: {entry.cancel_reason}")
            if not finished:
                raise EngineError(f"{self.name} ended the stream of {request.request_id} without finishing it")
            if first is not None and completion > 1:
                self._speed.update(completion - 1, time.monotonic() - first)
        except (asyncio.CancelledError, GeneratorExit):
            entry.cancelled = True
            with contextlib.suppress(Exception):
                await asyncio.shield(self._abort(request.request_id))
            raise
        except (Cancelled, EngineTimeout):
            with contextlib.suppress(Exception):
                await self._abort(request.request_id)
            raise
        finally:
            self._inflight.pop(request.request_id, None)
            logger.debug("engine %s finished %s in %.2f s", self.name, request.request_id, time.monotonic() - began)

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stop a request in flight; it ends with :class:`Cancelled`. False if it is not in flight."""
        entry = self._inflight.get(request_id)
        if entry is None:
            return False
        entry.cancelled = True
        entry.cancel_reason = reason
        await self._abort(request_id)
        return True

    def in_flight(self) -> list[str]:
        """Ids of the requests this engine is working on."""
        return list(self._inflight)

    # --------------------------------------------------------------------------------- internals

    def _with_deadline(self, source: AsyncIterator[StreamDelta], request: EngineRequest) -> AsyncIterator[StreamDelta]:
        """Pass deltas through, raising EngineTimeout when the deadline or the engine's timeout passes.

        Returns :func:`until_deadline`'s generator itself; closing it closes ``source``. (``stream`` iterates it
        with a plain ``async for``, so on a consumer break ``source`` is closed when the generator is collected.)
        """
        limit = self._timeout_s()
        remaining = request.remaining_s()
        if remaining is not None:
            limit = min(limit, remaining) if limit else remaining
        end = None if not limit else time.monotonic() + limit

        def timeout() -> EngineTimeout:
            return EngineTimeout(
                f"{self.name}: request {request.request_id} passed its deadline or timeout ({limit:.1f} s)"
            )

        return until_deadline(source, end, timeout)

    def _timeout_s(self) -> float | None:
        """The engine's own per-request timeout; None for none."""
        return None

    def _require_started(self) -> None:
        if not self._started:
            raise EngineUnavailable(f"engine {self.name} is not started: call `await engine.start()` first")

    @abc.abstractmethod
    async def _start(self) -> None:
        """Load weights or connect; fill ``self._features``."""

    @abc.abstractmethod
    def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        """Yield deltas; the last one has finish_reason and usage."""

    @abc.abstractmethod
    async def _abort(self, request_id: str) -> None:
        """Stop generating ``request_id`` in the backend (free its KV, close its stream)."""

    async def _close(self) -> None:  # noqa: B027  (optional hook: most engines have nothing to release)
        """Release resources."""

    async def _health(self) -> str:
        """Raise if unhealthy; return a short detail."""
        return "ok"

    async def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes with this engine's tokenizer (used for prompt budgets)."""
        return max(1, len(text) // 4)

    @property
    def context_window(self) -> int:
        """The most prompt plus completion tokens this engine serves."""
        return 4096
