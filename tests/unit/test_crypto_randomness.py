"""Fixed-base table for h_s^a and the single-use randomness pool."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

import gmpy2
import pytest
from gmpy2 import mpz

from blockdeepnet.crypto.paillier import DJN_EXPONENT_BITS, PrivateKey, PublicKey, generate_keypair
from blockdeepnet.crypto.randomness import FixedBaseTable, RandomnessPool

BITS = 512


@pytest.fixture(scope="module")
def keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def table(keypair: tuple[PublicKey, PrivateKey]) -> FixedBaseTable:
    return FixedBaseTable(keypair[0])


def recording_pool(table: FixedBaseTable) -> tuple[RandomnessPool, list[mpz]]:
    """A pool whose table remembers every value it computes (thread-safe list appends)."""
    produced: list[mpz] = []
    inner: Callable[[], mpz] = table.random_factor

    class RecordingTable:
        public_key = table.public_key

        def random_factor(self) -> mpz:
            value = inner()
            produced.append(value)
            return value

    return RandomnessPool(RecordingTable()), produced  # type: ignore[arg-type]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# --- FixedBaseTable ---------------------------------------------------------------------------------------


def test_table_power_matches_powmod_for_random_exponents(table: FixedBaseTable) -> None:
    pub = table.public_key
    for bits in (1, 7, 8, 9, 64, 200, DJN_EXPONENT_BITS):
        a = secrets.randbits(bits)
        assert table.power(a) == gmpy2.powmod(pub.hs, a, pub.nsquare), bits


@pytest.mark.parametrize(
    "a",
    [
        0,
        1,
        2,
        255,
        256,
        257,
        (1 << 8) - 1,
        1 << 440,
        (1 << DJN_EXPONENT_BITS) - 1,
        (1 << DJN_EXPONENT_BITS) - 2,
    ],
)
def test_table_power_edge_exponents(table: FixedBaseTable, a: int) -> None:
    pub = table.public_key
    assert table.power(a) == gmpy2.powmod(pub.hs, a, pub.nsquare)


def test_table_power_zero_and_one(table: FixedBaseTable) -> None:
    assert table.power(0) == 1
    assert table.power(1) == table.public_key.hs


@pytest.mark.parametrize("a", [-1, 1 << DJN_EXPONENT_BITS, (1 << DJN_EXPONENT_BITS) + 5])
def test_table_power_out_of_range_raises(table: FixedBaseTable, a: int) -> None:
    with pytest.raises(ValueError, match="range"):
        table.power(a)


@pytest.mark.parametrize(("exponent_bits", "window"), [(100, 1), (100, 5), (64, 12), (33, 4), (10, 3)])
def test_table_other_windows(keypair: tuple[PublicKey, PrivateKey], exponent_bits: int, window: int) -> None:
    """Windows that do not divide the exponent size must still cover the top bits."""
    pub = keypair[0]
    t = FixedBaseTable(pub, exponent_bits=exponent_bits, window=window)
    for a in (0, 1, (1 << exponent_bits) - 1, secrets.randbits(exponent_bits), 1 << (exponent_bits - 1)):
        assert t.power(a) == gmpy2.powmod(pub.hs, a, pub.nsquare)
    with pytest.raises(ValueError):
        t.power(1 << exponent_bits)


@pytest.mark.parametrize("window", [0, 13, -1])
def test_table_rejects_bad_window(keypair: tuple[PublicKey, PrivateKey], window: int) -> None:
    with pytest.raises(ValueError, match="window"):
        FixedBaseTable(keypair[0], window=window)


def test_table_random_factor_is_fresh_nth_power(
    table: FixedBaseTable, keypair: tuple[PublicKey, PrivateKey]
) -> None:
    pub, priv = keypair
    values = [table.random_factor() for _ in range(20)]
    assert len(set(values)) == 20
    for r in values:
        assert 0 < r < pub.nsquare
        assert priv.decrypt(r) == 0  # an n-th power is an encryption of 0


# --- RandomnessPool ---------------------------------------------------------------------------------------


def test_fill_adds_exactly_count_entries(table: FixedBaseTable) -> None:
    pool, produced = recording_pool(table)
    assert len(pool) == 0
    pool.fill(7)
    assert len(pool) == 7
    assert len(produced) == 7
    pool.fill(3)
    assert len(pool) == 10
    pool.fill(0)
    assert len(pool) == 10
    assert pool.hits == 0 and pool.misses == 0


def test_fill_reports_progress(table: FixedBaseTable) -> None:
    pool = RandomnessPool(table)
    seen: list[int] = []
    pool.fill(5, progress=seen.append)
    assert seen == [5]
    assert len(pool) == 5


def test_fill_rejects_negative_count(table: FixedBaseTable) -> None:
    pool = RandomnessPool(table)
    with pytest.raises(ValueError):
        pool.fill(-1)
    assert len(pool) == 0


def test_take_pops_each_entry_exactly_once(table: FixedBaseTable) -> None:
    pool, produced = recording_pool(table)
    pool.fill(12)
    filled = list(produced)
    taken = []
    for i in range(12):
        taken.append(pool.take())
        assert len(pool) == 11 - i
        assert pool.hits == i + 1
    assert pool.misses == 0
    assert taken == filled  # FIFO, every precomputed entry handed out once
    assert len(set(taken)) == 12


def test_empty_pool_falls_back_to_fresh_values(
    table: FixedBaseTable, keypair: tuple[PublicKey, PrivateKey]
) -> None:
    pool, produced = recording_pool(table)
    pool.fill(4)
    before = [pool.take() for _ in range(4)]
    assert pool.hits == 4 and pool.misses == 0 and len(pool) == 0
    fresh = [pool.take() for _ in range(5)]
    assert pool.misses == 5
    assert pool.hits == 4
    assert len(pool) == 0
    assert len(produced) == 9  # each miss computed a new value
    assert len(set(before + fresh)) == 9  # never recycles an entry handed out before
    pub, priv = keypair
    for r in fresh:
        assert priv.decrypt(pub.encrypt_with(17, r)) == 17


def test_take_many(table: FixedBaseTable) -> None:
    pool = RandomnessPool(table)
    pool.fill(3)
    values = pool.take_many(5)
    assert len(values) == 5
    assert len(set(values)) == 5
    assert pool.hits == 3 and pool.misses == 2
    assert pool.take_many(0) == []


def test_concurrent_take_never_hands_out_an_entry_twice(table: FixedBaseTable) -> None:
    pool, produced = recording_pool(table)
    pool.fill(120)
    filled = set(produced)
    threads, per_thread = 4, 40  # 160 takes: 120 hits + 40 misses
    barrier = threading.Barrier(threads)
    results: list[list[mpz]] = [[] for _ in range(threads)]

    def worker(k: int) -> None:
        barrier.wait()
        for _ in range(per_thread):
            results[k].append(pool.take())

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    taken = [v for r in results for v in r]
    assert len(taken) == threads * per_thread
    assert len(set(taken)) == len(taken)
    assert pool.hits == 120 and pool.misses == 40
    assert len(pool) == 0
    assert filled <= set(taken)  # every precomputed entry was used exactly once


def test_background_refill_reaches_target_and_stops(table: FixedBaseTable) -> None:
    pool, produced = recording_pool(table)
    target = 15
    pool.start_background_refill(target)
    try:
        assert wait_until(lambda: len(pool) >= target)
        time.sleep(0.15)
        assert len(pool) == target  # tops up to the target, never beyond
        pool.start_background_refill(target)  # already running: no second producer
        taken = [pool.take() for _ in range(5)]
        assert pool.hits == 5 and pool.misses == 0
        assert wait_until(lambda: len(pool) == target)
        time.sleep(0.15)
        assert len(pool) == target
        assert len(produced) == target + 5
    finally:
        pool.stop_background_refill()
    assert not any(t.name == "bdn-randomness-pool" and t.is_alive() for t in threading.enumerate())
    count = len(produced)
    more = [pool.take() for _ in range(4)]
    time.sleep(0.2)
    assert len(pool) == target - 4  # no refill after stop
    assert len(produced) == count
    assert len(set(taken + more)) == 9


def test_background_refill_can_restart(table: FixedBaseTable) -> None:
    pool = RandomnessPool(table)
    pool.start_background_refill(3)
    try:
        assert wait_until(lambda: len(pool) == 3)
    finally:
        pool.stop_background_refill()
    pool.take_many(3)
    assert len(pool) == 0
    pool.start_background_refill(4)
    try:
        assert wait_until(lambda: len(pool) == 4)
    finally:
        pool.stop_background_refill()
    assert len(pool) == 4


def test_encryption_with_pool_randomness_decrypts(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    pool = RandomnessPool.for_key(pub)
    assert pool.public_key is pub
    pool.fill(6)
    messages = [0, 1, 42, int(pub.n) - 1, secrets.randbelow(int(pub.n)), 42]
    cs = [pub.encrypt_with(m, pool.take()) for m in messages]
    assert [priv.decrypt(c) for c in cs] == messages
    assert cs[2] != cs[5]  # same plaintext, different randomness
    c_miss = pub.encrypt_with(7, pool.take())
    assert pool.misses == 1
    assert priv.decrypt(c_miss) == 7
