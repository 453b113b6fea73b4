"""The gateway's connection to the fleet's contract: embedded chain or JSON-RPC node, one lock around it.

web3 is blocking and eth-tester is not thread-safe, while the gateway calls the chain from the relay, the
round controller and the read-only ``/rpc`` endpoint. Every call therefore goes through :meth:`ChainLink.call`,
which runs it in a worker thread under one lock: the asyncio loop never blocks on the chain, and the embedded
chain only ever sees one caller at a time. The pipelined relay keeps throughput (many txs per locked call).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.providers.eth_tester.middleware import filter_request_transformer, log_result_remapper

from blockdeepnet.fleet import Fleet
from blockdeepnet.ledger import Ledger, LedgerError, embedded_web3, rpc_web3
from blockdeepnet.logs import fields

log = logging.getLogger("bdn.gateway.chain")
T = TypeVar("T")

# The contract round's block deadline. The gateway closes rounds by wall clock and stops relaying a round's
# updates when it closes, so the on-chain deadline only has to lie beyond any round's life.
CHAIN_DEADLINE_BLOCKS = 1 << 40

# Read-only JSON-RPC methods the gateway serves for the embedded chain (devices check commits with these).
READ_ONLY_METHODS = frozenset(
    {
        "eth_chainId",
        "net_version",
        "eth_blockNumber",
        "eth_call",
        "eth_getLogs",
        "eth_getCode",
        "eth_getBlockByNumber",
        "eth_getTransactionReceipt",
        "eth_getTransactionByHash",
    }
)


_FEE_FIELDS = frozenset({"gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value"})


def load_gateway_key(path: Path) -> LocalAccount:
    """The gateway's Ethereum key: a hex file that only its owner may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise LedgerError(f"cannot read the gateway key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise LedgerError(f"gateway key {path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        account: LocalAccount = Account.from_key(text)
    except (ValueError, TypeError):
        raise LedgerError(f"gateway key {path} does not hold a hex secp256k1 private key") from None
    return account


class ChainLink:
    """The ledger plus the lock that serialises every use of it."""

    def __init__(self, ledger: Ledger, embedded: bool) -> None:
        self.ledger = ledger
        self.embedded = embedded
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, fleet: Fleet, account: LocalAccount, w3: Web3 | None = None) -> ChainLink:
        """Embedded: start an in-process chain and deploy the contract at the address ``fleet.json`` names
        (deterministic: the gateway key's first transaction). RPC: attach to the deployed contract."""
        if account.address != fleet.gateway:
            raise LedgerError(
                f"the gateway key is for {account.address}, but the fleet's gateway is {fleet.gateway}"
            )
        if fleet.chain.kind == "embedded":
            w3 = w3 or embedded_web3()
            ledger = Ledger.deploy(w3, account)
            if ledger.address != fleet.chain.contract:
                raise LedgerError(
                    f"the embedded chain put the contract at {ledger.address}, fleet.json expects "
                    f"{fleet.chain.contract}: the fleet file was made for another gateway key"
                )
            return cls(ledger, embedded=True)
        w3 = w3 or rpc_web3(fleet.chain.url, poa=fleet.chain.poa)
        ledger = Ledger(w3, fleet.chain.contract, account, chain_id=fleet.chain.chain_id)
        if not ledger.w3.eth.get_code(ledger.address):
            raise LedgerError(f"no contract at {ledger.address} on {fleet.chain.url}: deploy it first")
        return cls(ledger, embedded=False)

    def call_sync(self, fn: Callable[[Ledger], T]) -> T:
        with self._lock:
            return fn(self.ledger)

    async def call(self, fn: Callable[[Ledger], T]) -> T:
        return await asyncio.to_thread(self.call_sync, fn)

    def register_missing(self, devices: Iterable[tuple[str, int]]) -> list[tuple[str, str]]:
        """Register every (address, key share) the contract does not know yet; returns (address, tx hash)."""
        done = []
        for address, key_share in devices:
            registered, revoked, _ = self.call_sync(lambda lg, a=address: lg.device_info(a))
            if registered or revoked:
                continue
            receipt = self.call_sync(lambda lg, a=address, k=key_share: lg.register_device(a, k))
            tx = "0x" + bytes(receipt["transactionHash"]).hex()
            done.append((address, tx))
            log.info("registered device %s on chain", address, extra=fields(device=address, tx=tx))
        return done

    def read_only_request(self, method: str, params: list[Any]) -> dict[str, Any]:
        """Serve one read-only JSON-RPC request against the chain (the embedded one, for ``/rpc``)."""
        if method not in READ_ONLY_METHODS:
            return {"error": {"code": -32601, "message": f"method {method} is not served (read-only)"}}
        if method == "eth_call" and params and isinstance(params[0], dict):
            # eth-tester insists on a sender for calls and charges the call's gas to it; JSON-RPC nodes do
            # neither. A read needs no gas price: drop the fee fields and call from the gateway's address.
            call = {k: v for k, v in params[0].items() if k not in _FEE_FIELDS}
            call.setdefault("from", self.ledger.account.address)
            params = [{**call, "gas_price": 0}, *params[1:]]  # eth-tester spells it snake_case here
        if method == "eth_getLogs" and params and isinstance(params[0], dict):
            # A raw provider request skips web3's eth-tester middleware, which maps a filter to eth-tester's
            # snake_case (``fromBlock`` -> ``from_block``) and the logs back to JSON-RPC's camelCase.
            params = [filter_request_transformer(params[0]), *params[1:]]
        try:
            with self._lock:
                response: dict[str, Any] = dict(self.ledger.w3.provider.make_request(method, params))  # type: ignore[arg-type]
                if method == "eth_getLogs" and isinstance(response.get("result"), (list, tuple)):
                    response["result"] = [log_result_remapper(log) for log in response["result"]]
        except (
            Exception
        ) as exc:  # a malformed request must cost the caller an error, not the gateway a traceback
            return {"error": {"code": -32602, "message": f"{type(exc).__name__}: {exc}"[:300]}}
        return response
