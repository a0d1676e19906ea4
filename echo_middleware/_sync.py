"""Run the async core from synchronous code, also inside a running event loop (Jupyter).

One daemon thread owns one event loop for the whole process; sync wrappers submit coroutines to it and wait.
The engines, scheduler and store all live on that loop, so a sync call and an async call share the same state
(one vLLM engine, one queue) instead of each starting their own.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process-wide background event loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="echo-middleware-loop", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for its result (raises what it raises)."""
    loop = background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("run_sync was called from the background loop itself: await the coroutine instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


_DONE = object()


def iterate_sync(agen: AsyncIterator[T]) -> Iterator[T]:
    """Iterate an async iterator from sync code; closing the sync iterator cancels the async one."""
    loop = background_loop()
    items: queue.Queue[Any] = queue.Queue()

    async def pump() -> None:
        try:
            async for item in agen:
                items.put(item)
        except BaseException as exc:  # handed to the consumer, re-raised there
            items.put(exc)
        finally:
            items.put(_DONE)

    future = asyncio.run_coroutine_threadsafe(pump(), loop)
    try:
        while True:
            item = items.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError) and future.cancelled():
                    break
                raise item
            yield item
    finally:
        if not future.done():
            future.cancel()
