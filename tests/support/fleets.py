"""Small fleets for the integration tests: t = 1 of l = 2 with one 512-bit key dealt once per test session
(dealing is the slow part), and a fresh fleet name each time, so tests sharing the machine's brokers and
databases never see each other's topics."""

from __future__ import annotations

import functools
import secrets
from pathlib import Path
from typing import Any

from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey, deal
from provisioning.localfleet import LocalFleet, create_local_fleet
from tests.support.mqtt import MqttTestClient


@functools.cache
def small_key() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(1, 2, 512, allow_insecure=True)


def small_fleet(tmp_path: Path, prefix: str, *, devices: int = 3, **kwargs: Any) -> LocalFleet:
    """A fleet in ``tmp_path/fleet`` named ``<prefix><6 hex digits>``, t = 1 of l = 2 on :func:`small_key`;
    ``kwargs`` go to :func:`create_local_fleet` as they are."""
    return create_local_fleet(
        tmp_path / "fleet",
        name=f"{prefix}{secrets.token_hex(3)}",
        devices=devices,
        threshold=1,
        holders=2,
        dealt=small_key(),
        **kwargs,
    )


def device_client(local: LocalFleet, k: int, port: int) -> MqttTestClient:
    """Device ``k`` of ``local`` connected to the broker on ``port`` with its own credentials (the ACL's view)."""
    d = local.devices[k]
    return MqttTestClient(
        "127.0.0.1", port, username=d.address, password=local.passwords[d.address]
    ).connect()
