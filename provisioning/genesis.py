"""A QBFT genesis and validator keys for a gateway consortium (DESIGN §5, §8).

Production runs on a permissioned QBFT chain (Hyperledger Besu or GoQuorum) whose validators are the
consortium's gateways. This module writes what such a network needs at block 0:

- ``genesis.json`` for the chosen client: london rules (contracts are compiled for evmVersion london, no
  PUSH0), a zero base fee and zero gas price, the QBFT parameters (block period, epoch, round timeout) and
  the initial validator set in ``extraData``;
- one directory per validator with its node key (``key``, 0600, directory 0700), its public key
  (``key.pub``, for the enode URL) and its address (``address``).

The QBFT ``extraData`` is the RLP list Besu's ``QbftExtraDataCodec`` writes (and GoQuorum reads the same
bytes)::

    RLP([vanity: 32 zero bytes,
         validators: [20-byte address, ...],
         vote: [] (no vote),
         round: 0 as an RLP integer scalar, i.e. the empty string 0x80,
         committed seals: []])

IBFT 2.0 extraData has the same five items but writes "no vote" as an empty string (``0x80``) and the round
as 4 fixed bytes (``0x8400000000``); Besu rejects one for the other. Checked against the documented genesis of Besu ("Configure QBFT consensus") and of the Quorum developer
quickstart, byte for byte (see the tests).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import rlp
from eth_account import Account
from eth_keys.datatypes import PrivateKey
from eth_utils.address import is_checksum_address, to_checksum_address

from provisioning.private_files import write_private

Client = Literal["besu", "goquorum"]
CLIENTS: tuple[Client, ...] = ("besu", "goquorum")

VANITY_LENGTH = 32
# Besu (BftHelpers.EXPECTED_MIX_HASH) and GoQuorum (types.IstanbulDigest) require this mixHash: it is
# "Istanbul practical byzantine fault tolerance" truncated, the marker of a BFT block.
BFT_MIX_HASH = "0x63746963616c2062797a616e74696e65206661756c7420746f6c6572616e6365"
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
ZERO_HASH = "0x" + "00" * 32

DEFAULT_CHAIN_ID = 1337
DEFAULT_BLOCK_PERIOD_S = 2
DEFAULT_EPOCH_LENGTH = 30_000
DEFAULT_REQUEST_TIMEOUT_S = 10
# 700M gas per block, the figure of Besu's QBFT example; gas is free, this only bounds one block's work.
DEFAULT_GAS_LIMIT = 0x29B92700
# 1,000,000 ether. Gas is free (gas price 0), so the gateway needs no balance to relay; the pre-fund only
# lets it pay value transfers should the contracts ever need them.
DEFAULT_GATEWAY_BALANCE_WEI = 10**24
# JSON numbers beyond 2^53 lose precision in JavaScript tools (wallets, explorers).
MAX_CHAIN_ID = 2**53 - 1
# Byzantine fault tolerance: n >= 3f + 1, so one fault needs four validators.
MIN_FAULT_TOLERANT_VALIDATORS = 4

_VALIDATOR_DIR = re.compile(r"^validator-\d+$")
_HEX_ADDRESS = re.compile(r"(0[xX])?[0-9a-fA-F]{40}")


class QbftGenesisWarning(UserWarning):
    """A consortium that works but tolerates no faulty validator (fewer than four)."""


class ConsortiumExistsError(FileExistsError):
    """The output directory already holds files; pass ``force=True`` to replace the consortium in it."""


@dataclass(frozen=True)
class ValidatorKey:
    """A validator's node key. The private key stays out of ``repr`` so it never lands in a log."""

    address: str  # EIP-55 checksum
    public_key: str  # 64 bytes (x || y) hex without 0x: the node id of the validator's enode URL
    private_key: bytes = field(repr=False)


@dataclass(frozen=True)
class ValidatorFiles:
    directory: Path
    key: Path
    public_key: Path
    address_file: Path
    address: str


@dataclass(frozen=True)
class ConsortiumFiles:
    """What :func:`write_consortium` wrote: the genesis and one entry per validator, in extraData order."""

    out_dir: Path
    client: Client
    chain_id: int
    genesis: Path
    validators: list[ValidatorFiles]
    fault_tolerance: int


# ----------------------------------------------------------------------------------------------- validation


def fault_tolerance(n_validators: int) -> int:
    """Faulty (crashed or Byzantine) validators a QBFT network of ``n_validators`` survives: floor((n-1)/3)."""
    return max(0, (n_validators - 1) // 3)


def _check_validator_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"the number of validators must be an integer, got {n!r}")
    if n < 1:
        raise ValueError(f"a QBFT network needs at least 1 validator, got {n}")
    if n < MIN_FAULT_TOLERANT_VALIDATORS:
        warnings.warn(
            f"{n} validator(s) tolerate no faulty validator; QBFT needs at least "
            f"{MIN_FAULT_TOLERANT_VALIDATORS} to survive one (fine for a development chain only)",
            QbftGenesisWarning,
            stacklevel=3,
        )


def _positive_int(name: str, value: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def _address_bytes(address: str) -> bytes:
    """20 bytes of a hex address (0x optional); all-lowercase, all-uppercase or a valid EIP-55 checksum."""
    if not isinstance(address, str) or not _HEX_ADDRESS.fullmatch(address):
        raise ValueError(f"not an Ethereum address: {address!r}")
    digits = address[2:] if address[:2] in ("0x", "0X") else address
    mixed_case = digits != digits.lower() and digits != digits.upper()
    if mixed_case and not is_checksum_address("0x" + digits):
        raise ValueError(
            f"not an Ethereum address: {address!r} (its mixed case is not a valid EIP-55 checksum)"
        )
    return bytes.fromhex(digits)


def _validator_bytes(validators: Iterable[str]) -> list[bytes]:
    raw = [_address_bytes(v) for v in validators]
    if not raw:
        raise ValueError("the validator list is empty: a QBFT network needs at least 1 validator")
    seen: set[bytes] = set()
    for address in raw:
        if address in seen:
            raise ValueError(f"validator {to_checksum_address(address)} is listed twice")
        seen.add(address)
    return raw


# ------------------------------------------------------------------------------------------------- keys


def generate_validator_keys(n: int) -> list[ValidatorKey]:
    """``n`` fresh secp256k1 node keys (eth-account, OS randomness), sorted by address.

    Besu and GoQuorum both order the validator set by address internally (proposer rotation follows that
    order), so the genesis lists them sorted too and ``validator-1`` is the first proposer.
    """
    _check_validator_count(n)
    out: list[ValidatorKey] = []
    for _ in range(n):
        account = Account.create()
        private_key = bytes(account.key)
        public_key = PrivateKey(private_key).public_key.to_bytes().hex()
        out.append(ValidatorKey(to_checksum_address(account.address), public_key, private_key))
    return sorted(out, key=lambda k: k.address.lower())


# ------------------------------------------------------------------------------------------- extraData


def qbft_extra_data(validators: Sequence[str]) -> bytes:
    """The genesis ``extraData`` of a QBFT network whose initial validators are ``validators`` (in order).

    ``RLP([32 zero bytes, [address, ...], [], 0, []])``: vanity, validators, no vote, round 0 (an RLP
    scalar: the empty string), no committed seals. The bytes of Besu's
    ``QbftExtraDataCodec.encodeFromAddresses`` and of ``besu rlp encode --type=QBFT_EXTRA_DATA``.
    """
    return cast(bytes, rlp.encode([b"\x00" * VANITY_LENGTH, _validator_bytes(validators), [], 0, []]))


@dataclass(frozen=True)
class QbftExtraData:
    vanity: bytes
    validators: list[str]  # EIP-55 checksum, in the encoded order
    vote: tuple[str, bool] | None  # (recipient, add?) or None
    round: int
    seals: list[bytes]


def _from_hex(data: str | bytes) -> bytes:
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    text = data.strip()
    text = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("extraData is not valid hex") from None


def parse_qbft_extra_data(data: str | bytes) -> QbftExtraData:
    """Decode a QBFT ``extraData`` (hex, with or without 0x, or bytes); ``ValueError`` if it is not one."""
    raw = _from_hex(data)
    if not raw:
        raise ValueError("extraData is empty: a QBFT genesis must list its validators")
    try:
        items = rlp.decode(raw, strict=True)
    except rlp.exceptions.DecodingError as exc:
        raise ValueError(f"extraData is not valid RLP: {exc}") from None
    if not isinstance(items, list) or len(items) != 5:
        found = f"a list of {len(items)} items" if isinstance(items, list) else "a byte string"
        raise ValueError(
            f"QBFT extraData is an RLP list of 5 items (vanity, validators, vote, round, seals); found {found}"
        )
    vanity, validators, vote, round_, seals = items
    if not isinstance(vanity, bytes) or len(vanity) != VANITY_LENGTH:
        raise ValueError(f"extraData vanity must be {VANITY_LENGTH} bytes")
    if not isinstance(validators, list) or not all(isinstance(v, bytes) and len(v) == 20 for v in validators):
        raise ValueError("extraData validators must be a list of 20-byte addresses")
    parsed_vote: tuple[str, bool] | None = None
    if not isinstance(vote, list):
        raise ValueError(
            "extraData vote must be a list (empty when there is no vote); "
            "a byte string there and a 4-byte round are the IBFT 2.0 layout, not QBFT"
        )
    if vote:
        if len(vote) != 2 or not isinstance(vote[0], bytes) or len(vote[0]) != 20:
            raise ValueError("extraData vote must be [20-byte recipient, 0xff (add) or empty (drop)]")
        if vote[1] not in (b"", b"\xff"):
            raise ValueError("extraData vote type must be 0xff (add) or empty (drop)")
        parsed_vote = (to_checksum_address(vote[0]), vote[1] == b"\xff")
    if not isinstance(round_, bytes) or len(round_) > 4 or round_[:1] == b"\x00":
        raise ValueError(
            "extraData round must be a canonical RLP integer of at most 4 bytes "
            "(QBFT writes round 0 as 0x80; 0x8400000000 is the IBFT 2.0 layout)"
        )
    if not isinstance(seals, list) or not all(isinstance(s, bytes) and len(s) == 65 for s in seals):
        raise ValueError("extraData seals must be a list of 65-byte signatures")
    return QbftExtraData(
        vanity=vanity,
        validators=[to_checksum_address(v) for v in validators],
        vote=parsed_vote,
        round=int.from_bytes(round_, "big"),
        seals=list(seals),
    )


def decode_qbft_extra_data(data: str | bytes) -> list[str]:
    """The validators (EIP-55 checksum addresses, in order) of a QBFT ``extraData``."""
    return parse_qbft_extra_data(data).validators


# --------------------------------------------------------------------------------------------- genesis


@dataclass(frozen=True)
class _Params:
    extra_data: str
    chain_id: int
    block_period_s: int
    epoch_length: int
    request_timeout_s: int
    gas_limit: int
    alloc: dict[str, dict[str, str]]


def _params(
    validators: Sequence[str],
    chain_id: int,
    block_period_s: int,
    epoch_length: int,
    request_timeout_s: int,
    gas_limit: int,
    gateway_address: str | None,
    gateway_balance_wei: int,
) -> _Params:
    alloc: dict[str, dict[str, str]] = {}
    if gateway_address is not None:
        if isinstance(gateway_balance_wei, bool) or not isinstance(gateway_balance_wei, int):
            raise ValueError(
                f"the gateway balance must be an integer number of wei, got {gateway_balance_wei!r}"
            )
        if gateway_balance_wei < 0:
            raise ValueError(f"the gateway balance must not be negative, got {gateway_balance_wei}")
        gateway = to_checksum_address(_address_bytes(gateway_address))
        alloc[gateway] = {"balance": hex(gateway_balance_wei)}
    return _Params(
        extra_data="0x" + qbft_extra_data(validators).hex(),
        chain_id=_positive_int("chain id", chain_id, MAX_CHAIN_ID),
        block_period_s=_positive_int("block period (seconds)", block_period_s),
        epoch_length=_positive_int("epoch length", epoch_length),
        request_timeout_s=_positive_int("request timeout (seconds)", request_timeout_s),
        gas_limit=_positive_int("gas limit", gas_limit, 2**63 - 1),
        alloc=alloc,
    )


def _header(p: _Params) -> dict[str, Any]:
    return {
        "nonce": "0x0",
        "timestamp": "0x0",
        "extraData": p.extra_data,
        "gasLimit": hex(p.gas_limit),
        "difficulty": "0x1",
        "mixHash": BFT_MIX_HASH,
        "coinbase": ZERO_ADDRESS,
        "number": "0x0",
        "gasUsed": "0x0",
        "parentHash": ZERO_HASH,
        "alloc": p.alloc,
    }


# Every fork up to london at block 0, nothing after it: shanghai would enable PUSH0 (DESIGN §5).
_FORKS_TO_LONDON = (
    "homesteadBlock",
    "eip150Block",
    "eip155Block",
    "eip158Block",
    "byzantiumBlock",
    "constantinopleBlock",
    "petersburgBlock",
    "istanbulBlock",
    "berlinBlock",
    "londonBlock",
)


def besu_genesis(
    validators: Sequence[str],
    chain_id: int = DEFAULT_CHAIN_ID,
    block_period_s: int = DEFAULT_BLOCK_PERIOD_S,
    *,
    epoch_length: int = DEFAULT_EPOCH_LENGTH,
    request_timeout_s: int = DEFAULT_REQUEST_TIMEOUT_S,
    gas_limit: int = DEFAULT_GAS_LIMIT,
    gateway_address: str | None = None,
    gateway_balance_wei: int = DEFAULT_GATEWAY_BALANCE_WEI,
) -> dict[str, Any]:
    """A Besu QBFT genesis (block-header validator selection): london at 0, ``zeroBaseFee`` for a free-gas
    network (run the nodes with ``--min-gas-price=0``), the validators in ``extraData``."""
    p = _params(
        validators,
        chain_id,
        block_period_s,
        epoch_length,
        request_timeout_s,
        gas_limit,
        gateway_address,
        gateway_balance_wei,
    )
    config: dict[str, Any] = {"chainId": p.chain_id}
    config.update(dict.fromkeys(_FORKS_TO_LONDON, 0))
    config["zeroBaseFee"] = True
    config["qbft"] = {
        "blockperiodseconds": p.block_period_s,
        "epochlength": p.epoch_length,
        "requesttimeoutseconds": p.request_timeout_s,
    }
    return {"config": config, **_header(p)}


def goquorum_genesis(
    validators: Sequence[str],
    chain_id: int = DEFAULT_CHAIN_ID,
    block_period_s: int = DEFAULT_BLOCK_PERIOD_S,
    *,
    epoch_length: int = DEFAULT_EPOCH_LENGTH,
    request_timeout_s: int = DEFAULT_REQUEST_TIMEOUT_S,
    gas_limit: int = DEFAULT_GAS_LIMIT,
    gateway_address: str | None = None,
    gateway_balance_wei: int = DEFAULT_GATEWAY_BALANCE_WEI,
    max_code_size_kb: int = 64,
    txn_size_limit_kb: int = 64,
) -> dict[str, Any]:
    """A GoQuorum QBFT genesis: ``isQuorum`` (gas price 0 enforced), ``config.qbft`` with round-robin
    proposers (``policy`` 0) and ceil(2N/3) quorums from block 0, transaction and contract size limits."""
    p = _params(
        validators,
        chain_id,
        block_period_s,
        epoch_length,
        request_timeout_s,
        gas_limit,
        gateway_address,
        gateway_balance_wei,
    )
    _positive_int("maximum contract size (KB)", max_code_size_kb, 128)
    _positive_int("transaction size limit (KB)", txn_size_limit_kb, 128)
    config: dict[str, Any] = {"chainId": p.chain_id}
    config.update(dict.fromkeys(_FORKS_TO_LONDON, 0))
    config["eip150Hash"] = ZERO_HASH
    config["qbft"] = {
        "blockperiodseconds": p.block_period_s,
        "epochlength": p.epoch_length,
        "requesttimeoutseconds": p.request_timeout_s,
        "policy": 0,
        "ceil2Nby3Block": 0,
    }
    config["txnSizeLimit"] = txn_size_limit_kb
    config["maxCodeSizeConfig"] = [{"block": 0, "size": max_code_size_kb}]
    config["isQuorum"] = True
    return {"config": config, **_header(p)}


def genesis_for(client: Client, validators: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    if client == "besu":
        return besu_genesis(validators, **kwargs)
    if client == "goquorum":
        return goquorum_genesis(validators, **kwargs)
    raise ValueError(f"unknown client {client!r}: choose one of {', '.join(CLIENTS)}")


# ------------------------------------------------------------------------------------------------ files


def _clear_previous(out_dir: Path) -> None:
    """Remove what an earlier ``write_consortium`` left in ``out_dir``, and only that."""
    for entry in out_dir.iterdir():
        if entry.name == "genesis.json" and entry.is_file():
            entry.unlink()
        elif _VALIDATOR_DIR.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)


def write_consortium(
    out_dir: str | os.PathLike[str],
    n: int,
    client: Client = "besu",
    chain_id: int = DEFAULT_CHAIN_ID,
    block_period: int = DEFAULT_BLOCK_PERIOD_S,
    gateway_address: str | None = None,
    *,
    force: bool = False,
    **genesis_kwargs: Any,
) -> ConsortiumFiles:
    """Write ``genesis.json`` and ``validator-1`` .. ``validator-n`` (``key``, ``key.pub``, ``address``).

    Refuses a non-empty ``out_dir`` (:class:`ConsortiumExistsError`) unless ``force``, which removes the
    previous ``genesis.json`` and ``validator-*`` directories (their keys are gone for good) and leaves
    anything else in the directory alone. Everything is validated before the first file is written.
    """
    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}: choose one of {', '.join(CLIENTS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConsortiumExistsError(
            f"{out} is not empty; choose another directory or pass force to replace the consortium in it"
        )
    validator_keys = generate_validator_keys(n)
    genesis = genesis_for(
        client,
        [k.address for k in validator_keys],
        chain_id=chain_id,
        block_period_s=block_period,
        gateway_address=gateway_address,
        **genesis_kwargs,
    )

    out.mkdir(parents=True, exist_ok=True)
    if force:
        _clear_previous(out)
    written: list[ValidatorFiles] = []
    for i, k in enumerate(validator_keys, start=1):
        directory = out / f"validator-{i}"
        directory.mkdir(mode=0o700)
        directory.chmod(0o700)
        key_path = directory / "key"
        write_private(key_path, k.private_key.hex())
        pub_path = directory / "key.pub"
        pub_path.write_text("0x" + k.public_key + "\n", encoding="ascii")
        address_path = directory / "address"
        address_path.write_text(k.address + "\n", encoding="ascii")
        written.append(ValidatorFiles(directory, key_path, pub_path, address_path, k.address))
    genesis_path = out / "genesis.json"
    genesis_path.write_text(json.dumps(genesis, indent=2) + "\n", encoding="utf-8")
    return ConsortiumFiles(
        out_dir=out,
        client=client,
        chain_id=genesis["config"]["chainId"],
        genesis=genesis_path,
        validators=written,
        fault_tolerance=fault_tolerance(n),
    )
