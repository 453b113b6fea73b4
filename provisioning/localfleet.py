"""A complete fleet in one folder, for the demo, benchmarks and tests: keys, ``fleet.json`` and configs.

Layout (secrets mode 0600, folders 0700)::

    <root>/fleet.json                     public: key, layout, chain, devices
    <root>/gateway/gateway.key            the gateway's Ethereum key
    <root>/gateway/gateway.toml
    <root>/gateway/broker.password        the gateway's MQTT password (external broker with auth)
    <root>/devices/<name>/device.key      each device's secp256k1 key
    <root>/devices/<name>/share.json      key holders only: the device's threshold key share
    <root>/devices/<name>/broker.password
    <root>/devices/<name>/agent.toml

The threshold key is dealt here and the dealer's secret is gone when :func:`deal` returns. ``bdn provision
init`` (the operator's tool) builds on the same pieces; this module is the one-machine shortcut.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account

from blockdeepnet.acl import AclRules, mosquitto_acl
from blockdeepnet.config import toml_text
from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey, deal
from blockdeepnet.data import PAPER_SAMPLES_PER_DEVICE
from blockdeepnet.eip712 import new_device_key
from blockdeepnet.fleet import ChainInfo, DeviceEntry, Fleet, contract_address
from blockdeepnet.ledger import EMBEDDED_CHAIN_ID, Ledger, rpc_web3
from blockdeepnet.wire import Topics
from provisioning.broker_credentials import write_amqtt_password_file
from provisioning.private_files import private_dir, write_private


@dataclass(frozen=True)
class LocalDevice:
    name: str
    address: str
    folder: Path
    config: Path
    key_share: int


@dataclass(frozen=True)
class LocalFleet:
    root: Path
    fleet: Fleet
    gateway_config: Path
    devices: list[LocalDevice] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict, repr=False)  # MQTT user -> password

    def shares(self) -> dict[int, KeyShare]:
        out = {}
        for d in self.devices:
            if d.key_share:
                data = json.loads((d.folder / "share.json").read_text())
                out[d.key_share] = KeyShare.from_dict(data)
        return out


def _write_broker_files(root: Path, name: str, passwords: dict[str, str], devices: list[str]) -> None:
    """The broker's side of the credentials: amqtt's argon2 users file, and for Mosquitto a ``$7$`` password
    file (``mosquitto_passwd``) and the DESIGN §3 ACL file, so either broker can enforce the same rules."""
    folder = private_dir(root / "broker")
    write_amqtt_password_file(folder / "amqtt-users", passwords)
    rules = AclRules.build(Topics(name), "gateway", devices, ["monitor"])
    (folder / "mosquitto.acl").write_text(mosquitto_acl(rules))
    mosq = folder / "mosquitto.passwd"
    write_private(mosq, "")
    if shutil.which("mosquitto_passwd"):
        for user, password in passwords.items():
            subprocess.run(
                ["mosquitto_passwd", "-b", str(mosq), user, password], check=True, capture_output=True
            )


def create_local_fleet(
    root: Path,
    *,
    name: str,
    devices: int = 10,
    threshold: int = 2,
    holders: int = 3,
    key_bits: int = 2048,
    samples: int = PAPER_SAMPLES_PER_DEVICE,
    chain_url: str | None = None,
    broker_port: int = 1883,
    broker_mode: str = "embedded",
    broker_auth: bool = True,
    http_port: int = 0,
    model_seed: int = 7,
    gateway_extra: Mapping[str, Any] | None = None,
    agent_extra: Callable[[int], Mapping[str, Any]] | None = None,
    dealt: tuple[ThresholdPublicKey, list[KeyShare]] | None = None,
) -> LocalFleet:
    """Write a whole fleet under ``root`` (which must be empty or absent).

    ``chain_url=None``: the embedded chain (the contract address is predicted from the gateway key);
    otherwise the contract is deployed now on that JSON-RPC node (gas price 0, as on QBFT and ``bdn chain dev``).
    ``dealt`` reuses an already dealt key (tests deal one small key for many fleets).
    """
    root = private_dir(root)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: a fleet folder is created once")
    if not 1 <= threshold <= holders <= devices:
        raise ValueError(f"need 1 <= t <= l <= devices, got t={threshold}, l={holders}, devices={devices}")
    tpk, shares = dealt or deal(threshold, holders, key_bits, allow_insecure=key_bits < 2048)
    layout = SlotLayout(tpk.public_key.bits)

    gw_dir = private_dir(root / "gateway")
    gateway = Account.create()
    write_private(gw_dir / "gateway.key", gateway.key.hex() + "\n")
    if chain_url is None:
        chain = ChainInfo("embedded", EMBEDDED_CHAIN_ID, contract_address(gateway.address, 0))
    else:
        w3 = rpc_web3(chain_url)
        ledger = Ledger.deploy(w3, gateway)
        chain = ChainInfo("rpc", ledger.chain_id(), ledger.address, url=chain_url)

    passwords: dict[str, str] = {"gateway": secrets.token_urlsafe(24)}
    entries: list[DeviceEntry] = []
    keys: list[bytes] = []
    for k in range(devices):
        private, address = new_device_key()
        keys.append(private)
        entries.append(DeviceEntry(address, samples, k + 1 if k < holders else 0, f"dev{k}"))
        passwords[address] = secrets.token_urlsafe(24)
    fleet = Fleet(name, chain, gateway.address, tpk, layout, model_seed, tuple(entries))
    fleet.save(root / "fleet.json")

    broker: dict[str, Any] = {
        "mode": broker_mode,
        "host": "127.0.0.1",
        "port": broker_port,
        "username": "gateway",
    }
    passwords["monitor"] = secrets.token_urlsafe(24)
    if broker_auth:
        write_private(gw_dir / "broker.password", passwords["gateway"] + "\n")
        broker["password_file"] = "broker.password"
        _write_broker_files(root, name, passwords, [e.address for e in entries])
        if broker_mode == "embedded":
            broker.update(users_file="../broker/amqtt-users", monitors="monitor")
    gw_cfg: dict[str, Any] = {
        "fleet_file": "../fleet.json",
        "key_file": "gateway.key",
        "state_dir": "state",
        "broker": broker,
        "http": {"port": http_port},
    }
    for key, value in (gateway_extra or {}).items():
        if isinstance(value, Mapping):
            gw_cfg[key] = {**gw_cfg.get(key, {}), **value}
        else:
            gw_cfg[key] = value
    (gw_dir / "gateway.toml").write_text(toml_text(gw_cfg))

    local: list[LocalDevice] = []
    dev_root = private_dir(root / "devices")
    for k, (entry, private) in enumerate(zip(entries, keys, strict=True)):
        folder = private_dir(dev_root / entry.name)
        write_private(folder / "device.key", private.hex() + "\n")
        agent: dict[str, Any] = {
            "fleet_file": "../../fleet.json",
            "key_file": "device.key",
            "state_dir": "state",
            "broker": {"host": "127.0.0.1", "port": broker_port},
            "data": {"source": "fashion-mnist-shard", "shard": k, "shards": devices, "seed": model_seed},
        }
        if entry.key_share:
            share = shares[entry.key_share - 1]
            write_private(folder / "share.json", json.dumps(share.to_dict()))
            agent["share_file"] = "share.json"
        if broker_auth:
            write_private(folder / "broker.password", passwords[entry.address] + "\n")
            agent["broker"].update(username=entry.address, password_file="broker.password")
        for key, value in (agent_extra(k) if agent_extra else {}).items():
            if isinstance(value, Mapping):
                agent[key] = {**agent.get(key, {}), **value}
            else:
                agent[key] = value
        config = folder / "agent.toml"
        config.write_text(toml_text(agent))
        local.append(LocalDevice(entry.name, entry.address, folder, config, entry.key_share))
    return LocalFleet(root, fleet, gw_dir / "gateway.toml", local, passwords)
