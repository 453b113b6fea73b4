"""`bdn bench crypto`: packed threshold Paillier on one full-size update, one core.

Baseline (same run): python-paillier encrypting one EncryptedNumber per parameter, timed on a sample and
extrapolated to the whole update. ``reference_powmod_ms`` times one bare powmod of a partial decryption's size
in the same run: shared hosts vary by 1.5x from hour to hour, so partial_decrypt_ms_per_ct is read against it. Partial decryptions of the other holders, needed only to have t real
shares to combine, run in a 2-process pool and are not timed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import gmpy2
import numpy as np

from blockdeepnet.crypto.codec import SlotLayout, sample_weight
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.paillier import PublicKey
from blockdeepnet.crypto.randomness import FixedBaseTable, OnTheSpot, RandomnessPool
from blockdeepnet.crypto.threshold import KeyShare, PartialDecryption, combine, deal, verify_partial
from blockdeepnet.crypto.vector import decode_aggregate, encrypt_update

FLEET = 100
DEVICES = 10
THRESHOLD, HOLDERS = 6, 10


def _partial(share: dict[str, Any], cts: list[Any], context: bytes) -> PartialDecryption:
    return KeyShare.from_dict(share).partial_decrypt(cts, context)


def _naive_phe_seconds_per_value(pub: PublicKey, sample: int) -> float:
    from phe import paillier as phe_paillier

    phe_pub = phe_paillier.PaillierPublicKey(int(pub.n))
    values = np.random.default_rng(1).normal(0, 0.01, sample)
    t0 = time.perf_counter()
    for v in values:
        phe_pub.encrypt(float(v))
    return (time.perf_counter() - t0) / sample


def _reference_powmod_s(pub: PublicKey, exponent_bits: int, count: int = 20) -> float:
    """One full-size powmod mod n^2, timed now: this host's speed, to read partial_decrypt_s against."""
    rng = np.random.default_rng(3)
    base = gmpy2.mpz(int.from_bytes(rng.bytes(pub.ciphertext_bytes), "big")) % pub.nsquare
    exponent = gmpy2.mpz(int.from_bytes(rng.bytes((exponent_bits + 7) // 8), "big"))
    t0 = time.perf_counter()
    for _ in range(count):
        gmpy2.powmod(base, exponent, pub.nsquare)
    return (time.perf_counter() - t0) / count


def run(
    key_bits: int = 2048,
    params: int = 252_398,
    naive_sample: int = 20,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    say = log or (lambda _msg: None)
    rng = np.random.default_rng(2019)
    say(f"dealing a {key_bits}-bit key, t={THRESHOLD} of l={HOLDERS}...")
    t0 = time.perf_counter()
    tpk, shares = deal(THRESHOLD, HOLDERS, key_bits, allow_insecure=key_bits < 2048)
    keygen_s = time.perf_counter() - t0
    pub = tpk.public_key
    layout = SlotLayout(key_bits, max_devices=FLEET)
    n_ct = layout.ciphertexts_for(params)

    samples = rng.integers(1000, 4000, DEVICES)
    weights = [sample_weight(int(s), int(samples.sum())) for s in samples]
    updates = [
        rng.normal(0, 0.02, params).clip(-layout.clip, layout.clip).astype(np.float32) for _ in range(DEVICES)
    ]

    t0 = time.perf_counter()
    table = FixedBaseTable(pub)
    table_s = time.perf_counter() - t0

    say("cold encryption (randomness computed on the spot)...")
    t0 = time.perf_counter()
    first = encrypt_update(layout, pub, OnTheSpot(table), updates[0], weights[0])
    encrypt_cold_s = time.perf_counter() - t0

    say(f"precomputing the randomness pool ({n_ct} entries per update)...")
    pool = RandomnessPool(table)
    t0 = time.perf_counter()
    pool.fill(n_ct)
    pool_per_ct = (time.perf_counter() - t0) / n_ct
    t0 = time.perf_counter()
    second = encrypt_update(layout, pub, pool, updates[1], weights[1])
    encrypt_s = time.perf_counter() - t0
    assert pool.misses == 0, "the warm-pool measurement computed randomness on the spot"

    vectors = [first, second]
    for i in range(2, DEVICES):
        pool.fill(n_ct)
        vectors.append(encrypt_update(layout, pub, pool, updates[i], weights[i]))

    say("aggregating 10 and 100 updates...")
    t0 = time.perf_counter()
    acc = Accumulator(pub, n_ct, FLEET)
    for v in vectors:
        acc.add(v)
    aggregate = acc.result()
    aggregate_10_s = time.perf_counter() - t0
    # 100 updates: the 10 real ones folded ten times each (same cost per fold; only the time is used).
    t0 = time.perf_counter()
    acc100 = Accumulator(pub, n_ct)
    for i in range(FLEET):
        acc100.add(vectors[i % DEVICES])
    aggregate_100_s = time.perf_counter() - t0

    context = b"bench/crypto"
    say("partial decryption by one key holder (the bottleneck)...")
    t0 = time.perf_counter()
    own = shares[0].partial_decrypt(aggregate, context)
    partial_decrypt_s = time.perf_counter() - t0

    reference_powmod_s = _reference_powmod_s(pub, int((2 * tpk.delta * pub.n * pub.n).bit_length()))

    say(f"the other {THRESHOLD - 1} holders decrypt in parallel (not timed)...")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as ex:
        others = list(
            ex.map(
                _partial,
                [s.to_dict() for s in shares[1:THRESHOLD]],
                [aggregate] * (THRESHOLD - 1),
                [context] * (THRESHOLD - 1),
            )
        )
    partials = [own, *others]

    t0 = time.perf_counter()
    for p in partials:
        verify_partial(tpk, aggregate, p, context)
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = combine(tpk, aggregate, partials, context, verify=False)
    combine_s = time.perf_counter() - t0

    mean = decode_aggregate(layout, result.plaintexts, params, sum(weights), DEVICES)
    exact = sum(w * u.astype(np.float64) for w, u in zip(weights, updates, strict=True)) / sum(weights)
    max_abs_error = float(np.max(np.abs(mean - exact)))

    say(f"baseline: python-paillier, one EncryptedNumber per value ({naive_sample} values timed)...")
    naive_per_value = _naive_phe_seconds_per_value(pub, naive_sample)
    naive_encrypt_s = naive_per_value * params
    return {
        "params": params,
        "key_bits": key_bits,
        "ciphertexts": n_ct,
        "slots_per_ciphertext": layout.slots_per_ciphertext,
        "slot_bits": layout.slot_bits,
        "bytes_per_param": n_ct * pub.ciphertext_bytes / params,
        "encrypt_s": encrypt_s,
        "encrypt_cold_s": encrypt_cold_s,
        "pool_precompute_s_per_ct": pool_per_ct,
        "table_build_s": table_s,
        "aggregate_10_s": aggregate_10_s,
        "aggregate_100_s": aggregate_100_s,
        "partial_decrypt_s": partial_decrypt_s,
        "partial_decrypt_ms_per_ct": partial_decrypt_s / n_ct * 1e3,
        "reference_powmod_ms": reference_powmod_s * 1e3,
        "combine_s": combine_s,
        "verify_shares_s": verify_s,
        "threshold": THRESHOLD,
        "holders": HOLDERS,
        "keygen_s": keygen_s,
        "max_abs_error": max_abs_error,
        "error_bound": layout.error_bound(sum(weights), DEVICES),
        "naive_encrypt_s": naive_encrypt_s,
        "naive_s_per_value": naive_per_value,
        "speedup": naive_encrypt_s / encrypt_cold_s,
    }
