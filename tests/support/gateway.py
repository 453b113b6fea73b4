"""Run a real :class:`gateway.service.Gateway` in a background thread, so synchronous tests can drive it."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from blockdeepnet.config import load_gateway_config
from blockdeepnet.fleet import Fleet
from gateway.service import Gateway


class GatewayThread:
    """``with GatewayThread(config) as gt:`` starts the gateway and waits until it serves; ``events`` records
    every gateway event as (name, data)."""

    def __init__(self, config: Path, fleet_file: Path | None = None) -> None:
        self.cfg = load_gateway_config(config)
        self.fleet = Fleet.load(fleet_file or self.cfg.fleet_file)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.gw = Gateway(self.cfg, self.fleet, on_event=self._record)
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)

    def _record(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((name, data))

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def run() -> None:
            self._stop = asyncio.Event()
            await self.gw.run(self._stop)

        try:
            self.loop.run_until_complete(run())
        except BaseException as exc:
            self.error = exc

    def start(self, timeout: float = 60.0) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.gw.ready.is_set():
            if self.error is not None:
                raise self.error
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not come up within {timeout} s: {self.error!r}")
            time.sleep(0.05)
        return self

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [d for n, d in self.events if n == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.named(name)) < count:
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{count} x {name!r} not seen within {timeout} s; events: {self.events[-10:]}"
                )
            time.sleep(0.05)
        return found

    def stop(self, timeout: float = 30.0) -> None:
        if self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"gateway did not stop within {timeout} s; its thread is at:\n{self._stack()}")

    def _stack(self) -> str:
        """Where the gateway's thread hangs (and the loop's pending tasks), for the failure message."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
        tasks = (
            [repr(t.get_coro()) for t in asyncio.all_tasks(self.loop)] if not self.loop.is_closed() else []
        )
        return where + "pending tasks: " + ", ".join(tasks)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
