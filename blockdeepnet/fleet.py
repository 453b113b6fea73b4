"""The public description of one fleet (``fleet.json``): what the gateway and every device must agree on.

A fleet is fixed at set-up time (``bdn provision init`` or the demo): the threshold Paillier public key and
codec layout, the chain and contract, the gateway's address, the registered devices, and the seed of the
initial model. Nothing in here is secret; key shares and device keys live in their own private files.

Model identity. The gateway never sees a plaintext model, so it cannot hash one. A round's
``base_model_hash`` therefore names the model by its history: round 1 builds on :meth:`Fleet.initial_model_hash`
(keccak of the seeded initial weights, which every device recomputes), and every later round on the
aggregate hash that the previous committed round put on chain. Two devices holding the same base hash hold
bit-identical weights, because decryption and decoding are deterministic.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rlp
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.crypto.threshold import ThresholdPublicKey
from blockdeepnet.eip712 import Domain
from blockdeepnet.learning import flatten, init_params

FLEET_VERSION = 1
FLEET_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INIT_STREAM = 0x1417  # the initial model's RNG stream, shared with ``bdn simulate``

ChainKind = Literal["embedded", "rpc"]


class FleetError(ValueError):
    """``fleet.json`` is missing, unreadable or inconsistent; the message says which field and why."""


@dataclass(frozen=True)
class DeviceEntry:
    """A registered device: its address, the samples it declared, and its key share index (0 = none)."""

    address: str
    samples: int
    key_share: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "address", to_checksum_address(self.address))
        except (ValueError, TypeError) as exc:
            raise FleetError(f"device address {self.address!r} is not an Ethereum address") from exc
        if type(self.samples) is not int or self.samples < 1:
            raise FleetError(f"device {self.address}: samples must be a positive integer")
        if type(self.key_share) is not int or self.key_share < 0:
            raise FleetError(f"device {self.address}: key_share must be 0 (none) or a holder index")


@dataclass(frozen=True)
class ChainInfo:
    """Where the fleet's contract lives. ``embedded``: in the gateway's process (demo); ``rpc``: a node URL."""

    kind: ChainKind
    chain_id: int
    contract: str
    url: str = ""
    poa: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("embedded", "rpc"):
            raise FleetError(f"chain.kind must be 'embedded' or 'rpc', got {self.kind!r}")
        if self.kind == "rpc" and not self.url.startswith(("http://", "https://")):
            raise FleetError("chain.url must be an http(s) JSON-RPC URL when chain.kind is 'rpc'")
        try:
            object.__setattr__(self, "contract", to_checksum_address(self.contract))
        except (ValueError, TypeError) as exc:
            raise FleetError(f"chain.contract {self.contract!r} is not an address") from exc


@dataclass(frozen=True)
class Fleet:
    name: str
    chain: ChainInfo
    gateway: str
    public_key: ThresholdPublicKey
    layout: SlotLayout
    model_seed: int
    devices: tuple[DeviceEntry, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not FLEET_NAME_RE.fullmatch(self.name):
            raise FleetError(f"fleet name {self.name!r} must be 1..64 of A-Z a-z 0-9 _ -")
        object.__setattr__(self, "gateway", to_checksum_address(self.gateway))
        if self.layout.key_bits != self.public_key.public_key.bits:
            raise FleetError(
                f"layout is for {self.layout.key_bits}-bit keys, the fleet key has "
                f"{self.public_key.public_key.bits} bits"
            )
        seen: set[str] = set()
        shares: set[int] = set()
        for d in self.devices:
            if d.address in seen:
                raise FleetError(f"device {d.address} is listed twice")
            seen.add(d.address)
            if d.key_share:
                if d.key_share > self.public_key.holders or d.key_share in shares:
                    raise FleetError(f"device {d.address}: key share {d.key_share} is out of range or taken")
                shares.add(d.key_share)
        if len(self.devices) > self.layout.max_devices:
            raise FleetError(f"{len(self.devices)} devices exceed the layout's max_devices")

    # --- derived values ---------------------------------------------------------------------------------

    @property
    def domain(self) -> Domain:
        return Domain(self.chain.chain_id, self.chain.contract)

    @property
    def total_samples(self) -> int:
        """s in Eq. 4: the samples all registered devices declared (each device weights by s_k / s)."""
        return sum(d.samples for d in self.devices)

    def device(self, address: str) -> DeviceEntry | None:
        for d in self.devices:
            if d.address == address:
                return d
        return None

    def initial_model(self) -> np.ndarray:
        return flatten(init_params(np.random.default_rng([self.model_seed, _INIT_STREAM])))

    def initial_model_hash(self) -> bytes:
        return model_hash(self.initial_model())

    def decrypt_context(self, round_no: int, aggregate_hash: bytes) -> bytes:
        """Binds holders' proofs to this fleet, contract, round and aggregate (no replay across rounds)."""
        return (
            b"bdn/%s/%s/%d/" % (self.name.encode(), self.chain.contract.encode(), round_no) + aggregate_hash
        )

    # --- (de)serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FLEET_VERSION,
            "name": self.name,
            "chain": {
                "kind": self.chain.kind,
                "chain_id": self.chain.chain_id,
                "contract": self.chain.contract,
                "url": self.chain.url,
                "poa": self.chain.poa,
            },
            "gateway": self.gateway,
            "paillier": self.public_key.to_dict(),
            "layout": self.layout.to_dict(),
            "model_seed": self.model_seed,
            "devices": [
                {"address": d.address, "samples": d.samples, "key_share": d.key_share, "name": d.name}
                for d in self.devices
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Fleet:
        if not isinstance(data, dict):
            raise FleetError("fleet file must hold a JSON object")
        if data.get("version") != FLEET_VERSION:
            raise FleetError(f"fleet file version {data.get('version')!r} is not {FLEET_VERSION}")
        try:
            chain = data["chain"]
            return cls(
                name=data["name"],
                chain=ChainInfo(
                    kind=chain["kind"],
                    chain_id=int(chain["chain_id"]),
                    contract=chain["contract"],
                    url=chain.get("url", ""),
                    poa=bool(chain.get("poa", False)),
                ),
                gateway=data["gateway"],
                public_key=ThresholdPublicKey.from_dict(data["paillier"]),
                layout=SlotLayout.from_dict(data["layout"]),
                model_seed=int(data["model_seed"]),
                devices=tuple(
                    DeviceEntry(d["address"], d["samples"], d.get("key_share", 0), d.get("name", ""))
                    for d in data["devices"]
                ),
            )
        except FleetError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetError(f"fleet file is malformed: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Fleet:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise FleetError(f"cannot read fleet file {p}: {exc.strerror}") from exc
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise FleetError(f"fleet file {p} is not JSON: {exc}") from exc
        except FleetError as exc:
            raise FleetError(f"{p}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomic write (temp file + rename): a crash leaves the old file or the new one, never half."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, p)


def model_hash(weights: np.ndarray) -> bytes:
    """keccak256 of the little-endian float32 weights (the initial model's identity)."""
    return keccak(np.ascontiguousarray(weights, dtype="<f4").tobytes())


def contract_address(deployer: str, nonce: int) -> str:
    """The address a CREATE from ``deployer`` at ``nonce`` gets: lets a fresh embedded chain's contract address
    be written into ``fleet.json`` before the gateway deploys it (the gateway checks it matches)."""
    raw = keccak(rlp.encode([bytes.fromhex(to_checksum_address(deployer)[2:]), nonce]))[12:]
    return str(to_checksum_address(raw))
