"""The contract's interface without web3: its artifact (ABI + bytecode), call encoding and result decoding.

A device only reads the contract (a few ``eth_call``s per round). web3.py costs a device ~30 MB of memory and
~0.6 s of CPU just to import (measured, issue 6: the agent must stay under 150 MB on a Raspberry Pi 3), so
the agent encodes its calls here with eth-abi and sends them over plain JSON-RPC; the gateway keeps web3
(:mod:`blockdeepnet.ledger`), which re-exports these names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

ARTIFACT_ENV = "BDN_CONTRACT_ARTIFACT"
DEFAULT_ARTIFACT = Path(__file__).resolve().parent.parent / "contracts" / "artifacts" / "BlockDeepNet.json"


class LedgerError(Exception):
    """Base class of everything this client raises."""


@dataclass(frozen=True)
class Artifact:
    abi: list[dict[str, Any]]
    bytecode: str

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Artifact:
        """The committed, reproducibly compiled contract (contracts/build.mjs), or ``$BDN_CONTRACT_ARTIFACT``."""
        where = Path(path or os.environ.get(ARTIFACT_ENV) or DEFAULT_ARTIFACT)
        try:
            data = json.loads(where.read_text())
            return cls(abi=data["abi"], bytecode=data["bytecode"])
        except FileNotFoundError:
            raise LedgerError(
                f"contract artifact not found at {where}; run from the repository checkout or set ${ARTIFACT_ENV}"
            ) from None
        except (ValueError, KeyError) as exc:
            raise LedgerError(f"contract artifact {where} is malformed: {exc}") from exc

    def function(self, name: str) -> dict[str, Any]:
        for item in self.abi:
            if item.get("type") == "function" and item.get("name") == name:
                return item
        raise LedgerError(f"the contract artifact has no function {name}")

    def encode_call(self, name: str, *args: Any) -> bytes:
        """Calldata: the 4-byte selector of ``name(types)`` and the ABI-encoded arguments."""
        types = [_abi_type(p) for p in self.function(name)["inputs"]]
        selector = keccak(f"{name}({','.join(types)})".encode())[:4]
        return selector + abi_encode(types, list(args))

    def decode_result(self, name: str, data: bytes) -> tuple[Any, ...]:
        """The outputs of ``name`` as a tuple (a struct output is flattened into its fields)."""
        outputs = self.function(name)["outputs"]
        types = [_abi_type(p) for p in outputs]
        values = abi_decode(types, data)
        if len(outputs) == 1 and outputs[0]["type"] == "tuple":
            return tuple(values[0])
        return tuple(values)


def _abi_type(param: dict[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + kind[len("tuple") :]
    return kind


@dataclass(frozen=True)
class RoundInfo:
    base_model_hash: bytes
    deadline_block: int
    count: int
    total_samples: int
    committed: bool
    aggregate_hash: bytes
    merkle_root: bytes
