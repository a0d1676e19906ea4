"""A recording stand-in for EchoPipeline, for unit tests of the framework adapters' own logic.

It answers ``echo: <last user message>`` (or a scripted answer), word by word when streamed, and records every
request, so a test can check what an adapter sent (tenant, SLO, offload, sampling, tools) and how it mapped the
answer back (metadata, usage, callbacks). The real pipeline runs in tests/integration.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from echo_middleware.config import EchoSettings
from echo_middleware.types import Decision, EchoChunk, EchoRequest, EchoResult, ExampleUse, Usage


class FakePipeline:
    def __init__(self, answer: str | None = None, delay: float = 0.0) -> None:
        self.settings = EchoSettings()
        self.answer = answer
        self.delay = delay
        self.requests: list[EchoRequest] = []
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.starts = 0
        self.closed = False
        self.cancelled = 0

    async def start(self) -> None:
        self.starts += 1

    async def close(self) -> None:
        self.closed = True

    def _text(self, request: EchoRequest) -> str:
        if self.answer is not None:
            return self.answer
        return "echo: " + request.messages[-1].content

    def _decision(self, request: EchoRequest) -> Decision:
        offloaded = request.offload == "always" or (request.offload == "auto" and not request.requires_large)
        return Decision(
            request_id=request.request_id,
            offloaded=offloaded,
            reason="fake",
            mode=request.offload,
            examples=[ExampleUse(id="ex1", distance=0.05, utility=0.9)] if offloaded else [],
            engine="small" if offloaded else "large",
            model="tiny" if offloaded else "big",
        )

    async def agenerate(self, request: EchoRequest) -> EchoResult:
        self.requests.append(request)
        self.loops.append(asyncio.get_running_loop())
        await asyncio.sleep(self.delay)
        text = self._text(request)
        return EchoResult(
            request_id=request.request_id,
            text=text,
            usage=Usage(prompt_tokens=7, completion_tokens=len(text.split())),
            decision=self._decision(request),
        )

    async def astream(self, request: EchoRequest) -> AsyncIterator[EchoChunk]:
        self.requests.append(request)
        self.loops.append(asyncio.get_running_loop())
        words = re.findall(r"\S+\s*", self._text(request))
        try:
            for word in words:
                await asyncio.sleep(self.delay)
                yield EchoChunk(request_id=request.request_id, text=word)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield EchoChunk(
            request_id=request.request_id,
            finish_reason="stop",
            usage=Usage(prompt_tokens=7, completion_tokens=len(words)),
            decision=self._decision(request),
        )

    async def abatch(self, requests: list[EchoRequest]) -> list[EchoResult]:
        return list(await asyncio.gather(*(self.agenerate(r) for r in requests)))

    def __repr__(self) -> str:
        return "FakePipeline()"
