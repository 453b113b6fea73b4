"""The committed contract artifact: it is what the pinned solc builds from the source (byte for byte), it
exposes the interface the Python ledger client is written against, and its code has no PUSH0 (london EVM)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "contracts"
ARTIFACT = CONTRACTS / "artifacts" / "BlockDeepNet.json"

FUNCTIONS = {
    "fund()": ((), "payable"),
    "registerDevice(address,uint16)": ((), "nonpayable"),
    "revokeDevice(address)": ((), "nonpayable"),
    "deviceInfo(address)": (("bool", "bool", "uint16"), "view"),
    "openRound(uint64,bytes32,uint64)": ((), "nonpayable"),
    "submitUpdate(uint64,address,bytes32,uint64,uint64,bytes)": ((), "nonpayable"),
    "commitGlobal(uint64,bytes32,bytes32,uint32)": ((), "nonpayable"),
    "balanceOf(address)": (("uint256",), "view"),
    "withdraw()": ((), "nonpayable"),
    "getRound(uint64)": (("bytes32", "uint64", "uint32", "uint64", "bool", "bytes32", "bytes32"), "view"),
    "getUpdate(uint64,address)": (("bytes32",), "view"),
    "domainSeparator()": (("bytes32",), "view"),
    "updateDigest(uint64,bytes32,uint64,uint64)": (("bytes32",), "view"),
    "gateway()": (("address",), "view"),
    "dataRewardPerSample()": (("uint256",), "view"),
    "processingReward()": (("uint256",), "view"),
}

# (type, indexed) per input
EVENTS = {
    "DeviceRegistered": (("address", True), ("uint16", False)),
    "DeviceRevoked": (("address", True),),
    "RoundOpened": (("uint64", True), ("bytes32", False), ("uint64", False)),
    "UpdateSubmitted": (
        ("uint64", True),
        ("address", True),
        ("bytes32", False),
        ("uint64", False),
        ("uint64", False),
    ),
    "GlobalCommitted": (("uint64", True), ("bytes32", False), ("bytes32", False), ("uint32", False)),
    "Withdrawn": (("address", True), ("uint256", False)),
}

ERRORS = {
    "NotGateway()",
    "BadSignature()",
    "UnknownDevice(address)",
    "DeviceIsRevoked(address)",
    "RoundNotOpen(uint64)",
    "LateSubmission(uint64,uint64)",
    "RoundAlreadyCommitted(uint64)",
    "DuplicateSubmission(uint64,address)",
    "ZeroSamples()",
    "GlobalAlreadyCommitted(uint64)",
    "CountMismatch(uint32,uint32)",
    "InsufficientPool(uint256,uint256)",
    "NothingToWithdraw()",
}


def _artifact() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ARTIFACT.read_text())
    return data


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(i['type'] for i in entry['inputs'])})"


def push0_offsets(hex_code: str) -> list[int]:
    """Offsets of PUSH0 (0x5f) opcodes, walking the code opcode by opcode (PUSH1..PUSH32 immediates are
    skipped, so a 0x5f data byte is not an opcode) and leaving out the trailing CBOR metadata."""
    code = bytes.fromhex(hex_code.removeprefix("0x"))
    end = len(code)
    if end >= 2:
        cbor_length = int.from_bytes(code[-2:], "big")
        if cbor_length + 2 <= end:
            end -= cbor_length + 2
    found = []
    pc = 0
    while pc < end:
        op = code[pc]
        if op == 0x5F:
            found.append(pc)
        elif 0x60 <= op <= 0x7F:
            pc += op - 0x5F
        pc += 1
    return found


def test_push0_walker_skips_push_data() -> None:
    # PUSH2 0x5f5f, PUSH0, STOP, then a 2-byte "CBOR" trailer holding 0x5f and its length.
    assert push0_offsets("0x615f5f5f00" + "5f" + "0001") == [3]
    assert push0_offsets("0x7f" + "5f" * 32 + "00") == []


def test_artifact_is_what_the_pinned_compiler_builds() -> None:
    if not (CONTRACTS / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("contracts/node_modules is missing and npm is not installed (make test runs npm ci)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CONTRACTS, check=True, timeout=240)
    node = shutil.which("node")
    assert node is not None, "node is not on PATH: the contract build needs Node.js"
    result = subprocess.run(
        [node, "contracts/build.mjs", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"build.mjs --check failed:\n{result.stdout}\n{result.stderr}"


def test_artifact_compiler_settings() -> None:
    art = _artifact()
    pinned = json.loads((CONTRACTS / "package.json").read_text())["dependencies"]["solc"]
    assert art["contractName"] == "BlockDeepNet"
    assert art["compiler"]["version"].startswith(f"{pinned}+")
    assert art["compiler"]["evmVersion"] == "london"
    assert art["compiler"]["optimizer"] == {"enabled": True, "runs": 200}
    pragma = f"pragma solidity {pinned};"
    assert pragma in (CONTRACTS / "src" / "BlockDeepNet.sol").read_text()


def test_abi_has_the_interface() -> None:
    abi = _artifact()["abi"]
    functions = {_signature(e): e for e in abi if e["type"] == "function"}
    for sig, (outputs, mutability) in FUNCTIONS.items():
        assert sig in functions, f"missing function {sig}"
        assert tuple(o["type"] for o in functions[sig]["outputs"]) == outputs, sig
        assert functions[sig]["stateMutability"] == mutability, sig

    events = {e["name"]: e for e in abi if e["type"] == "event"}
    for name, inputs in EVENTS.items():
        assert name in events, f"missing event {name}"
        assert tuple((i["type"], i["indexed"]) for i in events[name]["inputs"]) == inputs, name

    errors = {_signature(e) for e in abi if e["type"] == "error"}
    assert errors >= ERRORS, f"missing errors {sorted(ERRORS - errors)}"

    (constructor,) = (e for e in abi if e["type"] == "constructor")
    assert [i["type"] for i in constructor["inputs"]] == ["uint256", "uint256"]
    assert any(e["type"] == "receive" for e in abi)


def test_bytecode_has_no_push0() -> None:
    art = _artifact()
    for key in ("bytecode", "deployedBytecode"):
        assert len(art[key]) > 2, f"{key} is empty"
        assert push0_offsets(art[key]) == [], f"{key} contains PUSH0 (not valid on london)"
