"""Sync wrappers run coroutines on one background loop, also from inside a running loop (Jupyter)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from echo_middleware._sync import background_loop, iterate_sync, run_sync


async def _where() -> tuple[int, asyncio.AbstractEventLoop]:
    return threading.get_ident(), asyncio.get_running_loop()


def test_run_sync_uses_one_background_loop() -> None:
    (tid1, loop1), (tid2, loop2) = run_sync(_where()), run_sync(_where())
    assert loop1 is loop2 is background_loop()
    assert tid1 == tid2 != threading.get_ident()


async def test_run_sync_works_inside_a_running_loop() -> None:
    # What a notebook cell does: a sync call while an event loop runs in this thread.
    tid, loop = run_sync(_where())
    assert loop is not asyncio.get_running_loop()
    assert tid != threading.get_ident()


def test_run_sync_raises_what_the_coroutine_raises() -> None:
    async def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        run_sync(boom())


def test_iterate_sync_yields_in_order_and_propagates_errors() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            await asyncio.sleep(0)
            yield i
        raise ValueError("after three")

    seen: list[int] = []

    def drain() -> None:
        seen.extend(iterate_sync(numbers()))

    with pytest.raises(ValueError, match="after three"):
        drain()
    assert seen == [0, 1, 2]


def test_closing_the_sync_iterator_cancels_the_async_one() -> None:
    cancelled = threading.Event()

    async def endless() -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                await asyncio.sleep(0.001)
                yield i
                i += 1
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()
            raise

    it = iterate_sync(endless())
    assert next(it) == 0
    it.close()
    assert cancelled.wait(5), "the async generator kept running after the consumer stopped"
