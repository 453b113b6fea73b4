"""Read-only check of a global block against the chain, with no account and no gas.

The gateway publishes the global block; the chain holds what it committed. Before a key holder decrypts an
aggregate, and before any device applies one, the block must match the commit:

- the round is committed, with ``aggregate_hash`` = keccak of the block's ciphertext bytes,
- the block's Merkle root is the committed root,
- the committed update count and sample total equal the block's device list and ``total_weight_num``
  (these set the decoder's slot bound and weight; a lie there would mis-scale the model),
- every listed device has an update recorded for the round, and the Merkle root over exactly those recorded
  (device, payload hash) leaves is the committed root, so the device list is the committed set.

The web3 object is injectable: the CLI builds one from the RPC URL, an in-process demo or test passes its
embedded chain directly. Reads through one web3 object are serialised, because several agents in one process
may share it and eth-tester is not made for concurrent calls.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.exceptions import Web3Exception

from blockdeepnet import merkle
from blockdeepnet.ledger import Artifact, RoundInfo, rpc_web3
from blockdeepnet.wire import GlobalBlock

_LOCKS: weakref.WeakKeyDictionary[Web3, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(w3: Web3) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(w3)
        if lock is None:
            lock = _LOCKS[w3] = threading.Lock()
        return lock


class ChainUnavailable(Exception):
    """The node could not be asked (down, unreachable, timing out); the check should be retried later."""


class ChainCheckError(Exception):
    """The global block does not match what the chain committed; it must not be decrypted or applied."""

    def __init__(self, round_no: int, reason: str, *, retryable: bool = False) -> None:
        super().__init__(f"round {round_no}: {reason}")
        self.round = round_no
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class CheckedGlobal:
    """A global block the chain vouches for, and the base model its round built on."""

    round: int
    info: RoundInfo

    @property
    def base_model_hash(self) -> bytes:
        return self.info.base_model_hash


class ChainView:
    """Reads the BlockDeepNet contract at ``contract`` through ``w3``."""

    def __init__(
        self,
        w3: Web3,
        contract: str,
        *,
        chain_id: int | None = None,
        artifact: Artifact | None = None,
        commit_wait_s: float = 5.0,
        lock: threading.Lock | None = None,
    ) -> None:
        """``chain_id``: the fleet's chain; a node on another chain is refused at the first check.
        ``commit_wait_s``: how long to wait for a commit that a lagging node has not seen yet.
        ``lock``: held around every read; by default one lock per web3 object, pass the owner's lock when the
        web3 object is also used by other code in this process (e.g. a gateway's embedded chain)."""
        self.w3 = w3
        self.address = to_checksum_address(contract)
        self.contract = w3.eth.contract(address=self.address, abi=(artifact or Artifact.load()).abi)
        self.expected_chain_id = chain_id
        self.commit_wait_s = commit_wait_s
        self._lock = lock or _lock_for(w3)
        self._chain_checked = False

    @classmethod
    def from_url(
        cls, url: str, contract: str, *, chain_id: int | None = None, poa: bool = False
    ) -> ChainView:
        return cls(rpc_web3(url, poa=poa), contract, chain_id=chain_id)

    def _call(self, fn: Any) -> Any:
        try:
            with self._lock:
                return fn()
        except OSError as exc:  # requests / urllib3 / socket errors
            raise ChainUnavailable(f"chain node unreachable: {exc}") from exc
        except Web3Exception as exc:  # e.g. no contract at the address: an empty call result
            raise ChainUnavailable(f"chain read failed: {type(exc).__name__}: {exc}") from exc

    def _check_chain_id(self) -> None:
        if self._chain_checked or self.expected_chain_id is None:
            return
        actual = int(self._call(lambda: self.w3.eth.chain_id))
        if actual != self.expected_chain_id:
            raise ChainUnavailable(
                f"the node is on chain {actual}, the fleet on chain {self.expected_chain_id}: wrong chain_rpc URL?"
            )
        self._chain_checked = True

    def round_info(self, round_no: int) -> RoundInfo:
        self._check_chain_id()
        r = self._call(lambda: self.contract.functions.getRound(round_no).call())
        return RoundInfo(bytes(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4]), bytes(r[5]), bytes(r[6]))

    def device_registered(self, device: str) -> tuple[bool, int]:
        """(registered and not revoked, key share index) as the contract records them."""
        self._check_chain_id()
        r = self._call(lambda: self.contract.functions.deviceInfo(to_checksum_address(device)).call())
        return bool(r[0]) and not bool(r[1]), int(r[2])

    def recorded_payload_hash(self, round_no: int, device: str) -> bytes:
        return bytes(self._call(lambda: self.contract.functions.getUpdate(round_no, device).call()))

    def check_global(self, block: GlobalBlock, aggregate_hash: bytes) -> CheckedGlobal:
        """Raise :class:`ChainCheckError` unless ``block`` is exactly what round ``block.round`` committed."""
        r = block.round
        deadline = time.monotonic() + self.commit_wait_s
        info = self.round_info(r)
        while not info.committed and time.monotonic() < deadline:
            time.sleep(0.5)
            info = self.round_info(r)
        if not info.committed:
            raise ChainCheckError(r, "not committed on chain (yet)", retryable=True)
        if info.aggregate_hash != aggregate_hash:
            raise ChainCheckError(r, "aggregate hash differs from the committed one")
        if info.merkle_root != block.merkle_root:
            raise ChainCheckError(r, "Merkle root differs from the committed one")
        if info.count != len(block.devices):
            raise ChainCheckError(
                r, f"block lists {len(block.devices)} devices, chain committed {info.count}"
            )
        if info.total_samples != block.total_weight_num:
            raise ChainCheckError(
                r, f"block weighs {block.total_weight_num} samples, chain recorded {info.total_samples}"
            )
        leaves = []
        for device in block.devices:
            recorded = self.recorded_payload_hash(r, device)
            if recorded == bytes(32):
                raise ChainCheckError(r, f"device {device} has no update recorded on chain")
            leaves.append(merkle.leaf(r, device, recorded))
        if merkle.root(leaves) != info.merkle_root:
            raise ChainCheckError(
                r, "the recorded updates of the listed devices do not give the committed root"
            )
        return CheckedGlobal(r, info)
