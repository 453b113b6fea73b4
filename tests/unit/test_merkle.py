from __future__ import annotations

import itertools

import pytest
from eth_utils.crypto import keccak

from blockdeepnet import merkle

DEVICES = [f"0x{i:040x}" for i in range(1, 8)]


def _leaves(n: int, round_no: int = 1) -> list[bytes]:
    return [merkle.leaf(round_no, DEVICES[i], keccak(bytes([i]))) for i in range(n)]


def test_empty_and_single() -> None:
    assert merkle.root([]) == bytes(32)
    one = _leaves(1)
    assert merkle.root(one) == one[0]
    assert merkle.proof(one, one[0]) == []


def test_two_leaves_by_hand() -> None:
    a, b = _leaves(2)
    lo, hi = sorted((a, b))
    assert merkle.root([a, b]) == keccak(lo + hi)


def test_root_is_independent_of_order() -> None:
    leaves = _leaves(5)
    roots = {merkle.root(list(p)) for p in itertools.permutations(leaves)}
    assert len(roots) == 1


@pytest.mark.parametrize("n", range(1, 8))
def test_every_leaf_has_a_valid_proof(n: int) -> None:
    leaves = _leaves(n)
    top = merkle.root(leaves)
    for target in leaves:
        assert merkle.verify(top, target, merkle.proof(leaves, target))
    outsider = merkle.leaf(1, DEVICES[6], keccak(b"not included"))
    assert not merkle.verify(top, outsider, merkle.proof(leaves, leaves[0]))


def test_leaf_binds_round_device_and_payload() -> None:
    h = keccak(b"x")
    base = merkle.leaf(1, DEVICES[0], h)
    assert base != merkle.leaf(2, DEVICES[0], h)
    assert base != merkle.leaf(1, DEVICES[1], h)
    assert base != merkle.leaf(1, DEVICES[0], keccak(b"y"))
    assert merkle.root(_leaves(3, 1)) != merkle.root(_leaves(3, 2))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        merkle.leaf(1, DEVICES[0], b"short")
    leaves = _leaves(2)
    with pytest.raises(ValueError, match="duplicate"):
        merkle.root([*leaves, leaves[0]])
    with pytest.raises(ValueError, match="not one of the leaves"):
        merkle.proof(leaves, keccak(b"z"))
