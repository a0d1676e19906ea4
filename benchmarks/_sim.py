"""Discrete-event simulation for scheduler benchmarks: a virtual-time event loop and a continuous-batching engine.

The scheduler under test is the real :class:`echo_middleware.schedule.Scheduler`, unchanged; only the engine
behind it and the clock are simulated:

- :class:`VirtualTimeLoop` is an asyncio event loop whose clock jumps to the next timer instead of sleeping, so
  ``asyncio.sleep(30)`` costs no wall time and hours of traffic replay in seconds, deterministically.
- :class:`SimulatedEngine` is an :class:`~echo_middleware.engines.base.Engine` that batches like vLLM: every
  step, each running sequence gains one token; a step of ``b`` sequences takes ``step_s(b)``, and a sequence
  joining the batch adds its prefill (``prefill_s_per_token * prompt_tokens``) to that step. Output lengths are
  the requests' true lengths, known to the engine only (the scheduler sees predictions).
"""

from __future__ import annotations

import asyncio
import selectors
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from echo_middleware.engines.base import Engine
from echo_middleware.types import EngineLoad, EngineRequest, FeatureStatus, StreamDelta, Usage


class _VirtualSelector:
    """Wraps the loop's selector: a wait with a timeout advances virtual time instead of blocking."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # nothing scheduled: only real I/O (a thread finishing) can wake us
            return self._inner.select(None)
        events = self._inner.select(0)
        if not events and timeout > 0:
            self._loop.advance(timeout)
        return events

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: ``loop.time()`` starts at 0 and jumps to the next due timer."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _VirtualSelector(self._selector, self)  # type: ignore[assignment, has-type]

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


@dataclass(eq=False)
class _Seq:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    out: asyncio.Queue[StreamDelta] = field(default_factory=asyncio.Queue)
    done: int = 0


class SimulatedEngine(Engine):
    """A continuous-batching engine with calibrated step times (see the module docstring)."""

    kind = "simulated"

    def __init__(
        self,
        *,
        step_s: Callable[[int], float],
        prefill_s_per_token: float,
        lengths: dict[str, tuple[int, int]],
        max_batch: int,
    ) -> None:
        super().__init__("simulated", "simulated", max_concurrency=max_batch)
        self.step_s = step_s
        self.prefill_s_per_token = prefill_s_per_token
        self.lengths = lengths
        self.max_batch = max_batch
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._wake = asyncio.Event()
        self._stepper: asyncio.Task[None] | None = None
        self.steps = 0

    async def _start(self) -> None:
        self._features = {
            "batching": FeatureStatus(requested=True, enabled=True, detail=f"simulated, {self.max_batch} sequences"),
            "speculative_ngram": FeatureStatus(requested=False, enabled=False, detail="not simulated"),
        }
        self._stepper = asyncio.create_task(self._run())

    def load(self) -> EngineLoad:
        """The base class measures decode speed on the wall clock, which virtual time leaves near zero; report the
        modelled per-sequence speed of a full batch instead (what the scheduler uses for latency deadlines)."""
        return super().load().model_copy(update={"tokens_per_s": 1.0 / self.step_s(self.max_batch)})

    async def _close(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        prompt, output = self.lengths[request.request_id]
        seq = _Seq(request.request_id, prompt, max(1, min(output, request.params.max_tokens)))
        self._waiting.append(seq)
        self._wake.set()
        while True:
            delta = await seq.out.get()
            yield delta
            if delta.finish_reason is not None:
                return

    async def _abort(self, request_id: str) -> None:
        self._waiting = deque(s for s in self._waiting if s.request_id != request_id)
        self._active = [s for s in self._active if s.request_id != request_id]

    async def _run(self) -> None:
        while True:
            if not self._active and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            joined = []
            while self._waiting and len(self._active) < self.max_batch:
                seq = self._waiting.popleft()
                self._active.append(seq)
                joined.append(seq)
            dt = self.step_s(len(self._active)) + self.prefill_s_per_token * sum(s.prompt_tokens for s in joined)
            await asyncio.sleep(dt)
            self.steps += 1
            still = []
            for seq in self._active:
                seq.done += 1
                if seq.done == 1:
                    seq.out.put_nowait(StreamDelta(request_id=seq.request_id, text="x"))
                if seq.done >= seq.output_tokens:
                    usage = Usage(prompt_tokens=seq.prompt_tokens, completion_tokens=seq.output_tokens)
                    seq.out.put_nowait(StreamDelta(request_id=seq.request_id, finish_reason="stop", usage=usage))
                else:
                    still.append(seq)
            self._active = still
