"""The gateway's embedded amqtt broker on its own event loop in a background thread, for synchronous tests
that drive it with paho clients exactly as they would drive a Mosquitto process."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import TracebackType

from blockdeepnet.acl import AclRules
from gateway.broker import EmbeddedBroker


class EmbeddedBrokerThread:
    """``EmbeddedBroker(host, port, users_file=..., acl=...)`` served from a daemon thread.

    :meth:`start` returns once the broker listens (``.port`` then holds the real port for ``port=0``) and
    re-raises in the caller whatever made it fail (a :class:`gateway.broker.BrokerError`, typically).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        users_file: Path | None = None,
        acl: AclRules | None = None,
        anonymous: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self._broker = EmbeddedBroker(host, port, users_file=users_file, acl=acl, anonymous=anonymous)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with self._broker as broker:
                self.port = broker.port
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 15.0) -> EmbeddedBrokerThread:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="amqtt", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded broker did not start within {timeout:.0f} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"embedded broker did not stop within {timeout:.0f} s")
        self._thread = None

    def __enter__(self) -> EmbeddedBrokerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
