"""asyncio helpers the layers share.

:func:`until_deadline` is the one stream-with-a-deadline loop: the engines put it around every generation and the
framework adapters around every stream a caller gives a timeout. It awaits each item directly under
``asyncio.timeout``; ``asyncio.wait_for`` would, on Python 3.11, return an item that lands just as the consumer is
cancelled and lose the cancellation (CPython gh-86296), and the stream, with its generation, would run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def until_deadline(
    source: AsyncIterator[T], end: float | None, on_timeout: Callable[[], BaseException]
) -> AsyncIterator[T]:
    """Pass ``source``'s items through until ``end`` (``time.monotonic()`` seconds; None: no deadline).

    Raises ``on_timeout()`` once ``end`` passes, before or while waiting for an item. ``source`` is always closed
    (``aclose``), also when the consumer stops early or is cancelled, so whatever it drives is stopped too.
    """
    iterator = source.__aiter__()
    try:
        while True:
            budget = None if end is None else end - time.monotonic()
            if budget is not None and budget <= 0:
                raise on_timeout()
            try:
                async with asyncio.timeout(budget):
                    item = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise on_timeout() from None
            yield item
    finally:
        aclose: Callable[[], object] | None = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()  # type: ignore[misc]
