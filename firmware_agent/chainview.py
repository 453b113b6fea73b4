"""Read-only check of a global block against the chain, with no account and no gas.

The gateway publishes the global block; the chain holds what it committed. Before a key holder decrypts an
aggregate, and before any device applies one, the block must match the commit:

- the round is committed, with ``aggregate_hash`` = keccak of the block's ciphertext bytes,
- the block's Merkle root is the committed root,
- the committed update count and sample total equal the block's device list and ``total_weight_num``
  (these set the decoder's slot bound and weight; a lie there would mis-scale the model),
- every listed device has an update recorded for the round, and the Merkle root over exactly those recorded
  (device, payload hash) leaves is the committed root, so the device list is the committed set.

Reads go through a :class:`Reader`: :class:`JsonRpcReader` speaks plain JSON-RPC over HTTP (a device: no web3,
which would cost it ~30 MB and ~0.6 s per start, see :mod:`blockdeepnet.contract`); an in-process demo or test
passes its embedded chain's web3 object, wrapped in :class:`Web3Reader`. Reads through one web3 object are
serialised, because several agents in one process may share it and eth-tester is not made for concurrent calls.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from eth_abi.exceptions import DecodingError
from eth_utils.address import to_checksum_address

from blockdeepnet import merkle
from blockdeepnet.contract import Artifact, RoundInfo
from blockdeepnet.wire import GlobalBlock

if TYPE_CHECKING:
    from web3 import Web3

_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_MAX_RPC_RESPONSE = 1 << 20


class Reader(Protocol):
    """The two reads a device needs: ``eth_call`` (latest block) and ``eth_chainId``. Failures to reach the
    node raise :class:`ChainUnavailable`."""

    def call(self, to: str, data: bytes) -> bytes: ...

    def chain_id(self) -> int: ...


class JsonRpcReader:
    """JSON-RPC over HTTP with the standard library (a node, or the gateway's read-only ``/rpc``)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        self._ids = itertools.count(1)

    def _request(self, method: str, params: list[Any]) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params})
        request = urllib.request.Request(self.url, body.encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read(_MAX_RPC_RESPONSE))
        except (urllib.error.URLError, OSError) as exc:
            raise ChainUnavailable(
                f"chain node unreachable at {self.url}: {getattr(exc, 'reason', exc)}"
            ) from exc
        except ValueError as exc:
            raise ChainUnavailable(
                f"chain read failed: {self.url} answered something that is not JSON"
            ) from exc
        if not isinstance(answer, dict) or "error" in answer or "result" not in answer:
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise ChainUnavailable(f"chain read failed: {method}: {error}")
        return answer["result"]

    def call(self, to: str, data: bytes) -> bytes:
        result = self._request("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"])
        try:
            return bytes.fromhex(str(result).removeprefix("0x"))
        except ValueError:
            raise ChainUnavailable(f"chain read failed: eth_call answered {str(result)[:40]!r}") from None

    def chain_id(self) -> int:
        result = self._request("eth_chainId", [])
        try:  # a JSON-RPC quantity: a hex string
            return int(str(result), 16)
        except ValueError:
            raise ChainUnavailable(f"chain read failed: eth_chainId answered {str(result)[:40]!r}") from None


class Web3Reader:
    """An in-process web3 object (the embedded chain of a demo or test)."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3

    def call(self, to: str, data: bytes) -> bytes:
        from web3.exceptions import Web3Exception

        try:
            return bytes(self.w3.eth.call({"to": to, "data": "0x" + data.hex()}))  # type: ignore[typeddict-item]
        except OSError as exc:
            raise ChainUnavailable(f"chain node unreachable: {exc}") from exc
        except Web3Exception as exc:
            raise ChainUnavailable(f"chain read failed: {type(exc).__name__}: {exc}") from exc

    def chain_id(self) -> int:
        return int(self.w3.eth.chain_id)


def _lock_for(w3: Any) -> threading.Lock:
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
    """Reads the BlockDeepNet contract at ``contract`` through a :class:`Reader` (or a web3 object)."""

    def __init__(
        self,
        source: Web3 | Reader,
        contract: str,
        *,
        chain_id: int | None = None,
        artifact: Artifact | None = None,
        commit_wait_s: float = 5.0,
        lock: threading.Lock | None = None,
    ) -> None:
        """``chain_id``: the fleet's chain; a node on another chain is refused at the first check.
        ``commit_wait_s``: how long to wait for a commit that a lagging node has not seen yet.
        ``lock``: held around every read; by default one lock per web3 object / reader, pass the owner's lock
        when the web3 object is also used by other code in this process (e.g. a gateway's embedded chain)."""
        self.reader: Reader = source if isinstance(source, JsonRpcReader | Web3Reader) else Web3Reader(source)  # type: ignore[arg-type]
        self.address = to_checksum_address(contract)
        self.artifact = artifact or Artifact.load()
        self.expected_chain_id = chain_id
        self.commit_wait_s = commit_wait_s
        self._lock = lock or _lock_for(getattr(self.reader, "w3", self.reader))
        self._chain_checked = False

    @classmethod
    def from_url(
        cls, url: str, contract: str, *, chain_id: int | None = None, poa: bool = False
    ) -> ChainView:
        """A view over plain JSON-RPC. ``poa`` (QBFT extraData) does not matter to ``eth_call``; it is accepted
        so a fleet's chain settings can be passed through unchanged."""
        del poa
        return cls(JsonRpcReader(url), contract, chain_id=chain_id)

    def _read(self, name: str, *args: Any) -> tuple[Any, ...]:
        data = self.artifact.encode_call(name, *args)
        with self._lock:
            raw = self.reader.call(self.address, data)
        if not raw:
            raise ChainUnavailable(
                f"chain read failed: no contract at {self.address} (an empty {name} result)"
            )
        try:
            return self.artifact.decode_result(name, raw)
        except DecodingError as exc:
            raise ChainUnavailable(f"chain read failed: {name} returned undecodable data: {exc}") from exc

    def _check_chain_id(self) -> None:
        if self._chain_checked or self.expected_chain_id is None:
            return
        with self._lock:
            actual = self.reader.chain_id()
        if actual != self.expected_chain_id:
            raise ChainUnavailable(
                f"the node is on chain {actual}, the fleet on chain {self.expected_chain_id}: wrong chain_rpc URL?"
            )
        self._chain_checked = True

    def round_info(self, round_no: int) -> RoundInfo:
        self._check_chain_id()
        r = self._read("getRound", round_no)
        return RoundInfo(bytes(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4]), bytes(r[5]), bytes(r[6]))

    def device_registered(self, device: str) -> tuple[bool, int]:
        """(registered and not revoked, key share index) as the contract records them."""
        self._check_chain_id()
        r = self._read("deviceInfo", to_checksum_address(device))
        return bool(r[0]) and not bool(r[1]), int(r[2])

    def recorded_payload_hash(self, round_no: int, device: str) -> bytes:
        return bytes(self._read("getUpdate", round_no, to_checksum_address(device))[0])

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
