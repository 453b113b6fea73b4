"""Helpers shared by the agent tests (unit and integration): a small fleet written to disk the way provisioning
lays it out (fleet.json, 0600 key and share files, agent.toml per device, tiny npz data). No tests here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockdeepnet.config import AgentConfig, load_agent_config
from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey
from blockdeepnet.eip712 import new_device_key
from blockdeepnet.fleet import ChainInfo, DeviceEntry, Fleet

UNREACHABLE_RPC = (
    "http://127.0.0.1:9/"  # nothing listens on the discard port: constructing a client is enough
)


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def synthetic_npz(path: Path, n: int, seed: int) -> Path:
    """Learnable toy images (class c lights up row band c), uint8 as a device's own data would be."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.uniform(0.0, 0.3, (n, 28, 28))
    for i, c in enumerate(y):
        x[i, 2 + 2 * c : 4 + 2 * c, :] += 0.7
    np.savez(path, x=(x * 255).astype(np.uint8), y=y.astype(np.int64))
    return path


@dataclass
class DeviceFiles:
    address: str
    key: bytes
    config_path: Path
    share: KeyShare | None


@dataclass
class FleetFiles:
    fleet: Fleet
    devices: list[DeviceFiles]
    shares: list[KeyShare]

    def config(self, i: int) -> AgentConfig:
        return load_agent_config(self.devices[i].config_path)


def write_fleet(
    root: Path,
    name: str,
    tpk: ThresholdPublicKey,
    shares: list[KeyShare],
    *,
    devices: int,
    samples: int = 64,
    declared: int | None = None,
    chain: ChainInfo | None = None,
    extra_toml: str = "",
) -> FleetFiles:
    """A fleet of ``devices`` devices; device i holds key share i+1 while shares last. Each gets its own folder
    with key, share, npz data of ``samples`` samples and an agent.toml pointing at the Mosquitto on loopback."""
    keys = [new_device_key() for _ in range(devices)]
    entries = tuple(
        DeviceEntry(addr, declared or samples, i + 1 if i < len(shares) else 0, f"dev{i}")
        for i, (_, addr) in enumerate(keys)
    )
    gateway_key, gateway = new_device_key()
    del gateway_key
    fleet = Fleet(
        name=name,
        chain=chain or ChainInfo(kind="rpc", chain_id=1337, contract="0x" + "11" * 20, url=UNREACHABLE_RPC),
        gateway=gateway,
        public_key=tpk,
        layout=SlotLayout(tpk.public_key.bits),
        model_seed=7,
        devices=entries,
    )
    root.mkdir(parents=True, exist_ok=True)
    fleet.save(root / "fleet.json")
    out: list[DeviceFiles] = []
    for i, (key, addr) in enumerate(keys):
        folder = root / f"dev{i}"
        folder.mkdir()
        write_private(folder / "device.key", key.hex() + "\n")
        share = shares[i] if i < len(shares) else None
        share_line = ""
        if share is not None:
            write_private(folder / "share.json", json.dumps(share.to_dict()))
            share_line = 'share_file = "share.json"\n'
        synthetic_npz(folder / "data.npz", samples, seed=100 + i)
        toml = (
            'fleet_file = "../fleet.json"\n'
            'key_file = "device.key"\n'
            'state_dir = "state"\n'
            f"{share_line}"
            f"{extra_toml}"
            "[broker]\n"
            'host = "127.0.0.1"\n'
            "port = 1883\n"
            "[data]\n"
            'source = "npz"\n'
            'path = "data.npz"\n'
            f"shard = {i}\n"
            "[train]\n"
            "local_epochs = 1\n"
        )
        (folder / "agent.toml").write_text(toml)
        out.append(DeviceFiles(addr, key, folder / "agent.toml", share))
    return FleetFiles(fleet, out, shares)
