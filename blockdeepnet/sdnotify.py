"""A tiny sd_notify(3) client: how the daemons tell systemd they are ready, alive and stopping (DESIGN §8).

The units in ``systemd/`` are ``Type=notify`` with ``WatchdogSec=``: systemd counts a service as started only
when it sends ``READY=1``, and restarts it when the ``WATCHDOG=1`` pings stop for longer than the watchdog
interval. The protocol is one datagram of newline-separated ``KEY=value`` lines to the AF_UNIX socket named
in ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``), so the standard library is
enough and no libsystemd binding is needed.

Outside systemd (no ``$NOTIFY_SOCKET``, no ``$WATCHDOG_USEC``) every call is a cheap no-op, so the daemons call
these functions unconditionally, and a failure to notify is logged, never raised: a daemon must not die
because its supervisor went away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("bdn.sdnotify")

_SEND_TIMEOUT_S = 1.0  # systemd reads its socket at once; never let a full buffer wedge a daemon's loop


def _address(raw: str) -> str | None:
    """The socket address for ``$NOTIFY_SOCKET``: a filesystem path, or ``@name`` for the abstract namespace
    (a leading NUL byte). Other forms (``vsock:``, from systemd >= 254 in VMs) are not supported."""
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` assignments) to systemd.

    True when the datagram was sent; False when not running under a ``Type=notify`` unit or when sending
    failed (logged at warning level: a service whose READY never arrives will be killed by its start
    timeout, and the log line says why).
    """
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a socket path or abstract name; not notifying systemd", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", raw, exc)
        return False
    return True


def _one_line(text: str) -> str:
    """STATUS= is one line: a newline would start a new (bogus) assignment."""
    return " ".join(text.split())


def ready(status: str = "") -> bool:
    """``READY=1``: start-up is complete (dependent units start now; the watchdog is armed from here)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def stopping() -> bool:
    """``STOPPING=1``: the shutdown is deliberate, not a crash (shown by ``systemctl status``)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """``STATUS=...``: a one-line state shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds that systemd set for this process, or None when there is none.

    systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the main process) for a unit with ``WatchdogSec=``.
    A child that inherited the variables (``$WATCHDOG_PID`` names another process) must not ping in the
    parent's name, so it gets None.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Watchdog:
    """Pings systemd's watchdog (``WATCHDOG=1``) from a program's main loop.

    Call :meth:`kick` on every pass of the loop: it sends at most one ping per half interval (systemd's own
    advice), so a loop that cycles many times a second costs nothing, and a loop that hangs stops the pings
    and gets the service restarted. Long but legitimate work inside the loop (a minute-long partial
    decryption) goes in :meth:`patience`: a helper thread keeps pinging for at most ``budget`` seconds, so a
    slow step is not mistaken for a hang while a step stuck for longer than its budget still is.

    ``interval=None`` (no watchdog configured, e.g. not under systemd): every method is a no-op.
    """

    def __init__(
        self,
        interval: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[[str], bool] = notify,
    ) -> None:
        self.interval = interval if interval is not None and interval > 0 else None
        self._clock = clock
        self._send = send
        self._last: float | None = None
        self._lock = threading.Lock()
        self._grace_until: float | None = None
        self._helper: threading.Thread | None = None

    @classmethod
    def from_env(cls) -> Watchdog:
        """The watchdog systemd configured for this process (a no-op one when there is none)."""
        return cls(watchdog_interval())

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    @property
    def period(self) -> float | None:
        """Seconds between two pings: half the interval, so one late ping does not trip the watchdog."""
        return None if self.interval is None else self.interval / 2

    def due(self) -> bool:
        """True when a ping would be sent now (lets a caller run a costly health check only when needed)."""
        with self._lock:
            return self._due()

    def _due(self) -> bool:
        period = self.period
        if period is None:
            return False
        return self._last is None or self._clock() - self._last >= period

    def kick(self) -> bool:
        """Ping if the last ping is at least half an interval old; True when a ping was sent."""
        with self._lock:
            if not self._due():
                return False
            self._last = self._clock()
        return self._send("WATCHDOG=1")

    @contextlib.contextmanager
    def patience(self, budget: float) -> Iterator[None]:
        """Keep pinging while the block runs, for at most ``budget`` seconds.

        Cheap to enter and leave on every pass of a loop: the helper thread is started only when needed and
        ends by itself once no block has been running for a period.
        """
        if self.interval is None:
            yield
            return
        self.kick()
        with self._lock:
            self._grace_until = self._clock() + budget
            if self._helper is None:
                self._helper = threading.Thread(target=self._keep_pinging, name="sd-watchdog", daemon=True)
                self._helper.start()
        try:
            yield
        finally:
            with self._lock:
                self._grace_until = None
            self.kick()

    def _keep_pinging(self) -> None:
        assert self.interval is not None
        pause = self.interval / 8  # wakes four times a period: a ping is at most a quarter period late
        while True:
            time.sleep(pause)
            with self._lock:
                until = self._grace_until
                if until is None:
                    self._helper = None
                    return
            if self._clock() < until:
                self.kick()
