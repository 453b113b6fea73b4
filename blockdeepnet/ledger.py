"""Typed client for the BlockDeepNet contract (learning + mining roles) over web3.py.

Two kinds of chain, one client:

- **embedded**: eth-tester on py-evm in this process, London rules, genesis base fee 0. The appliance's
  default; nothing to run or configure.
- **JSON-RPC**: any node. anvil (``--hardfork london --gas-price 0 --base-fee 0``) in tests and ``bdn chain
  dev``; Besu / GoQuorum QBFT in production (``poa=True`` installs the extraData middleware: QBFT headers carry
  the validator set there).

Every transaction is signed locally by the gateway key as a legacy (type 0) transaction with gasPrice 0: what a
permissioned QBFT chain accepts, and the same bytes on every backend. Nonces are managed here, so many
transactions can be in flight at once (:meth:`Ledger.send_many`), with receipts awaited in one pass.

A revert is decoded from the contract's custom errors into :class:`ContractRejected` whose ``error`` names the
Solidity error (``DuplicateSubmission``, ``LateSubmission``...). Transport failures are retried with
exponential backoff and then raised as :class:`LedgerUnavailable` with what to check.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted
from web3.types import Wei

from blockdeepnet.contract import ARTIFACT_ENV, DEFAULT_ARTIFACT, Artifact, LedgerError, RoundInfo

T = TypeVar("T")

__all__ = [
    "ARTIFACT_ENV",
    "DEFAULT_ARTIFACT",
    "Artifact",
    "LedgerError",
    "RoundInfo",
]  # moved to blockdeepnet.contract

DEFAULT_GAS_LIMIT = 500_000
EMBEDDED_CHAIN_ID = 131277322940537  # eth-tester's


class LedgerUnavailable(LedgerError):
    """The node could not be reached or kept failing after retries."""


class ContractRejected(LedgerError):
    """The contract reverted. ``error`` is the Solidity custom error name, ``args`` its decoded arguments."""

    def __init__(self, error: str, args: tuple[Any, ...] = (), tx_hash: str | None = None) -> None:
        shown = ", ".join(str(a) for a in args)
        super().__init__(f"contract rejected the transaction: {error}({shown})")
        self.error = error
        self.args_ = args
        self.tx_hash = tx_hash


@dataclass(frozen=True)
class SignedUpdate:
    """What the gateway relays for one device: the claim and the device's EIP-712 signature."""

    round: int
    device: str
    payload_hash: bytes
    samples: int
    compute_ms: int
    signature: bytes


@dataclass(frozen=True)
class RecordedEvent:
    device: str
    payload_hash: bytes
    tx_hash: bytes
    block_number: int
    log_index: int


def embedded_web3() -> Web3:
    """An in-process London chain with base fee 0 (eth-tester + py-evm), its first account funded."""
    from eth.vm.forks.london import LondonVM
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider

    params = PyEVMBackend.generate_genesis_params(overrides={"gas_limit": 30_000_000})
    params["base_fee_per_gas"] = 0  # py-evm starts London at 1 gwei; gasPrice-0 legacy txs need 0
    backend = PyEVMBackend(genesis_parameters=params, vm_configuration=((0, LondonVM),))
    return Web3(EthereumTesterProvider(EthereumTester(backend=backend)))


def rpc_web3(url: str, *, poa: bool = False, timeout: float = 10.0) -> Web3:
    """A JSON-RPC connection. ``poa`` for Besu / GoQuorum (QBFT/IBFT extraData)."""
    from web3 import HTTPProvider
    from web3.middleware import ExtraDataToPOAMiddleware

    w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": timeout}))
    if poa:
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
    return w3


def fund_from_node_account(w3: Web3, to: str, wei: int) -> None:
    """Dev chains only (eth-tester, anvil): pay ``wei`` to ``to`` from the node's first unlocked account."""
    tx = w3.eth.send_transaction(
        {"from": w3.eth.accounts[0], "to": to, "value": Wei(wei), "gasPrice": Wei(0), "gas": 21_000}
    )
    w3.eth.wait_for_transaction_receipt(tx)


def _revert_data(exc: BaseException) -> bytes | None:
    """The raw revert bytes of a failed call: web3 puts them in ``data`` (JSON-RPC nodes); eth-tester raises
    TransactionFailed with the bytes rendered as text, which web3's tester provider re-raises, chained."""
    seen: BaseException | None = exc
    while seen is not None:
        data = getattr(seen, "data", None)
        if isinstance(data, str) and data.startswith("0x"):
            return bytes.fromhex(data[2:])
        if seen.args and isinstance(seen.args[0], bytes):
            return seen.args[0]
        if seen.args and isinstance(seen.args[0], str):
            # eth-tester renders the revert bytes with repr(): "execution reverted: b'\\xae...'"
            text = seen.args[0].removeprefix("execution reverted: ")
            if text[:2] in ("b'", 'b"'):
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = None
                if isinstance(value, bytes):
                    return value
        seen = seen.__cause__ or seen.__context__
    return None


def _error_table(abi: Iterable[dict[str, Any]]) -> dict[bytes, tuple[str, list[str]]]:
    table: dict[bytes, tuple[str, list[str]]] = {}
    for item in abi:
        if item.get("type") == "error":
            types = [i["type"] for i in item.get("inputs", [])]
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            table[selector] = (item["name"], types)
    return table


class Ledger:
    """The gateway's view of one deployed BlockDeepNet contract."""

    def __init__(
        self,
        w3: Web3,
        address: str,
        account: LocalAccount,
        *,
        artifact: Artifact | None = None,
        retries: int = 5,
        backoff_s: float = 0.2,
        receipt_timeout_s: float = 60.0,
        chain_id: int | None = None,
    ) -> None:
        """``chain_id``: the chain this fleet is configured for; a node on any other chain is refused rather
        than having transactions signed for it."""
        self.w3 = w3
        self.artifact = artifact or Artifact.load()
        self.address = to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=self.artifact.abi)
        self.account = account
        self.retries = retries
        self.backoff_s = backoff_s
        self.receipt_timeout_s = receipt_timeout_s
        self._errors = _error_table(self.artifact.abi)
        self._chain_id = self._rpc(lambda: w3.eth.chain_id)
        if chain_id is not None and chain_id != self._chain_id:
            raise LedgerError(
                f"the node at this RPC URL is on chain {self._chain_id}, but the fleet is configured for chain "
                f"{chain_id}: check the RPC URL (or the configured chain id)"
            )
        self._nonce: int | None = None
        self.deploy_gas: int | None = None  # set by deploy(): the measured deployment gas

    # --- deployment ---------------------------------------------------------------------------------

    @classmethod
    def deploy(
        cls,
        w3: Web3,
        account: LocalAccount,
        *,
        data_reward_per_sample: int = 0,
        processing_reward: int = 0,
        artifact: Artifact | None = None,
        **kwargs: Any,
    ) -> Ledger:
        art = artifact or Artifact.load()
        factory = w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
        tx = factory.constructor(data_reward_per_sample, processing_reward).build_transaction(
            {
                "from": account.address,
                "gasPrice": 0,
                "gas": 3_000_000,
                "nonce": w3.eth.get_transaction_count(account.address),
                "chainId": w3.eth.chain_id,
            }
        )
        tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
        if receipt["status"] != 1 or receipt["contractAddress"] is None:
            raise LedgerError(f"contract deployment failed (tx {tx_hash.hex()})")
        ledger = cls(w3, receipt["contractAddress"], account, artifact=art, **kwargs)
        ledger.deploy_gas = int(receipt["gasUsed"])
        return ledger

    # --- transport --------------------------------------------------------------------------------------

    def _rpc(self, call: Callable[[], T]) -> T:
        """Run one node call, retrying transport failures with exponential backoff."""
        delay, attempts = self.backoff_s, self.retries
        for attempt in range(attempts + 1):
            try:
                return call()
            except (ContractLogicError, TransactionFailed, LedgerError):
                raise
            except OSError as exc:  # requests, urllib3 and socket errors all derive from it
                if attempt == attempts:
                    raise LedgerUnavailable(
                        f"chain node unreachable after {attempts + 1} attempts ({exc}); check the node is running "
                        "and the configured RPC URL"
                    ) from exc
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _decode(self, exc: Exception, tx_hash: str | None = None) -> ContractRejected:
        raw = _revert_data(exc)
        if raw is not None and len(raw) >= 4:
            name_types = self._errors.get(raw[:4])
            if name_types is not None:
                name, types = name_types
                return ContractRejected(name, tuple(abi_decode(types, raw[4:])), tx_hash)
        return ContractRejected(str(exc), (), tx_hash)

    def _next_nonce(self) -> int:
        if self._nonce is None:
            self._nonce = self._rpc(
                lambda: self.w3.eth.get_transaction_count(self.account.address, "pending")
            )
        nonce = self._nonce
        self._nonce += 1
        return nonce

    def _build(self, fn: Any, dry_run: bool = True, value: int = 0) -> dict[str, Any]:
        """Build a transaction. With ``dry_run`` it is executed first as a call, so a revert surfaces here,
        decoded, before any nonce is spent (one extra round trip)."""
        if dry_run:
            try:
                self._rpc(
                    lambda: fn.call({"from": self.account.address, "value": Wei(value), "gasPrice": Wei(0)})
                )
            except (ContractLogicError, TransactionFailed) as exc:
                raise self._decode(exc) from None
        tx: dict[str, Any] = fn.build_transaction(
            {
                "from": self.account.address,
                "gas": DEFAULT_GAS_LIMIT,
                "gasPrice": 0,
                "nonce": 0,
                "chainId": self._chain_id,
                "value": value,
            }
        )
        tx["nonce"] = self._next_nonce()
        return tx

    def _send(self, tx: dict[str, Any]) -> bytes:
        raw = self.account.sign_transaction(tx).raw_transaction
        try:
            return bytes(self._rpc(lambda: self.w3.eth.send_raw_transaction(raw)))
        except (ContractLogicError, TransactionFailed) as exc:
            self._nonce = None  # the node did not take it: resynchronise the nonce
            raise self._decode(exc) from None
        except LedgerError:
            self._nonce = None
            raise

    def _wait(self, tx_hash: bytes) -> dict[str, Any]:
        try:
            receipt = self._rpc(
                lambda: self.w3.eth.wait_for_transaction_receipt(
                    HexBytes(tx_hash), timeout=self.receipt_timeout_s, poll_latency=0.01
                )
            )
        except TimeExhausted as exc:
            raise LedgerUnavailable(
                f"no receipt for {tx_hash.hex()} after {self.receipt_timeout_s} s"
            ) from exc
        if receipt["status"] != 1:
            raise ContractRejected("Reverted", (), "0x" + tx_hash.hex())
        return dict(receipt)

    def transact(self, fn: Any, value: int = 0) -> dict[str, Any]:
        """Send one transaction (paying ``value`` wei) and wait for its receipt."""
        return self._wait(self._send(self._build(fn, value=value)))

    def send_many(self, fns: Sequence[Any]) -> list[dict[str, Any] | ContractRejected]:
        """Pipelined: send every transaction with consecutive local nonces and no dry run, then await all
        receipts. A reverted one is replayed as a call on the state before its block to name the error."""
        hashes = [self._send(self._build(fn, dry_run=False)) for fn in fns]
        out: list[dict[str, Any] | ContractRejected] = []
        for fn, tx_hash in zip(fns, hashes, strict=True):
            try:
                out.append(self._wait(tx_hash))
            except ContractRejected as rejected:
                out.append(self._explain(fn, tx_hash, rejected))
        return out

    def _explain(self, fn: Any, tx_hash: bytes, rejected: ContractRejected) -> ContractRejected:
        receipt = self._rpc(lambda: self.w3.eth.get_transaction_receipt(HexBytes(tx_hash)))
        before = max(int(receipt["blockNumber"]) - 1, 0)
        try:
            self._rpc(
                lambda: fn.call({"from": self.account.address, "gasPrice": Wei(0)}, block_identifier=before)
            )
        except (ContractLogicError, TransactionFailed) as exc:
            return self._decode(exc, "0x" + tx_hash.hex())
        return rejected  # it only fails after earlier transactions of the same block: no better name

    # --- the contract's operations ------------------------------------------------------------------

    def register_device(self, device: str, key_share_index: int = 0) -> dict[str, Any]:
        return self.transact(
            self.contract.functions.registerDevice(to_checksum_address(device), key_share_index)
        )

    def revoke_device(self, device: str) -> dict[str, Any]:
        return self.transact(self.contract.functions.revokeDevice(to_checksum_address(device)))

    def open_round(self, round_no: int, base_model_hash: bytes, deadline_block: int) -> dict[str, Any]:
        return self.transact(self.contract.functions.openRound(round_no, base_model_hash, deadline_block))

    def submit_call(self, u: SignedUpdate) -> Any:
        """The contract call that records ``u`` (for :meth:`send_many` batches)."""
        return self.contract.functions.submitUpdate(
            u.round, to_checksum_address(u.device), u.payload_hash, u.samples, u.compute_ms, u.signature
        )

    def is_recorded(self, u: SignedUpdate) -> bool:
        """True when exactly this update is already on chain (resending it is then a no-op, not an error)."""
        stored: bytes = self._rpc(
            lambda: self.contract.functions.getUpdate(u.round, to_checksum_address(u.device)).call()
        )
        return bytes(stored) == u.payload_hash

    def submit_update(self, u: SignedUpdate) -> dict[str, Any] | None:
        """Relay one signed update. Returns the receipt, or None when it was already on chain."""
        if self.is_recorded(u):
            return None
        return self.transact(self.submit_call(u))

    def submit_updates(self, updates: Sequence[SignedUpdate]) -> list[dict[str, Any] | None]:
        """Relay many updates pipelined. Sent optimistically: an update that turns out to be on chain already
        (a resend after a crash) comes back as None, not as an error; any other rejection is raised once every
        receipt is in (the rest stand, and a resubmission is idempotent)."""
        results = self.send_many([self.submit_call(u) for u in updates])
        out: list[dict[str, Any] | None] = []
        first_error: ContractRejected | None = None
        for u, result in zip(updates, results, strict=True):
            if isinstance(result, dict):
                out.append(result)
            elif result.error == "DuplicateSubmission" and self.is_recorded(u):
                out.append(None)
            else:
                first_error = first_error or result
                out.append(None)
        if first_error is not None:
            raise first_error
        return out

    def commit_global(
        self, round_no: int, aggregate_hash: bytes, merkle_root: bytes, count: int
    ) -> dict[str, Any]:
        return self.transact(
            self.contract.functions.commitGlobal(round_no, aggregate_hash, merkle_root, count)
        )

    def commit_tx(self, round_no: int) -> bytes | None:
        """The transaction that committed ``round_no``'s global block, or None: lets a restarted gateway
        finish a round whose commit it sent but never saw confirmed."""
        event = self.contract.events.GlobalCommitted
        logs = self._rpc(lambda: event.get_logs(from_block=0, argument_filters={"round": round_no}))
        return bytes(logs[0]["transactionHash"]) if logs else None

    def withdraw(self) -> dict[str, Any]:
        return self.transact(self.contract.functions.withdraw())

    # --- reads -----------------------------------------------------------------------------------------

    def get_round(self, round_no: int) -> RoundInfo:
        r = self._rpc(lambda: self.contract.functions.getRound(round_no).call())
        return RoundInfo(bytes(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4]), bytes(r[5]), bytes(r[6]))

    def recorded_updates(self, round_no: int, from_block: int = 0) -> list[tuple[str, bytes]]:
        """(device, payload hash) of every update the contract accepted in ``round_no``, in chain order."""
        event = self.contract.events.UpdateSubmitted
        logs = self._rpc(lambda: event.get_logs(from_block=from_block, argument_filters={"round": round_no}))
        return [(str(log["args"]["device"]), bytes(log["args"]["payloadHash"])) for log in logs]

    def update_events(self, round_no: int, from_block: int = 0) -> list[RecordedEvent]:
        """Every UpdateSubmitted event of ``round_no`` with where it landed, in chain order: lets a restarted
        relay find the transaction of an update it sent but never saw confirmed."""
        event = self.contract.events.UpdateSubmitted
        logs = self._rpc(lambda: event.get_logs(from_block=from_block, argument_filters={"round": round_no}))
        return [
            RecordedEvent(
                device=str(log["args"]["device"]),
                payload_hash=bytes(log["args"]["payloadHash"]),
                tx_hash=bytes(log["transactionHash"]),
                block_number=int(log["blockNumber"]),
                log_index=int(log["logIndex"]),
            )
            for log in logs
        ]

    def device_info(self, device: str) -> tuple[bool, bool, int]:
        r = self._rpc(lambda: self.contract.functions.deviceInfo(to_checksum_address(device)).call())
        return bool(r[0]), bool(r[1]), int(r[2])

    def balance_of(self, account: str) -> int:
        return int(self._rpc(lambda: self.contract.functions.balanceOf(to_checksum_address(account)).call()))

    def block_number(self) -> int:
        return int(self._rpc(lambda: self.w3.eth.block_number))

    def chain_id(self) -> int:
        return int(self._chain_id)


def new_gateway_account() -> LocalAccount:
    """A fresh gateway key (provisioning stores it sealed; never logged)."""
    acct: LocalAccount = Account.create()
    return acct


__all__ = [
    "Artifact",
    "ContractRejected",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "RecordedEvent",
    "RoundInfo",
    "SignedUpdate",
    "embedded_web3",
    "fund_from_node_account",
    "new_gateway_account",
    "rpc_web3",
]
