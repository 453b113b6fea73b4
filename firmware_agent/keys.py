"""The device's secrets: its secp256k1 signing key and, on key holders, its threshold Paillier key share.

Both files are secret: the device key lets anyone submit updates (and collect rewards) as this device; t
shares decrypt every aggregate. They are refused unless only their owner can read them (mode 0600 or
stricter), like ssh refuses a private key with loose permissions: a world-readable key on a shared device is
already compromised, and silently using it would hide that. Symlinks are not followed, so a link planted in
the config folder cannot redirect the agent to another file.

The formats and their checks live here; where the secrets rest (these files, sealed to the TPM, or an
encrypted keystore) is :mod:`firmware_agent.vault`. No message and no ``repr`` here contains key material.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from eth_keys.datatypes import PrivateKey
from eth_utils.exceptions import ValidationError as EthValidationError

from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey
from firmware_agent.errors import AgentSetupError

_MAX_SECRET_FILE_BYTES = 1 << 20  # a share of a 2048-bit key is ~2 KB; anything huge is not one of ours

# The names the device's two secrets go by in a vault (firmware_agent.vault): the 32 raw secp256k1 key bytes,
# and the KeyShare JSON document (UTF-8).
DEVICE_KEY = "device-key"
KEY_SHARE = "key-share"


@dataclass(frozen=True)
class DeviceKey:
    """The device's signing key and the checksummed address it derives (the device's identity)."""

    address: str
    private_key: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"DeviceKey(address={self.address}, <secret>)"


def read_private_bytes(path: Path, what: str) -> bytes:
    """Bytes of a secret file, refusing symlinks, non-regular files and group/world access bits."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise AgentSetupError(f"{what} {path} does not exist") from None
    except OSError as exc:
        if os.path.islink(path):
            raise AgentSetupError(
                f"{what} {path} is a symlink; point the config at the file itself"
            ) from None
        raise AgentSetupError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AgentSetupError(f"{what} {path} is not a regular file")
        if info.st_mode & 0o077:
            raise AgentSetupError(
                f"{what} {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"it must be private to its owner: chmod 600 {path}"
            )
        if info.st_size > _MAX_SECRET_FILE_BYTES:
            raise AgentSetupError(f"{what} {path} is {info.st_size} bytes, too large to be a key file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(_MAX_SECRET_FILE_BYTES + 1)
    finally:
        os.close(fd)


def read_private_file(path: Path, what: str) -> str:
    """Text of a secret file (ASCII), with the checks of :func:`read_private_bytes`."""
    raw = read_private_bytes(path, what)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise AgentSetupError(f"{what} {path} is not ASCII text") from None


def device_key_from_hex(text: str, what: str) -> bytes:
    """The 32 key bytes of the device key file format: 64 hex digits, optional ``0x`` and whitespace.

    ``what`` names the source in messages (``device key file /etc/bdn/device.key``); no message echoes digits.
    """
    text = text.strip().removeprefix("0x").removeprefix("0X")
    if len(text) != 64:
        raise AgentSetupError(f"{what} must hold 64 hex digits (a secp256k1 key), got {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise AgentSetupError(f"{what} does not hold a valid secp256k1 private key") from None


def device_key_from_bytes(raw: bytes, what: str) -> DeviceKey:
    """A :class:`DeviceKey` from its 32 raw bytes, refusing a key of 0 or >= the curve order."""
    if len(raw) != 32:
        raise AgentSetupError(f"{what} must hold a 32-byte secp256k1 key, got {len(raw)} bytes")
    try:
        address = str(PrivateKey(raw).public_key.to_checksum_address())
    except (ValueError, EthValidationError):
        raise AgentSetupError(f"{what} does not hold a valid secp256k1 private key") from None
    return DeviceKey(address=address, private_key=raw)


def key_share_from_bytes(
    raw: bytes, what: str, fleet_key: ThresholdPublicKey, expected_index: int
) -> KeyShare:
    """A KeyShare from its JSON document, checked against the fleet's public key and the index fleet.json gives.

    A share dealt for another key would produce partial decryptions that every device rejects; finding that
    at start-up is cheaper than in round 1.
    """
    try:
        share = KeyShare.from_dict(json.loads(raw.decode("utf-8")))
    except (ValueError, TypeError):
        raise AgentSetupError(f"{what} is not a KeyShare JSON document") from None
    if share.public.to_dict() != fleet_key.to_dict():
        raise AgentSetupError(
            f"{what} was dealt for key {share.public.fingerprint}, but the fleet's key is {fleet_key.fingerprint}"
        )
    if share.index != expected_index:
        raise AgentSetupError(
            f"{what} holds share {share.index}, but fleet.json assigns this device share {expected_index}"
        )
    return share


def load_device_key(path: Path) -> DeviceKey:
    """The device key: one line of 64 hex digits (an optional ``0x`` prefix and surrounding whitespace allowed)."""
    what = f"device key file {path}"
    return device_key_from_bytes(device_key_from_hex(read_private_file(path, "device key file"), what), what)


def load_key_share(path: Path, fleet_key: ThresholdPublicKey, expected_index: int) -> KeyShare:
    """The holder's KeyShare JSON file, checked as :func:`key_share_from_bytes` does."""
    text = read_private_file(path, "key share file")
    return key_share_from_bytes(text.encode("ascii"), f"key share file {path}", fleet_key, expected_index)


class SecretSource(Protocol):
    """Where :func:`load_device_key_from` and :func:`load_key_share_from` read a secret: any
    :class:`firmware_agent.vault.Vault` is one. A protocol rather than the vault class, so this module (which the
    vault builds on for its formats and checks) does not depend on the vault in turn."""

    def get(self, name: str) -> bytes:
        """The secret stored under ``name``; a missing or damaged one raises :class:`AgentSetupError`."""

    def describe(self, name: str) -> str:
        """``name`` and where it rests, as the subject of an error message."""


def load_device_key_from(vault: SecretSource) -> DeviceKey:
    """The device key held in ``vault`` (whichever backend: files, TPM, keystore)."""
    return device_key_from_bytes(vault.get(DEVICE_KEY), vault.describe(DEVICE_KEY))


def load_key_share_from(vault: SecretSource, fleet_key: ThresholdPublicKey, expected_index: int) -> KeyShare:
    """The key share held in ``vault``, checked against the fleet's key and this device's share index."""
    return key_share_from_bytes(vault.get(KEY_SHARE), vault.describe(KEY_SHARE), fleet_key, expected_index)
