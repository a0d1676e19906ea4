"""Learning from every answer: new examples, shadow checks of offloads, probes of large answers, replay.

Four things keep the in-context cache useful and its quality estimates honest:

1. **Large answers become examples.** Each answer of the large model is stored (``store.add``, awaited before the
   request returns: durable when acknowledged) with its quality signals: the model, whether it finished or hit
   ``max_tokens``, token counts, the hash of the system prompt it was answered under.
2. **Shadow checks.** A sample (``learn.shadow_rate``) of offloaded requests is queued in the store's durable
   replay queue, most uncertain first (value ``1 - predicted quality``). When the large engine is idle, it answers
   them at the lowest priority; the agreement of the small answer with the large one is the measured quality of
   that offload. It recalibrates the router, updates the ranker, and is recorded on every example that was in
   the prompt (``record_use``): examples that mislead collect low utilities and sink in the ranking and in the
   store's eviction value. The large answer becomes an example too.
3. **Probes.** A sample (``learn.probe_rate``) of requests the large model answered while usable examples
   existed is tried on the small model with those examples when the small engine is idle. These outcomes cover
   the requests the router did *not* offload, which shadow checks never see, so the calibration is not biased
   towards the offloaded side.
4. **Replay.** Replay items without a pending shadow check (pushed by another worker, or left from before a
   restart) are re-answered by the large model when it is idle and stored as examples: cost-aware replay in the
   sense of IC-Cache, where the queue's value orders what idle time is spent on.

All background work runs at the lowest engine priority, only when the engine it needs has nothing else in flight,
and is bounded (``learn.max_pending``); a failure in it is logged and never reaches a user's request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echo_middleware.config import LearnConfig
from echo_middleware.engines.base import Engine
from echo_middleware.learn.quality import agreement
from echo_middleware.rank.base import Ranker
from echo_middleware.rank.features import CONTEXT_KEY, context_hash, request_text
from echo_middleware.rank.prompt import assemble_prompt
from echo_middleware.route.policy import OffloadPolicy
from echo_middleware.types import Candidate, EchoRequest, EngineRequest, Example, Generation, Message, SamplingParams

logger = logging.getLogger(__name__)

BACKGROUND_PRIORITY = 1_000_000
"""Engine priority of background work: after every user request (lower is served first)."""


@dataclass
class PendingCheck:
    """What is needed to judge an offloaded answer once the large model has answered the same request."""

    tenant: str
    request: EchoRequest
    small_answer: str
    predicted: float | None
    example_ids: list[str]
    rows: np.ndarray | None
    queued_at: float = field(default_factory=time.time)


@dataclass
class ProbeJob:
    """A large answer to try on the small model with the examples the router had."""

    tenant: str
    request: EchoRequest
    large_answer: str
    examples: list[Candidate]
    predicted: float | None
    rows: np.ndarray | None


@dataclass
class LearnStats:
    """Counters of background learning, for tests, logs and benchmarks."""

    stored: int = 0
    store_failures: int = 0
    shadow_queued: int = 0
    shadow_checked: int = 0
    probes_queued: int = 0
    probes_done: int = 0
    replayed: int = 0
    dropped: int = 0
    errors: int = 0
    agreements: list[float] = field(default_factory=list)


def example_from_answer(tenant: str, request: EchoRequest, generation: Generation, *, source: str = "large") -> Example:
    """The example a large-model answer becomes, with its quality signals in the fields and metadata.

    ``quality`` is 1.0 for an answer that finished (the large model's answer is the reference the small model is
    judged against) and 0.5 for one cut at ``max_tokens`` (a truncated demonstration teaches truncation).
    """
    finished = generation.finish_reason == "stop"
    return Example(
        tenant=tenant,
        request=request_text(request.messages),
        messages=list(request.messages),
        response=generation.text,
        model=generation.model,
        prompt_tokens=generation.usage.prompt_tokens,
        response_tokens=generation.usage.completion_tokens,
        quality=1.0 if finished else 0.5,
        metadata={
            CONTEXT_KEY: context_hash(request.messages),
            "source": source,
            "engine": generation.engine,
            "finish_reason": generation.finish_reason,
            "request_id": request.request_id,
        },
    )


class Learner:
    """Stores answers and runs shadow checks, probes and replay in the background for one pipeline.

    Args:
        config: Learn settings.
        store: The example store (``add``, ``record_use``, ``push_replay``, ``pop_replay``).
        large: The large engine (answers shadow checks and replays).
        small: The small engine (answers probes).
        ranker: Updated with measured outcomes.
        policy: Recalibrated with measured outcomes.
        max_tokens_cap: Most tokens a background generation may use.
        seed: Seed of the sampling of shadow checks and probes (None: random).
        large_busy: Extra "large engine busy" signal (the pipeline's own count of requests it routes there).
    """

    def __init__(
        self,
        config: LearnConfig,
        *,
        store: Any,
        large: Engine,
        small: Engine | None,
        ranker: Ranker,
        policy: OffloadPolicy,
        max_tokens_cap: int = 512,
        seed: int | None = None,
        large_busy: Callable[[], bool] | None = None,
        small_busy: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.large = large
        self.small = small
        self.ranker = ranker
        self.policy = policy
        self.max_tokens_cap = max_tokens_cap
        self.stats = LearnStats()
        self._rng = random.Random(seed)  # noqa: S311  (sampling, not security)
        self._pending: dict[tuple[str, str], PendingCheck] = {}
        self._probes: deque[ProbeJob] = deque()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._large_busy = large_busy or (lambda: False)
        self._small_busy = small_busy or (lambda: False)
        self._closing = False
        self._busy = False

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the background loop (on the running event loop)."""
        if self._task is None or self._task.done():
            self._closing = False
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="echo-learner")

    async def close(self) -> None:
        """Stop the background loop; queued shadow checks stay in the store's replay queue."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._probes.clear()

    def wake(self) -> None:
        """Look for idle engines now instead of at the next poll."""
        self._wake.set()

    async def drain(self, timeout_s: float = 600.0) -> bool:
        """Wait until every queued shadow check and probe is done (engines must go idle for that).

        Returns:
            True when nothing is pending any more, False when ``timeout_s`` passed first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._pending or self._probes or self._busy:
            if loop.time() >= deadline or self._task is None or self._task.done():
                return False
            self.wake()
            await asyncio.sleep(0.02)
        return True

    def pending_checks(self) -> int:
        """Shadow checks waiting for the large engine to be idle."""
        return len(self._pending)

    def pending_probes(self) -> int:
        """Probes waiting for the small engine to be idle."""
        return len(self._probes)

    # ------------------------------------------------------------------------------- foreground

    async def store_answer(self, tenant: str, request: EchoRequest, generation: Generation) -> list[str]:
        """Store a large answer as an example (durable when this returns); returns its id(s).

        Raises:
            Exception: what the store raised; the pipeline reports it in the decision and does not fail.
        """
        if not self.config.store_large_answers or not generation.text.strip():
            return []
        if generation.finish_reason not in ("stop", "length"):
            return []
        example = example_from_answer(tenant, request, generation)
        ids: list[str] = await self.store.add([example])
        self.stats.stored += 1
        return ids

    async def after_offload(
        self,
        tenant: str,
        request: EchoRequest,
        small_answer: str,
        used: Sequence[Candidate],
        predicted: float | None,
        rows: np.ndarray | None,
    ) -> bool:
        """Count the use of the examples, and maybe queue a shadow check; returns whether one was queued."""
        if used:
            await self.store.record_use(tenant, {c.example.id: None for c in used}, None)
        if not self._sample(self.config.shadow_rate) or not self.config.replay_when_idle:
            return False
        if len(self._pending) >= self.config.max_pending:
            self.stats.dropped += 1
            return False
        text = request_text(request.messages)
        value = 1.0 - (predicted if predicted is not None else 0.5) + 1e-3
        await self.store.push_replay(tenant, text, list(request.messages), value)
        self._pending[(tenant, text)] = PendingCheck(
            tenant=tenant,
            request=request,
            small_answer=small_answer,
            predicted=predicted,
            example_ids=[c.example.id for c in used],
            rows=rows,
        )
        self.stats.shadow_queued += 1
        self.wake()
        return True

    def after_large(
        self,
        tenant: str,
        request: EchoRequest,
        large_answer: str,
        selected: Sequence[Candidate],
        predicted: float | None,
        rows: np.ndarray | None,
    ) -> bool:
        """Maybe queue a probe of the small model on a request the large model answered; returns whether queued."""
        if not selected or self.small is None or not large_answer.strip():
            return False
        if not self._sample(self.config.probe_rate):
            return False
        if len(self._probes) >= self.config.max_pending:
            self.stats.dropped += 1
            return False
        self._probes.append(ProbeJob(tenant, request, large_answer, list(selected), predicted, rows))
        self.stats.probes_queued += 1
        self.wake()
        return True

    def _sample(self, rate: float) -> bool:
        return rate > 0 and (rate >= 1 or self._rng.random() < rate)

    # ------------------------------------------------------------------------------- background

    async def _run(self) -> None:
        while not self._closing:
            try:
                did = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # background learning must never take the pipeline down
                self.stats.errors += 1
                logger.exception("background learning step failed")
                did = False
            if not did:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.config.idle_poll_s)

    def _idle(self, engine: Engine | None, busy: Callable[[], bool]) -> bool:
        if engine is None or busy():
            return False
        load = engine.load()
        return load.waiting + load.running == 0

    async def step(self) -> bool:
        """Do one unit of background work if an engine is idle; returns whether anything was done."""
        if self.config.replay_when_idle and self._idle(self.large, self._large_busy):
            self._busy = True
            try:
                items = await self.store.pop_replay(1)
                if items:
                    await self._replay(items[0])
                    return True
            finally:
                self._busy = False
        if self._probes and self._idle(self.small, self._small_busy):
            self._busy = True
            try:
                await self._probe(self._probes.popleft())
            finally:
                self._busy = False
            return True
        return False

    async def _generate(self, engine: Engine, messages: Sequence[Message], params: SamplingParams) -> Generation:
        capped = params.model_copy(update={"max_tokens": min(params.max_tokens, self.max_tokens_cap)})
        return await engine.generate(
            EngineRequest(messages=list(messages), params=capped, priority=BACKGROUND_PRIORITY)
        )

    async def _replay(self, item: Any) -> None:
        pending = self._pending.pop((item.tenant, item.request), None)
        if pending is not None:
            request = pending.request
        else:
            messages = list(item.messages) or [Message(role="user", content=item.request)]
            request = EchoRequest(messages=messages, tenant=item.tenant)
        generation = await self._generate(self.large, request.messages, request.params)
        await self.store_answer(item.tenant, request, generation)
        if pending is None:
            self.stats.replayed += 1
            return
        question = request_text(request.messages)
        measured = agreement(pending.small_answer, generation.text, question=question)
        self._record(measured)
        if pending.predicted is not None:
            self.policy.observe(pending.predicted, measured)
        if pending.rows is not None and len(pending.rows):
            self.ranker.observe(pending.rows, [measured] * len(pending.rows))
        if pending.example_ids:
            success = measured >= self.config.success_agreement
            await self.store.record_use(item.tenant, dict.fromkeys(pending.example_ids, measured), success)
        self.stats.shadow_checked += 1
        logger.debug(
            "shadow check of %s: agreement %.2f (predicted %s)", request.request_id, measured, pending.predicted
        )

    async def _probe(self, job: ProbeJob) -> None:
        assert self.small is not None  # noqa: S101  (probes are only queued with a small engine)
        params = job.request.params
        prompt = await assemble_prompt(job.request.messages, job.examples, self.small, params.max_tokens)
        generation = await self._generate(self.small, prompt.messages, params)
        question = request_text(job.request.messages)
        measured = agreement(generation.text, job.large_answer, question=question)
        self._record(measured)
        if job.predicted is not None:
            self.policy.observe(job.predicted, measured)
        used_ids = {c.example.id for c in prompt.used}
        if job.rows is not None and len(job.rows):
            keep = [i for i, c in enumerate(job.examples) if c.example.id in used_ids and i < len(job.rows)]
            if keep:
                self.ranker.observe(job.rows[keep], [measured] * len(keep))
        if used_ids:
            await self.store.record_use(job.tenant, dict.fromkeys(used_ids, measured), None)
        self.stats.probes_done += 1

    def _record(self, measured: float) -> None:
        self.stats.agreements.append(measured)
        if len(self.stats.agreements) > 10_000:
            del self.stats.agreements[:5_000]


__all__ = ["BACKGROUND_PRIORITY", "LearnStats", "Learner", "PendingCheck", "ProbeJob", "example_from_answer"]
