"""Helpers shared by the streaming endpoints: SSE framing and merging request streams.

Rule: a stream is an async generator of `data: {json}\n\n` lines that ends with
`data: [DONE]`; closing or cancelling it (client gone) closes every request iterator it
drives, which aborts those requests in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

_DONE = object()


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def last_output(iterator: AsyncIterator) -> Any:
    """The last item of a request's outputs (its finished RequestOutput)."""
    last = None
    async with contextlib.aclosing(iterator) as it:
        async for item in it:
            last = item
    if last is None:
        raise RuntimeError("The request ended without a final output.")
    return last


async def merge_async_iterators(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several iterators as (index, item), in arrival order."""
    if len(iterators) == 1:
        async with contextlib.aclosing(iterators[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(index: int, iterator: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(iterator) as it:
                async for item in it:
                    queue.put_nowait((index, item))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, _DONE))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
