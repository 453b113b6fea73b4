"""`bdn bench crypto` on a small key and vector: every key present and the figures consistent (no timings)."""

from __future__ import annotations

import math

import pytest

from bench.crypto import run
from blockdeepnet.crypto.codec import SlotLayout

KEYS = {
    "params",
    "ciphertexts",
    "bytes_per_param",
    "encrypt_s",
    "encrypt_cold_s",
    "pool_precompute_s_per_ct",
    "aggregate_10_s",
    "aggregate_100_s",
    "partial_decrypt_s",
    "combine_s",
    "max_abs_error",
    "naive_encrypt_s",
    "speedup",
}


@pytest.mark.timeout(180)
def test_bench_crypto_small() -> None:
    result = run(key_bits=512, params=3000, naive_sample=3)
    assert KEYS <= set(result)
    layout = SlotLayout(512, max_devices=100)
    assert result["ciphertexts"] == math.ceil(3000 / layout.slots_per_ciphertext)
    assert result["bytes_per_param"] == pytest.approx(result["ciphertexts"] * 128 / 3000)
    assert 0 < result["max_abs_error"] <= result["error_bound"]
    assert result["speedup"] == pytest.approx(result["naive_encrypt_s"] / result["encrypt_cold_s"])
    for key in KEYS - {"params", "ciphertexts", "bytes_per_param", "max_abs_error"}:
        assert result[key] > 0, key
