"""Device-side MQTT clients for reliability tests: what a real device does on the wire, without the training.

:class:`Device` is one device's connection as the agent makes it (DESIGN §3, docs/protocol.md): a persistent
session (``clean_session=False``, a fixed client id) that paho reconnects by itself, QoS 1 publishes that paho
queues while disconnected and sends (again) after reconnecting, optionally the last will (retained
``DeviceState("offline")`` on ``dev/<addr>/state``) with a retained ``online`` after every connect, and a
subscription to its own receipt topic whose receipts are decoded and kept.

:func:`spawn_device_process` runs such a device in a child process (``python -m tests.support.devices``), so a
test can SIGKILL it: the TCP connection ends without an MQTT DISCONNECT and the broker publishes the will.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from blockdeepnet.wire import DeviceState, Receipt, Topics

REPO = Path(__file__).resolve().parents[2]


class Device:
    def __init__(
        self,
        host: str,
        port: int,
        topics: Topics,
        address: str,
        *,
        client_id: str | None = None,
        lwt: bool = False,
        keepalive: int = 10,
    ) -> None:
        self.host = host
        self.port = port
        self.topics = topics
        self.address = address
        self.lwt = lwt
        self.keepalive = keepalive
        self.client_id = client_id or f"dev-{address[2:14].lower()}-{uuid.uuid4().hex[:6]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.reconnect_delay_set(0.1, 1)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(20)
        if lwt:
            self.client.will_set(topics.state(address), DeviceState("offline").to_cbor(), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._lock = threading.Condition()
        self._receipts: list[Receipt] = []
        self._raw: list[bytes] = []
        self.connects = 0
        self.connected = threading.Event()

    # --- paho thread ------------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe(self.topics.receipt(self.address), 1)
        if self.lwt:
            client.publish(self.topics.state(self.address), DeviceState("online").to_cbor(), 1, retain=True)
        with self._lock:
            self.connects += 1
            self._lock.notify_all()
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.connected.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            receipt = Receipt.from_cbor(payload)
        except ValueError:
            return
        with self._lock:
            self._raw.append(payload)
            self._receipts.append(receipt)
            self._lock.notify_all()

    # --- test side --------------------------------------------------------------------------------------

    def connect(self, timeout: float = 15.0) -> Device:
        self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(
                f"device {self.address} not connected to {self.host}:{self.port} in {timeout} s"
            )
        return self

    def wait_connected(self, connects: int, timeout: float = 30.0) -> None:
        """Until the client has connected ``connects`` times in all (i.e. reconnected after an outage)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.connects < connects:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"device {self.address}: {self.connects} connect(s), wanted {connects}"
                    )
                self._lock.wait(left)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Queue a publish (sent now, or after the next reconnect); the returned info tells when PUBACKed."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publish on {topic} refused by paho: {mqtt.error_string(info.rc)}")
        return info

    @staticmethod
    def wait_published(info: mqtt.MQTTMessageInfo, timeout: float = 30.0) -> None:
        """Until the broker PUBACKed ``info``'s message (paho's wait_for_publish refuses one queued offline)."""
        deadline = time.monotonic() + timeout
        # is_published() raises for a message queued offline (its rc stays MQTT_ERR_NO_CONN even once paho has
        # sent it after reconnecting); the flag it guards is set on the PUBACK all the same.
        while not info._published:
            if time.monotonic() > deadline:
                raise TimeoutError(f"message {info.mid} not PUBACKed within {timeout} s")
            time.sleep(0.01)

    def publish_update(self, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.publish(self.topics.update(self.address), payload)

    def receipts(self) -> list[Receipt]:
        with self._lock:
            return list(self._receipts)

    def wait_receipt(self, match: Callable[[Receipt], bool], timeout: float = 60.0) -> Receipt:
        """The first receipt (already received or coming) for which ``match`` is true."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for r in self._receipts:
                    if match(r):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"device {self.address}: no matching receipt within {timeout} s; got "
                        f"{[(r.accepted, r.reason, r.detail[:60]) for r in self._receipts]}"
                    )
                self._lock.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def accepted(r: Receipt) -> bool:
    return r.accepted and r.tx_hash is not None


# --- a device in a child process, to be SIGKILLed ----------------------------------------------------------


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn_device_process(
    host: str, port: int, fleet: str, address: str, *, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """A child process holding one device connection with its last will set and ``online`` published
    (retained, PUBACKed) before this returns. SIGKILL it to make the broker fire the will."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.devices", host, str(port), fleet, address],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout is not None
    ready: list[bytes] = []
    reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not ready or ready[0].strip() != b"ready":
        proc.kill()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"device process for {address} did not come up: {ready!r} {err}")
    return proc


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="one device connection with a last will, until killed")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("fleet")
    parser.add_argument("address")
    args = parser.parse_args(argv)
    dev = Device(args.host, args.port, Topics(args.fleet), args.address, lwt=True).connect()
    # The retained "online" from _on_connect is queued before this one; waiting for this PUBACK means both
    # reached the broker in order.
    dev.publish(
        Topics(args.fleet).state(args.address), DeviceState("online").to_cbor(), retain=True
    ).wait_for_publish(10)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _child(sys.argv[1:])
