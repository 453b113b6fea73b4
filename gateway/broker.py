"""The gateway's embedded MQTT broker (amqtt 0.12.1), for the demo and small fleets (DESIGN §6).

Production runs Mosquitto (durable, MQTT 5); this broker exists so ``bdn demo`` and a single-box gateway
need no second service. It enforces the same rules as Mosquitto would: clients authenticate against a
password file of argon2 hashes (written by :func:`provisioning.broker_credentials.write_amqtt_password_file`) and the DESIGN §3 topic ACL
(:mod:`blockdeepnet.acl`) decides who may publish and subscribe where.

amqtt facts this module is built around (read from its 0.12.1 source and measured):

* it binds only when started and logs a stack trace when the port is taken, so the port is checked first
  and a taken port is reported in one sentence (:class:`BrokerError`);
* a ``plugins`` dict in the config *replaces* the defaults; with no authentication plugin at all every
  client is refused, so one is always configured;
* ``AnonymousAuthPlugin(allow_anonymous=True)`` marks *every* session anonymous, even one with a username,
  and amqtt neither queues QoS 1 messages for a disconnected anonymous session nor keeps it: a persistent
  gateway session would silently lose updates. So without a password file the default is
  ``allow_anonymous=False``, which accepts any client that names a username (unverified) and keeps sessions;
* ``TopicAccessControlListPlugin`` takes ``acl`` (subscribe) and ``publish_acl``; its strict config refuses
  ``subscribe_acl``, and it warns (DeprecationWarning) about ``acl``, which is silenced here;
* ``FileAuthPlugin`` verifies the argon2 hash synchronously on the event loop at every CONNECT, so the hash
  parameters set how long one connecting device stalls the whole gateway (pwdlib's defaults: ~110 ms and
  64 MiB; the OWASP minimum used here: ~28 ms and 19 MiB, measured on 2 x86 cores).
"""

from __future__ import annotations

import errno
import logging
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from blockdeepnet.acl import AclRules, amqtt_acl
from blockdeepnet.ports import free_port, port_in_use
from blockdeepnet.private_files import write_private_atomic

log = logging.getLogger(__name__)

_NOISY_LOGGERS = ("amqtt", "transitions")


class BrokerError(Exception):
    """The embedded broker cannot start (port taken, bad address, missing users file); the message says why
    and what to change."""


# --------------------------------------------------------------------------------------------------- ports


class _SnapshotSubscriptions(dict):  # type: ignore[type-arg]
    """amqtt 0.12.1's subscription table, iterated over snapshots.

    amqtt iterates ``Broker._subscriptions`` (filter -> [(session, qos)]) with ``await`` inside the loop (when
    a client connects, and in every per-message broadcast) while other coroutines add and remove
    subscriptions. With several clients connecting at once that raises "dictionary changed size during
    iteration": the connecting client is dropped, or a broadcast task dies and the message never reaches the
    remaining subscribers (measured here with 10 agents). Iterating a copy, taken at the start of each loop,
    is the standard fix; the broker version is pinned, so this reaches into one private attribute only.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, list[tuple[Any, int]]]]:  # type: ignore[override]
        return [(k, list(v)) for k, v in super().items()]


def _check_bindable(host: str, port: int) -> None:
    """Raise :class:`BrokerError` saying what to change unless the broker can listen on ``host:port``."""
    try:
        taken = port_in_use(host, port)
    except socket.gaierror as exc:
        raise BrokerError(f"broker host {host!r} does not resolve: {exc.strerror}") from exc
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise BrokerError(
                f"not allowed to listen on port {port} on {host} (ports below 1024 need privileges): "
                "set broker.port in gateway.toml to 1024 or above, or 0"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BrokerError(
                f"{host} is not an address of this machine: set broker.host in gateway.toml"
            ) from None
        raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    if taken:
        raise BrokerError(
            f"port {port} on {host} is already in use (another MQTT broker?): "
            "set broker.port in gateway.toml to a free port or 0"
        )


# -------------------------------------------------------------------------------------------------- broker


def _quiet_amqtt_loggers() -> None:
    """amqtt logs every connection and state transition at INFO; keep WARNING unless someone chose a level."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt on ``host:port`` inside the gateway's event loop, as an async context manager.

    ``port = 0`` lets the OS pick a port; :attr:`port` tells which once started. With ``users_file`` only
    clients with a valid username and password get in; without it any client that names a username is
    accepted unverified (loopback demos only) and, with ``anonymous=True``, clients without one too (amqtt
    then keeps no offline messages for anyone: see the module notes). With ``acl`` the DESIGN §3 rules are
    enforced by username; without a password file that only binds honest clients.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        users_file: Path | None,
        acl: AclRules | None,
        anonymous: bool = False,
    ) -> None:
        if type(port) is not int or not 0 <= port <= 65535:
            raise BrokerError(f"broker port must be 0..65535, got {port!r}")
        if ":" in host:
            raise BrokerError(
                f"broker host {host!r}: amqtt 0.12.1 cannot bind IPv6 literals; use an IPv4 address or a name"
            )
        if users_file is not None and anonymous:
            raise BrokerError("anonymous clients and a users file exclude each other: choose one")
        self._host = host
        self._port = port
        self._users_file = users_file
        self._acl = acl
        self._anonymous = anonymous
        self._broker: Any = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listening port: the configured one, or the OS's choice for 0 once started."""
        return self._port

    @property
    def running(self) -> bool:
        return self._broker is not None

    def amqtt_config(self) -> dict[str, Any]:
        """The amqtt 0.12 config dict: one TCP listener and an explicit plugin set (no $SYS, no event
        logging; the ``plugins`` dict replaces amqtt's defaults)."""
        plugins: dict[str, Any] = {}
        if self._users_file is not None:
            plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {"password_file": str(self._users_file)}
        else:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": self._anonymous}
        if self._acl is not None:
            subscribe, publish = amqtt_acl(self._acl)
            plugins["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"] = {
                "acl": subscribe,
                "publish_acl": publish,
            }
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self._host}:{self._port}"}},
            "plugins": plugins,
        }

    async def start(self) -> EmbeddedBroker:
        """Bind and serve; raises :class:`BrokerError` with a one-line reason instead of amqtt's traceback."""
        if self._broker is not None:
            raise BrokerError("the embedded broker is already running")
        from amqtt.broker import Broker  # the gateway extra; the module stays importable without it

        if self._users_file is not None and not Path(self._users_file).is_file():
            raise BrokerError(
                f"broker users file {self._users_file} does not exist: create it with "
                "`bdn provision` or unset broker.users_file"
            )
        if self._port != 0:
            _check_bindable(self._host, self._port)
        _quiet_amqtt_loggers()
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="The 'acl' option is deprecated", category=DeprecationWarning
            )
            try:
                broker = Broker(self.amqtt_config())
            except Exception as exc:
                raise BrokerError(f"embedded broker misconfigured: {type(exc).__name__}: {exc}") from exc
        broker._subscriptions = _SnapshotSubscriptions(broker._subscriptions)
        try:
            await broker.start()
        except Exception as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                raise BrokerError(
                    f"port {self._port} on {self._host} is already in use (another MQTT broker?): "
                    "set broker.port in gateway.toml to a free port or 0"
                ) from None
            raise BrokerError(f"embedded broker failed to start on {self._host}:{self._port}: {exc}") from exc
        self._broker = broker
        self._port = self._bound_port(broker)
        log.info("embedded MQTT broker listening on %s:%d", self._host, self._port)
        return self

    def _bound_port(self, broker: Any) -> int:
        # amqtt keeps its asyncio.Server per listener in the private ``_servers`` (pinned to 0.12.1).
        server = getattr(broker, "_servers", {}).get("default")
        sockets = getattr(getattr(server, "instance", None), "sockets", None)
        if not sockets:
            return self._port
        return int(sockets[0].getsockname()[1])

    def allow(self, username: str, password: str, rules: AclRules) -> None:
        """Let a newly enrolled device in while running: its password (in memory and in the users file, so a
        restart keeps it) and the ACL rebuilt for the new fleet.

        amqtt 0.12.1 reads both only at start; its plugins keep them in ``FileAuthPlugin._users`` and in the
        ACL plugin's config tables, which are updated in place here (pinned version, checked by the tests).
        """
        broker = self._broker
        if broker is None:
            raise BrokerError("the embedded broker is not running")
        subscribe, publish = amqtt_acl(rules)
        hashed = None
        if self._users_file is not None:
            from pwdlib.hashers.argon2 import Argon2Hasher

            hashed = Argon2Hasher(time_cost=2, memory_cost=19456, parallelism=1).hash(password)
            path = Path(self._users_file)
            kept = [ln for ln in path.read_text().splitlines() if ln and ln.split(":", 1)[0] != username]
            write_private_atomic(path, "".join(f"{ln}\n" for ln in [*kept, f"{username}:{hashed}"]))
        for plugin in broker.plugins_manager._plugins:
            users = getattr(plugin, "_users", None)
            if hashed is not None and isinstance(users, dict):
                users[username] = hashed
            if self._acl is not None and type(plugin).__name__ == "TopicAccessControlListPlugin":
                for option, table in (("acl", subscribe), ("publish-acl", publish)):
                    current = plugin._get_config_option(option, None)
                    if not isinstance(current, dict):
                        raise BrokerError(
                            f"amqtt's ACL plugin keeps no {option} table: is amqtt 0.12.1 installed?"
                        )
                    current.clear()
                    current.update(table)
        self._acl = rules

    async def stop(self) -> None:
        """Disconnect every client and close the listener; safe to call twice."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


__all__ = ["BrokerError", "EmbeddedBroker", "free_port", "port_in_use"]
