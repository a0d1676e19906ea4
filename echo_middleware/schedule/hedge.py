"""Hedged requests: run one request on two engines, keep the first acceptable answer, cancel the other.

When a request has a tight SLO and the router is unsure whether the small model will do (its predicted quality
is near the threshold), waiting for the small model and then falling back to the large one costs both latencies.
Hedging starts both (the second optionally after ``delay_s``, as in "The Tail at Scale") and returns the first
answer that ``accept`` approves; the loser is cancelled at once, and because cancellation goes through the
scheduler and the engine's stream, it reaches the backend (PipeInfer's early cancellation, at our level): its
slot and KV cache are freed for other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from echo_middleware.engines.base import Engine
from echo_middleware.errors import EngineError
from echo_middleware.schedule.scheduler import Scheduler
from echo_middleware.types import SLO, EngineRequest, Generation

logger = logging.getLogger(__name__)

Target = Scheduler | Engine


@dataclass
class HedgeResult:
    """The answer of a hedged request and what happened to each leg.

    Attributes:
        generation: The answer returned (its ``request_id`` is the original request's).
        winner: Index of the leg that produced it (0: ``first``, 1: ``second``).
        accepted: Whether ``accept`` approved it (False when no leg was acceptable and the best one is returned).
        cancelled: Indexes of the legs that were cancelled because the other won.
        errors: Error messages of legs that failed, by index.
    """

    generation: Generation
    winner: int
    accepted: bool
    cancelled: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)


async def _run_leg(
    target: Target, request: EngineRequest, predicted_tokens: float | None, slo: SLO | None
) -> Generation:
    if isinstance(target, Scheduler):
        return await target.submit(request, predicted_tokens=predicted_tokens, slo=slo)
    return await target.generate(request)


async def hedge(
    first: Target,
    second: Target,
    request: EngineRequest,
    *,
    predicted_tokens: float | Sequence[float | None] | None = None,
    slo: SLO | None = None,
    accept: Callable[[Generation], bool] | None = None,
    delay_s: float = 0.0,
) -> HedgeResult:
    """Run ``request`` on ``first`` and ``second``; return the first acceptable answer, cancel the other.

    Args:
        first: Usually the small model's scheduler (or engine): cheaper, and preferred when both are acceptable.
        second: Usually the large model's scheduler (or engine).
        request: The request; each leg gets a copy with its own id (``<id>.h0`` / ``<id>.h1``), so both may
            run on the same engine.
        predicted_tokens: Predicted length for the schedulers, one number or one per leg.
        slo: The request's SLO (both legs are queued with it).
        accept: Judges an answer (e.g. a quality check); None accepts any answer that finished.
        delay_s: Start ``second`` only if ``first`` has no acceptable answer after this many seconds (0: at once).

    Returns:
        The winner. When no answer is acceptable, the ``second`` leg's answer if it finished, else the first's,
        with ``accepted=False``.

    Raises:
        EngineError: both legs failed (the message carries both errors).
        asyncio.CancelledError: the caller was cancelled; both legs are cancelled first.
    """
    preds = list(predicted_tokens) if isinstance(predicted_tokens, Sequence) else [predicted_tokens] * 2
    if len(preds) != 2:
        raise ValueError(f"predicted_tokens has {len(preds)} values: pass one number or one per leg (2)")
    targets = (first, second)
    legs: dict[int, asyncio.Task[Generation]] = {}
    results: dict[int, Generation] = {}
    errors: dict[int, str] = {}
    cancelled: list[int] = []

    def start(i: int) -> None:
        leg_request = request.model_copy(update={"request_id": f"{request.request_id}.h{i}"})
        legs[i] = asyncio.create_task(_run_leg(targets[i], leg_request, preds[i], slo), name=leg_request.request_id)

    judged: dict[int, bool] = {}

    def acceptable(i: int) -> bool:
        if i not in judged:
            gen = results[i]
            judged[i] = gen.finish_reason not in ("cancelled", "error") and (accept is None or bool(accept(gen)))
        return judged[i]

    async def cancel_rest(winner: int) -> None:
        for i, task in legs.items():
            if i != winner and not task.done():
                task.cancel()
                cancelled.append(i)
        for i in cancelled:
            with contextlib.suppress(BaseException):
                await legs[i]  # the cancellation has reached the engine when this returns
        logger.debug("hedge %s: leg %d won, cancelled %s", request.request_id, winner, cancelled)

    start(0)
    try:
        pending: set[asyncio.Task[Generation]] = set(legs.values())
        if delay_s > 0:
            done, pending = await asyncio.wait(pending, timeout=delay_s)
            if done:
                winner = _collect(legs, done, results, errors)
                if winner is not None and acceptable(winner):
                    return _result(request, results[winner], winner, True, cancelled, errors)
        start(1)
        pending = {t for t in legs.values() if not t.done()}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            _collect(legs, done, results, errors)
            for i in sorted(results):
                if acceptable(i):
                    await cancel_rest(i)
                    return _result(request, results[i], i, True, cancelled, errors)
        for i in (1, 0):
            if i in results:
                return _result(request, results[i], i, False, cancelled, errors)
        raise EngineError(f"hedged request {request.request_id}: both legs failed: {errors}")
    finally:
        for task in legs.values():
            if not task.done():
                task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*legs.values(), return_exceptions=True)


def _collect(
    legs: dict[int, asyncio.Task[Generation]],
    done: set[asyncio.Task[Generation]],
    results: dict[int, Generation],
    errors: dict[int, str],
) -> int | None:
    """Record finished legs; return the index of one that produced a generation, if any."""
    winner = None
    for i, task in legs.items():
        if task not in done or i in results or i in errors:
            continue
        if task.cancelled():
            errors[i] = "cancelled"
            continue
        exc = task.exception()
        if exc is not None:
            errors[i] = f"{type(exc).__name__}: {exc}"
        else:
            results[i] = task.result()
            winner = i if winner is None else winner
    return winner


def _result(
    request: EngineRequest, gen: Generation, winner: int, accepted: bool, cancelled: list[int], errors: dict[int, str]
) -> HedgeResult:
    return HedgeResult(
        generation=gen.model_copy(update={"request_id": request.request_id}),
        winner=winner,
        accepted=accepted,
        cancelled=list(cancelled),
        errors=dict(errors),
    )
