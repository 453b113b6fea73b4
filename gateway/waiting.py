"""Waiting on an :class:`asyncio.Event` with a time limit, without losing a cancellation.

On Python 3.11, ``asyncio.wait_for(event.wait(), t)`` returns normally when the event is set in the same loop
turn as the waiting task is cancelled: the cancellation is swallowed, and a loop that polls this way keeps
running after shutdown cancelled it (seen as a gateway that never stopped). ``asyncio.timeout`` counts
cancellations and tells its own timeout apart from a real one.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; True if it was set. A cancellation always propagates."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
