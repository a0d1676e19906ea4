"""The per-engine scheduler: shortest predicted job first with aging, deadlines for SLOs, admission, cancellation.

One :class:`Scheduler` sits in front of each engine. It lets at most ``max_concurrency`` requests run on the
engine and orders the rest by a single number, the **rank** (lower is served first), computed once when a
request arrives (see :func:`queue_rank`):

- ``fcfs``: ``rank = arrival``.
- ``sjf`` (SSJF with aging): ``rank = arrival + aging_s * log2(1 + predicted_tokens)``. Every doubling of
  the predicted length costs ``aging_s`` seconds of queue position, so short jobs go first, and a long job's
  rank is a fixed point in time that later arrivals cannot undercut forever: a request that arrives after that
  point ranks behind it. Waiting is therefore bounded without any timer (``max_wait_s`` adds a hard bound on
  top: whoever has waited that long is served next).
- ``slo`` (default): the ``sjf`` rank plus ``class_delay_s[priority class]``; and a request whose SLO sets a
  time-to-first-token or total latency gets the earlier of that and its **latest start time** (``arrival +
  ttft_s``, or ``arrival + latency_s - predicted_tokens / tokens_per_s``): earliest deadline first among
  requests with deadlines, SJF for the rest, in one queue. A deadline already missed ranks as ``arrival``.

The rank is also handed to the engine as :attr:`EngineRequest.priority` (milliseconds since the scheduler's start;
lower is served first, as in vLLM's priority scheduler), so an engine that queues or preempts internally agrees
with the scheduler.

Admission: at most ``max_queue`` requests wait; beyond that ``on_full="reject"`` raises
:class:`~echo_middleware.errors.Overloaded` at once, ``on_full="wait"`` makes the caller wait for room in
arrival order (back-pressure). Timeouts: ``queue_timeout_s`` and the request's own ``deadline`` end a wait with
:class:`~echo_middleware.errors.EngineTimeout`; once running, the engine enforces the deadline.

Cancellation: cancelling the caller's task (a client disconnect) removes a queued request or, when running,
aborts it in the engine (the engine's ``stream`` aborts its backend when its consumer goes away);
:meth:`Scheduler.cancel` does the same by request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from echo_middleware.config import ScheduleConfig
from echo_middleware.engines.base import Engine
from echo_middleware.errors import Cancelled, ConfigError, EngineError, EngineTimeout, EngineUnavailable, Overloaded
from echo_middleware.schedule.metrics import FinishedRequest, Outcome, SchedulerMetrics
from echo_middleware.schedule.speculation import SpeculationDecision, SpeculationPolicy, speculation_scope
from echo_middleware.types import SLO, EngineLoad, EngineRequest, Generation, PriorityClass, StreamDelta, Timings, Usage

logger = logging.getLogger(__name__)


def queue_rank(
    policy: str,
    *,
    arrival: float,
    predicted_tokens: float,
    slo: SLO | None,
    config: ScheduleConfig,
    tokens_per_s: float,
) -> float:
    """The queue position of a request: lower is served first (see the module docstring for the formulas).

    Args:
        policy: ``fcfs``, ``sjf`` or ``slo``.
        arrival: When the request arrived, on the scheduler's clock (seconds).
        predicted_tokens: Predicted output tokens (at least 1).
        slo: The request's SLO; None is the standard class without deadlines.
        config: Supplies ``aging_s`` and ``class_delay_s``.
        tokens_per_s: Decode speed of one request, to turn a latency SLO into a latest start time.
    """
    if policy == "fcfs":
        return arrival
    sjf = arrival + config.aging_s * math.log2(1.0 + max(predicted_tokens, 0.0))
    if policy == "sjf":
        return sjf
    klass: PriorityClass = slo.priority if slo is not None else "standard"
    sjf += config.class_delay_s[klass]
    if slo is None:
        return sjf
    deadline = math.inf
    if slo.ttft_s is not None:
        deadline = min(deadline, arrival + slo.ttft_s)
    if slo.latency_s is not None:
        deadline = min(deadline, arrival + slo.latency_s - predicted_tokens / max(tokens_per_s, 1e-9))
    return min(sjf, max(deadline, arrival))


@dataclass(eq=False)
class _Ticket:
    """One request's place in the scheduler."""

    request: EngineRequest
    engine_request: EngineRequest
    slo: SLO | None
    predicted_tokens: float
    arrival: float
    rank: float
    future: asyncio.Future[None]
    state: str = "new"
    """new -> queued -> running -> done; or dropped (cancelled, timed out or refused while waiting)."""
    started: float | None = None
    first: float | None = None
    speculation: SpeculationDecision | None = None
    finished: bool = field(default=False)

    @property
    def priority_class(self) -> PriorityClass:
        return self.slo.priority if self.slo is not None else "standard"

    def timings(self, now: float) -> Timings:
        """Where the request spent its time, measured from its arrival on the scheduler's clock."""
        started = self.started if self.started is not None else now
        return Timings(
            queued_s=started - self.arrival,
            ttft_s=None if self.first is None else self.first - self.arrival,
            total_s=now - self.arrival,
        )


class Scheduler:
    """Orders the requests of one engine: SJF with aging, EDF for SLOs, bounded queue, cancellation, metrics.

    Args:
        engine: The engine requests run on (started on first use if it is not yet).
        config: The ``schedule`` settings.
        speculation: Per-class speculation advice; by default built from ``config.speculation`` and the
            engine's reported features once it has started.
        clock: Seconds, monotonic; defaults to the running event loop's clock (so a simulated loop with
            virtual time drives the scheduler too).
        on_finish: Called with a :class:`FinishedRequest` for every request that leaves (e.g. to feed
            :meth:`~echo_middleware.predict.LengthPredictor.observe`); errors in it are logged, not raised.
        name: Name in logs; defaults to the engine's.

    Example:
        .. code-block:: python

            scheduler = Scheduler(engine, ScheduleConfig(policy="slo", max_concurrency=8))
            gen = await scheduler.submit(request, predicted_tokens=guess.tokens, slo=SLO(ttft_s=1.0))
            async for delta in scheduler.stream(request, predicted_tokens=40):
                print(delta.text, end="")
            scheduler.metrics.snapshot()["by_class"]["interactive"]["slo_attainment"]
    """

    def __init__(
        self,
        engine: Engine,
        config: ScheduleConfig | None = None,
        *,
        speculation: SpeculationPolicy | None = None,
        clock: Callable[[], float] | None = None,
        on_finish: Callable[[FinishedRequest], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.engine = engine
        self.config = config or ScheduleConfig()
        self.name = name or engine.name
        self.metrics = SchedulerMetrics(self.config.metrics_window)
        self._speculation = speculation
        self._speculation_from_features = speculation is not None
        self._clock = clock
        self._on_finish = on_finish
        self._heap: list[tuple[float, int, _Ticket]] = []
        self._fifo: deque[_Ticket] = deque()
        self._seq = itertools.count()
        self._tickets: dict[str, _Ticket] = {}
        self._queued = 0
        self._running = 0
        self._reserved = 0
        self._room: deque[asyncio.Future[None]] = deque()
        self._epoch: float | None = None
        self._closed = False

    # ---------------------------------------------------------------------------------- public API

    async def submit(
        self, request: EngineRequest, predicted_tokens: float | None = None, slo: SLO | None = None
    ) -> Generation:
        """Queue ``request``, run it when its turn comes, and return the whole answer.

        Args:
            request: What to generate.
            predicted_tokens: Predicted output tokens (from the
                :class:`~echo_middleware.predict.LengthPredictor`); None assumes ``params.max_tokens``, which
                puts an unpredicted request behind predicted short ones. Capped at ``params.max_tokens``.
            slo: Latency objective and priority class; None is the standard class without deadlines.

        Returns:
            The generation; its timings are measured from this call (``queued_s`` is the part spent waiting).

        Raises:
            Overloaded: the queue is full and ``on_full="reject"``.
            EngineTimeout: ``queue_timeout_s`` or the request's deadline passed.
            Cancelled: :meth:`cancel` was called for it.
        """
        parts: list[str] = []
        last: StreamDelta | None = None
        holder: list[_Ticket] = []
        async with contextlib.aclosing(self._run(request, predicted_tokens, slo, holder)) as deltas:
            async for delta in deltas:
                parts.append(delta.text)
                last = delta
        if last is None:
            raise EngineError(f"{self.engine.name} returned an empty stream for {request.request_id}")
        return Generation(
            request_id=request.request_id,
            text="".join(parts),
            finish_reason=last.finish_reason or "stop",
            usage=last.usage or Usage(),
            timings=holder[0].timings(self._now()),
            engine=self.engine.name,
            model=self.engine.model,
        )

    async def stream(
        self, request: EngineRequest, predicted_tokens: float | None = None, slo: SLO | None = None
    ) -> AsyncIterator[StreamDelta]:
        """Like :meth:`submit`, but yields the answer's deltas; closing the iterator cancels the request."""
        async with contextlib.aclosing(self._run(request, predicted_tokens, slo, [])) as deltas:
            async for delta in deltas:
                yield delta

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued or running request: its caller gets :class:`Cancelled`. False if unknown."""
        ticket = self._tickets.get(request_id)
        if ticket is None:
            return False
        if ticket.state == "queued":
            self._drop(ticket, Cancelled(f"request {request_id} cancelled while queued: {reason}"))
            return True
        if ticket.state == "running":
            return await self.engine.cancel(ticket.engine_request.request_id, reason=reason)
        return False

    def load(self) -> EngineLoad:
        """The engine's load with this scheduler's queue added to ``waiting`` (for the router and speculation)."""
        inner = self.engine.load()
        return EngineLoad(
            waiting=self._queued + inner.waiting,
            running=inner.running,
            max_concurrency=inner.max_concurrency,
            tokens_per_s=inner.tokens_per_s,
        )

    def queued(self) -> list[str]:
        """Ids of the waiting requests in the order they would be served (ignoring ``max_wait_s``)."""
        live = [(r, s, t) for r, s, t in self._heap if t.state == "queued"]
        return [t.request.request_id for _, _, t in sorted(live, key=lambda e: (e[0], e[1]))]

    @property
    def running(self) -> int:
        """Requests this scheduler has on the engine now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting in this scheduler's queue."""
        return self._queued

    async def close(self) -> None:
        """Refuse new requests and fail the waiting ones with :class:`Cancelled` (running ones finish)."""
        self._closed = True
        for ticket in list(self._tickets.values()):
            if ticket.state == "queued":
                self._drop(ticket, Cancelled(f"scheduler {self.name} closed"))
        while self._room:
            fut = self._room.popleft()
            if not fut.done():
                fut.set_exception(Cancelled(f"scheduler {self.name} closed"))

    # ---------------------------------------------------------------------------------- the request's life

    async def _run(
        self,
        request: EngineRequest,
        predicted_tokens: float | None,
        slo: SLO | None,
        holder: list[_Ticket],
    ) -> AsyncGenerator[StreamDelta, None]:
        ticket = self._ticket(request, predicted_tokens, slo)
        holder.append(ticket)
        await self._wait_turn(ticket)
        outcome: Outcome = "error"
        tokens = 0
        try:
            await self.engine.start()  # features (what it can speculate with) are known once it has started
            spec = self._speculation_policy()
            ticket.speculation = spec.for_request(ticket.slo, self.load()) if spec is not None else None
            with speculation_scope(ticket.speculation):
                async with _closing(self.engine.stream(ticket.engine_request)) as deltas:
                    async for delta in deltas:
                        if delta.text and ticket.first is None:
                            ticket.first = self._now()
                        if delta.usage is not None:
                            tokens = delta.usage.completion_tokens
                        yield delta
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            outcome = "cancelled"
            raise
        except EngineTimeout:
            outcome = "timeout"
            raise
        finally:
            ticket.state = "done"
            self._running -= 1
            ttft = None if ticket.first is None else ticket.first - ticket.arrival
            self._finish(ticket, outcome, tokens=tokens, ttft=ttft)
            self._dispatch()

    def _ticket(self, request: EngineRequest, predicted_tokens: float | None, slo: SLO | None) -> _Ticket:
        if self._closed:
            raise EngineUnavailable(f"scheduler {self.name} is closed")
        if request.request_id in self._tickets:
            raise EngineError(f"request_id {request.request_id!r} is already in scheduler {self.name}")
        if predicted_tokens is None:
            predicted = float(request.params.max_tokens)
        else:
            if not math.isfinite(predicted_tokens) or predicted_tokens < 0:
                raise ConfigError(
                    f"predicted_tokens={predicted_tokens!r} must be a finite number >= 0 (a LengthPrediction.tokens)"
                )
            predicted = min(max(float(predicted_tokens), 1.0), float(request.params.max_tokens))
        now = self._now()
        if self._epoch is None:
            self._epoch = now
        cfg = self.config
        tokens_per_s = self.engine.load().tokens_per_s or cfg.default_tokens_per_s
        rank = queue_rank(
            cfg.policy, arrival=now, predicted_tokens=predicted, slo=slo, config=cfg, tokens_per_s=tokens_per_s
        )
        update: dict[str, object] = {}
        if cfg.engine_priority:
            update["priority"] = round((rank - self._epoch) * 1000)
        if cfg.slo_deadline_factor is not None and slo is not None and slo.latency_s is not None:
            deadline = time.time() + cfg.slo_deadline_factor * slo.latency_s
            if request.deadline is None or deadline < request.deadline:
                update["deadline"] = deadline
        engine_request = request.model_copy(update=update) if update else request
        ticket = _Ticket(
            request=request,
            engine_request=engine_request,
            slo=slo,
            predicted_tokens=predicted,
            arrival=now,
            rank=rank,
            future=asyncio.get_running_loop().create_future(),
        )
        self._tickets[request.request_id] = ticket
        logger.debug(
            "scheduler %s: %s predicted %.0f tokens, class %s, rank %+.3f s",
            self.name,
            request.request_id,
            predicted,
            ticket.priority_class,
            rank - self._epoch,
        )
        return ticket

    async def _wait_turn(self, t: _Ticket) -> None:
        """Admission, then the queue; returns when ``t`` holds a slot (state ``running``)."""
        cfg = self.config
        if self._queued + self._reserved >= cfg.max_queue or any(not f.done() for f in self._room):
            if cfg.on_full == "reject":
                self._finish(t, "rejected")
                raise Overloaded(
                    f"scheduler {self.name}: {self._queued} requests waiting (schedule.max_queue={cfg.max_queue}); "
                    "retry later, add engines, or raise schedule.max_queue / use schedule.on_full='wait'"
                )
            room = asyncio.get_running_loop().create_future()
            self._room.append(room)
            try:
                await self._bounded(room, t, "waiting for room in the queue")
            except BaseException as exc:
                if room.done() and not room.cancelled() and room.exception() is None:
                    self._reserved -= 1  # we were given room but leave: pass it on
                    self._wake_room()
                elif not room.done():
                    room.cancel()
                self._finish(t, _outcome_of(exc))
                raise
            self._reserved -= 1
        t.state = "queued"
        self._queued += 1
        heapq.heappush(self._heap, (t.rank, next(self._seq), t))
        self._fifo.append(t)
        self._dispatch()
        try:
            await self._bounded(t.future, t, "queued")
        except BaseException as exc:
            if t.state == "running":  # granted a slot but the caller left before using it
                t.state = "done"
                self._running -= 1
                self._dispatch()
            elif t.state == "queued":
                self._drop(t, None)
            self._finish(t, _outcome_of(exc))
            raise
        t.started = self._now()

    async def _bounded(self, fut: asyncio.Future[None], t: _Ticket, what: str) -> None:
        """Await ``fut`` within ``queue_timeout_s`` and the request's deadline; raise what it carries."""
        limits = []
        if self.config.queue_timeout_s is not None:
            limits.append(t.arrival + self.config.queue_timeout_s - self._now())
        remaining = t.engine_request.remaining_s()
        if remaining is not None:
            limits.append(remaining)
        timeout = max(0.0, min(limits)) if limits else None
        if not fut.done():
            await asyncio.wait({fut}, timeout=timeout)
        if not fut.done():
            raise EngineTimeout(
                f"request {t.request.request_id} {what} in scheduler {self.name} for "
                f"{self._now() - t.arrival:.2f} s: it passed its deadline or schedule.queue_timeout_s"
            )
        if fut.cancelled():
            raise Cancelled(f"request {t.request.request_id} cancelled while {what}")
        exc = fut.exception()
        if exc is not None:
            raise exc

    # ---------------------------------------------------------------------------------- queue internals

    def _dispatch(self) -> None:
        while self._running < self.config.max_concurrency:
            t = self._next()
            if t is None:
                break
            t.state = "running"
            self._queued -= 1
            self._running += 1
            if not t.future.done():
                t.future.set_result(None)
        self._wake_room()

    def _next(self) -> _Ticket | None:
        while self._fifo and self._fifo[0].state != "queued":
            self._fifo.popleft()
        bound = self.config.max_wait_s
        if bound is not None and self._fifo and self._now() - self._fifo[0].arrival >= bound:
            return self._fifo.popleft()
        while self._heap:
            _, _, t = heapq.heappop(self._heap)
            if t.state == "queued":
                return t
        return None

    def _drop(self, t: _Ticket, exc: BaseException | None) -> None:
        t.state = "dropped"
        self._queued -= 1
        if not t.future.done():
            if exc is None:
                t.future.cancel()
            else:
                t.future.set_exception(exc)
        self._wake_room()

    def _wake_room(self) -> None:
        while self._room and self._queued + self._reserved < self.config.max_queue:
            fut = self._room.popleft()
            if fut.done():
                continue
            self._reserved += 1
            fut.set_result(None)

    def _speculation_policy(self) -> SpeculationPolicy | None:
        if not self._speculation_from_features and self.engine.started:
            engine_cfg = getattr(self.engine, "config", None)
            spec_cfg = getattr(engine_cfg, "speculative", None)
            self._speculation = SpeculationPolicy(
                self.config.speculation,
                self.engine.features,
                engine_tokens=getattr(spec_cfg, "num_speculative_tokens", 4),
            )
            self._speculation_from_features = True
        return self._speculation

    def _finish(self, t: _Ticket, outcome: Outcome, *, tokens: int = 0, ttft: float | None = None) -> None:
        if t.finished:
            return
        t.finished = True
        self._tickets.pop(t.request.request_id, None)
        now = self._now()
        jct = now - t.arrival
        slo = t.slo
        has_slo = slo is not None and (slo.ttft_s is not None or slo.latency_s is not None)
        met: bool | None = None
        if has_slo and slo is not None and outcome != "cancelled":
            met = outcome == "ok"
            if met and slo.ttft_s is not None:
                met = ttft is not None and ttft <= slo.ttft_s
            if met and slo.latency_s is not None:
                met = jct <= slo.latency_s
        rec = FinishedRequest(
            request_id=t.request.request_id,
            priority_class=t.priority_class,
            outcome=outcome,
            predicted_tokens=t.predicted_tokens,
            completion_tokens=tokens,
            queue_wait_s=(t.started if t.started is not None else now) - t.arrival,
            ttft_s=ttft,
            jct_s=jct,
            has_slo=has_slo,
            slo_met=met,
            speculation=None if t.speculation is None else t.speculation.enabled,
        )
        self.metrics.record(rec)
        logger.debug("scheduler %s: %s %s after %.3f s", self.name, rec.request_id, outcome, jct)
        if self._on_finish is not None:
            try:
                self._on_finish(rec)
            except Exception:
                logger.exception("scheduler %s: on_finish callback failed for %s", self.name, rec.request_id)

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[StreamDelta]) -> AsyncGenerator[AsyncIterator[StreamDelta], None]:
    """Close an engine's stream when the block ends, so a consumer that leaves aborts the generation at once."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, EngineTimeout):
        return "timeout"
    if isinstance(exc, (asyncio.CancelledError, Cancelled)):
        return "cancelled"
    if isinstance(exc, Overloaded):
        return "rejected"
    return "error"
