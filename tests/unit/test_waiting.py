"""gateway.waiting.wait_event: a time-limited wait that never swallows a cancellation (asyncio.wait_for on
Python 3.11 does when the event is set in the same loop turn, which left a gateway loop running after stop)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.waiting import wait_event


def test_true_when_set_and_false_on_timeout() -> None:
    async def main() -> tuple[bool, bool]:
        ev = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, ev.set)
        got = await wait_event(ev, 5.0)
        return got, await wait_event(asyncio.Event(), 0.01)

    assert asyncio.run(main()) == (True, False)


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_a_cancellation_arriving_with_the_event_is_not_swallowed(turns: int) -> None:
    async def main() -> None:
        ev = asyncio.Event()
        waiter = asyncio.create_task(wait_event(ev, 10.0))
        for _ in range(turns + 1):
            await asyncio.sleep(0)
        ev.set()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
