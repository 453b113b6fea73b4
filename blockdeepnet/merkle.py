"""Merkle root of a round's accepted updates: the commitment the gateway puts on chain with the aggregate.

Leaf = keccak256(abi.encode(round, device, payloadHash)): binding the round and device into the leaf means a
root cannot be replayed for another round or have updates swapped between devices. Leaves are sorted, and each
inner node hashes its two children in sorted order (the OpenZeppelin MerkleProof convention), so the root
depends only on the *set* of accepted updates, not on arrival order, and a device can check its inclusion
with a proof of log2(n) hashes. An odd node is carried up unchanged. The root of no updates is 32 zero bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

EMPTY_ROOT = bytes(32)


def leaf(round_no: int, device: str, payload_hash: bytes) -> bytes:
    if len(payload_hash) != 32:
        raise ValueError(f"payload hash must be 32 bytes, got {len(payload_hash)}")
    return keccak(
        abi_encode(["uint64", "address", "bytes32"], [round_no, to_checksum_address(device), payload_hash])
    )


def _parent(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a <= b else keccak(b + a)


def _next_level(level: Sequence[bytes]) -> list[bytes]:
    return [
        _parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)
    ]


def root(leaves: Iterable[bytes]) -> bytes:
    level = sorted(leaves)
    if not level:
        return EMPTY_ROOT
    if len(set(level)) != len(level):
        raise ValueError("duplicate leaves: one device can contribute one update per round")
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def proof(leaves: Iterable[bytes], target: bytes) -> list[bytes]:
    """The sibling hashes from ``target`` up to the root (empty for a single leaf)."""
    level = sorted(leaves)
    if target not in level:
        raise ValueError("target is not one of the leaves")
    index = level.index(target)
    path: list[bytes] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        level = _next_level(level)
        index //= 2
    return path


def verify(root_hash: bytes, target: bytes, path: Sequence[bytes]) -> bool:
    node = target
    for sibling in path:
        node = _parent(node, sibling)
    return node == root_hash
