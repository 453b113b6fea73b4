"""Fixed-point quantization and slot packing: layout, round trips, weighting, dropout, overflow detection."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
from gmpy2 import mpz

from blockdeepnet.crypto.codec import (
    CodecRangeError,
    SlotLayout,
    SlotOverflowError,
    decode,
    encode,
    pack,
    quantize,
    sample_weight,
    unpack,
)
from blockdeepnet.crypto.paillier import PrivateKey, PublicKey, generate_keypair

KEY_BITS = 512
EPS = 1e-12  # float slack on top of the analytic error bound


@pytest.fixture(scope="module")
def layout() -> SlotLayout:
    # 19-bit slots (18 value bits + 1 guard bit), 26 per 512-bit plaintext, 2^18 - 100 = 262,044 levels.
    return SlotLayout(KEY_BITS, value_bits=18, clip=2.0)


@pytest.fixture(scope="module")
def keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(KEY_BITS, allow_insecure=True)


def add_plaintexts(vectors: Sequence[Sequence[mpz]]) -> list[mpz]:
    """What homomorphic addition does to the packed plaintexts (as long as they stay below n)."""
    return [sum(col, mpz(0)) for col in zip(*vectors, strict=True)]


def slot_sum(layout: SlotLayout, plaintexts: Sequence[mpz], length: int) -> np.ndarray:
    return unpack(layout, plaintexts, length)[:length]


def set_slot(layout: SlotLayout, plaintexts: list[mpz], index: int, value: int) -> list[mpz]:
    """Overwrite the slot holding parameter ``index`` (no carries: the value must fit in slot_bits)."""
    out = list(plaintexts)
    k, j = divmod(index, layout.slots_per_ciphertext)
    shift = j * layout.slot_bits
    mask = ((1 << layout.slot_bits) - 1) << shift
    out[k] = (out[k] & ~mpz(mask)) | (mpz(value) << shift)
    return out


# --- layout -----------------------------------------------------------------------------------------------


def test_layout_for_2048_bit_keys_with_defaults() -> None:
    lay = SlotLayout(2048)
    assert (lay.value_bits, lay.clip, lay.max_devices, lay.guard_bits) == (16, 1.0, 100, 1)
    assert lay.slot_bits == 17  # 16 value bits + 1 guard bit
    assert lay.slots_per_ciphertext == 120  # 2047 // 17
    assert lay.levels == 65_436  # 2^16 - 100
    assert lay.step == 2.0 / 65_436
    assert lay.ciphertexts_for(120) == 1
    assert lay.ciphertexts_for(121) == 2
    assert lay.ciphertexts_for(1) == 1
    assert lay.ciphertexts_for(240) == 2
    assert lay.ciphertexts_for(252_398) == 2104  # the paper's CNN: 2103 full plaintexts + 38 slots


def test_slot_and_error_bounds(layout: SlotLayout) -> None:
    # Honest maximum: levels * W from the values plus at most half a unit of rounding per summand.
    levels = 2**18 - 100
    assert layout.levels == levels == 262_044
    assert layout.step == 4.0 / levels
    assert layout.slot_bound(1.0, 100) == levels + 50 == 262_094
    assert layout.slot_bound(1.0, 1) == levels == 262_044
    assert layout.slot_bound(0.5, 3) == levels // 2 + 1 == 131_023
    assert layout.slot_bound(0.25, 10) == levels // 4 + 5 == 65_516
    # Even the loosest honest bound leaves the top value bit's headroom and the guard bit unused.
    assert layout.slot_bound(1.0, layout.max_devices) < 2**18
    assert layout.error_bound(1.0, 1) == 2.0 / levels
    assert layout.error_bound(0.5, 4) == 4 * 2.0 / levels / 0.5


def test_layout_for_512_bit_test_keys(layout: SlotLayout) -> None:
    assert layout.slot_bits == 19
    assert layout.slots_per_ciphertext == 26  # 511 // 19
    assert layout.levels == 262_044


@pytest.mark.parametrize(
    ("key_bits", "value_bits", "max_devices", "guard_bits", "slot_bits"),
    [
        (2048, 18, 100, 1, 19),
        (2048, 16, 1000, 1, 17),
        (2048, 16, (1 << 16) - 2, 1, 17),  # the fewest levels allowed: 2
        (512, 10, 5, 2, 12),
        (1024, 30, 100, 3, 33),
        (3072, 24, 50, 1, 25),
        (256, 52, 1, 11, 63),  # the widest slot allowed
        (18, 16, 100, 1, 17),  # a key just wide enough for one slot
    ],
)
def test_layout_derivation(
    key_bits: int, value_bits: int, max_devices: int, guard_bits: int, slot_bits: int
) -> None:
    lay = SlotLayout(key_bits, value_bits=value_bits, max_devices=max_devices, guard_bits=guard_bits)
    assert lay.slot_bits == slot_bits
    assert lay.slots_per_ciphertext == (key_bits - 1) // slot_bits
    assert lay.slots_per_ciphertext * lay.slot_bits <= key_bits - 1
    # The widest packable plaintext (every slot all-ones) stays below 2^(key_bits - 1) <= n.
    full = pack(lay, np.full(lay.slots_per_ciphertext, (1 << lay.slot_bits) - 1, dtype=np.uint64))
    assert len(full) == 1
    assert full[0] < mpz(1) << (key_bits - 1)
    assert full[0].bit_length() == lay.slots_per_ciphertext * lay.slot_bits


def test_packed_plaintext_always_below_half_the_key_space() -> None:
    lay = SlotLayout(2048)
    rng = np.random.default_rng(1)
    for values in (np.full(250, lay.clip), rng.uniform(-lay.clip, lay.clip, 250), np.full(250, -lay.clip)):
        pts = encode(lay, values, 1.0)
        assert len(pts) == 3
        assert all(0 <= p < mpz(1) << 2047 for p in pts)
    # The largest possible honest aggregate, max_devices summands at +clip, still fits.
    agg = add_plaintexts([encode(lay, np.full(250, lay.clip), 1.0 / lay.max_devices)] * lay.max_devices)
    assert all(p < mpz(1) << 2047 for p in agg)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"value_bits": 1},
        {"value_bits": 53},
        {"clip": 0.0},
        {"clip": -1.0},
        {"clip": math.inf},
        {"clip": math.nan},
        {"max_devices": 0},
        {"max_devices": -5},
        {"guard_bits": 0},
        {"value_bits": 52, "guard_bits": 12},  # 64-bit slot
        {"value_bits": 40, "guard_bits": 24},  # 64-bit slot
        {"value_bits": 40, "max_devices": 1 << 40},  # no levels left
        {"key_bits": 17},  # cannot hold a single 17-bit slot
        {"key_bits": 0},
    ],
)
def test_bad_layout_parameters_raise(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"key_bits": 512, **kwargs}
    with pytest.raises(ValueError):
        SlotLayout(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value_bits", "max_devices"),
    [(6, 63), (6, 64), (6, 1000), (2, 3), (2, 4), (16, (1 << 16) - 1), (16, 1 << 16), (52, (1 << 52) - 1)],
)
def test_too_few_levels_for_the_fleet_raises(value_bits: int, max_devices: int) -> None:
    assert (1 << value_bits) - max_devices < 2
    with pytest.raises(
        ValueError, match=f"value_bits={value_bits} leaves no levels for max_devices={max_devices}"
    ):
        SlotLayout(2048, value_bits=value_bits, max_devices=max_devices)


@pytest.mark.parametrize(("value_bits", "max_devices"), [(6, 62), (2, 2), (16, (1 << 16) - 2)])
def test_two_levels_is_the_smallest_layout(value_bits: int, max_devices: int) -> None:
    lay = SlotLayout(2048, value_bits=value_bits, max_devices=max_devices)
    assert lay.levels == 2
    assert lay.slot_bits == value_bits + 1
    assert lay.step == lay.clip  # 2C / 2
    assert quantize(lay, np.array([-lay.clip, 0.0, lay.clip]), 1.0).tolist() == [0, 1, 2]


def test_layout_dict_round_trip() -> None:
    lay = SlotLayout(2048, value_bits=16, clip=1.5, max_devices=40, guard_bits=2)
    d = lay.to_dict()
    assert d == {"key_bits": 2048, "value_bits": 16, "clip": 1.5, "max_devices": 40, "guard_bits": 2}
    back = SlotLayout.from_dict(json.loads(json.dumps(d)))
    assert back == lay
    assert back.slot_bits == lay.slot_bits
    assert back.slots_per_ciphertext == lay.slots_per_ciphertext


def test_layout_from_dict_defaults_guard_bits() -> None:
    lay = SlotLayout.from_dict({"key_bits": 1024, "value_bits": 18, "clip": 2, "max_devices": 100})
    assert lay == SlotLayout(1024, value_bits=18, clip=2.0)
    assert lay.guard_bits == 1


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"key_bits": 2048},
        {"key_bits": 2048, "value_bits": 18, "clip": 2.0},
        {"key_bits": "abc", "value_bits": 18, "clip": 2.0, "max_devices": 100},
        {"key_bits": 2048, "value_bits": None, "clip": 2.0, "max_devices": 100},
        {"key_bits": 2048, "value_bits": 18, "clip": "wide", "max_devices": 100},
        {"key_bits": 2048, "value_bits": 60, "clip": 2.0, "max_devices": 100},
        {"key_bits": 2048, "value_bits": 18, "clip": -2.0, "max_devices": 100},
    ],
)
def test_malformed_layout_dict_raises_value_error(data: object) -> None:
    with pytest.raises(ValueError):
        SlotLayout.from_dict(data)  # type: ignore[arg-type]


# --- quantize / pack / unpack -----------------------------------------------------------------------------


def test_quantize_exact_values() -> None:
    lay = SlotLayout(
        512, value_bits=4, clip=1.0, max_devices=4
    )  # levels = 16 - 4 = 12: scale = 12 / 2 = 6 per unit
    assert lay.levels == 12
    # (x + 1) * 6 = 0, 12, 6, 6.48, 6.54, 2.4; at weight 0.5 half of that: 0, 6, 3, 3.24, 3.27, 1.2
    x = np.array([-1.0, 1.0, 0.0, 0.08, 0.09, -0.6])
    assert quantize(lay, x, 1.0).tolist() == [0, 12, 6, 6, 7, 2]
    assert quantize(lay, x, 0.5).tolist() == [0, 6, 3, 3, 3, 1]
    assert quantize(lay, x, 1.0).dtype == np.uint64


def test_quantize_flattens_multidimensional_input(layout: SlotLayout) -> None:
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    assert quantize(layout, x, 1.0).tolist() == quantize(layout, x.ravel(), 1.0).tolist()
    assert quantize(layout, x, 1.0).shape == (12,)


def test_pack_layout_is_little_endian_slots(layout: SlotLayout) -> None:
    w, s = layout.slot_bits, layout.slots_per_ciphertext
    slots = np.arange(1, s + 3, dtype=np.uint64)  # spills two values into a second plaintext
    pts = pack(layout, slots)
    assert len(pts) == 2
    assert pts[0] == sum(mpz(i + 1) << (i * w) for i in range(s))
    assert pts[1] == mpz(s + 1) + (mpz(s + 2) << w)


def test_pack_unpack_round_trip(layout: SlotLayout) -> None:
    rng = np.random.default_rng(7)
    assert layout.slots_per_ciphertext == 26
    for length in (1, 25, 26, 27, 60, 78):
        slots = rng.integers(0, 1 << layout.slot_bits, length, dtype=np.uint64)
        slots[0] = (1 << layout.slot_bits) - 1
        pts = pack(layout, slots)
        assert len(pts) == layout.ciphertexts_for(length)
        out = unpack(layout, pts, length)
        assert len(out) == len(pts) * layout.slots_per_ciphertext
        assert out[:length].tolist() == slots.tolist()
        assert not out[length:].any()


# --- encode / decode --------------------------------------------------------------------------------------


def test_single_device_round_trip_within_error_bound(layout: SlotLayout) -> None:
    rng = np.random.default_rng(11)
    x = rng.uniform(-layout.clip, layout.clip, 60)
    pts = encode(layout, x, 1.0)
    assert len(pts) == 3
    out = decode(layout, pts, 60, 1.0, 1)
    assert out.shape == (60,)
    assert out.dtype == np.float64
    bound = layout.error_bound(1.0, 1)
    assert bound == layout.clip / (2**layout.value_bits - layout.max_devices)
    assert np.max(np.abs(out - x)) <= bound + EPS
    assert np.max(np.abs(out - x)) > 0  # quantization is real: the check above is not vacuous


def test_grid_values_quantize_exactly(layout: SlotLayout) -> None:
    levels = 2**18 - 100
    x = np.array([-layout.clip, layout.clip, 0.0, layout.step, -3 * layout.step, 1.0])
    assert quantize(layout, x, 1.0).tolist() == [
        0,
        levels,
        levels // 2,
        levels // 2 + 1,
        levels // 2 - 3,
        3 * levels // 4,
    ]


def test_grid_values_round_trip_exactly_when_the_step_is_a_power_of_two() -> None:
    # levels = 2^18 - 2^17 = 2^17, step = 4 / 2^17 = 2^-15: every grid value and every decode step is exact in float.
    lay = SlotLayout(KEY_BITS, value_bits=18, clip=2.0, max_devices=1 << 17)
    assert lay.levels == 1 << 17
    assert lay.step == 2.0**-15
    x = np.array([-lay.clip, lay.clip, 0.0, lay.step, -3 * lay.step, 1.0])
    assert quantize(lay, x, 1.0).tolist() == [0, 1 << 17, 1 << 16, (1 << 16) + 1, (1 << 16) - 3, 3 << 15]
    out = decode(lay, encode(lay, x), len(x), 1.0, 1)
    assert out.tolist() == x.tolist()


def test_weighted_sum_of_ten_devices_equals_weighted_mean(layout: SlotLayout) -> None:
    rng = np.random.default_rng(2024)
    samples = np.array([5, 900, 37, 250, 1, 64, 480, 13, 777, 3])
    total = int(samples.sum())
    weights = [sample_weight(int(s), total) for s in samples]
    values = rng.uniform(-layout.clip, layout.clip, (10, 60))
    agg = add_plaintexts([encode(layout, values[k], weights[k]) for k in range(10)])
    w_total = math.fsum(weights)
    out = decode(layout, agg, 60, w_total, 10)
    expected = np.average(values, axis=0, weights=samples)
    bound = layout.error_bound(w_total, 10)
    assert np.max(np.abs(out - expected)) <= bound + EPS
    # The weighting matters far beyond the error bound: the plain mean is a different answer.
    assert np.max(np.abs(values.mean(axis=0) - expected)) > 100 * bound


def test_dropout_is_corrected_by_total_weight(layout: SlotLayout) -> None:
    rng = np.random.default_rng(5)
    samples = rng.integers(10, 1000, 10)
    total = int(samples.sum())
    weights = np.array([sample_weight(int(s), total) for s in samples])
    values = rng.uniform(-1.5, 1.5, (10, 30))
    present = [0, 2, 3, 6, 7, 9]
    agg = add_plaintexts([encode(layout, values[k], float(weights[k])) for k in present])
    w_present = math.fsum(weights[present])
    assert 0.2 < w_present < 0.95
    out = decode(layout, agg, 30, w_present, len(present))
    expected = np.average(values[present], axis=0, weights=samples[present])
    bound = layout.error_bound(w_present, len(present))
    assert np.max(np.abs(out - expected)) <= bound + EPS
    # Decoding as if nobody dropped out would be badly wrong.
    uncorrected = decode(layout, agg, 30, 1.0, len(present))
    assert np.max(np.abs(uncorrected - expected)) > 100 * bound


def _round_half_even(numerator: int, denominator: int) -> int:
    """rint(numerator / denominator) in exact integer arithmetic (np.rint rounds half to even)."""
    q, r = divmod(numerator, denominator)
    return q + (2 * r > denominator or (2 * r == denominator and q % 2 == 1))


def _worst_case_weights(max_devices: int, value_bits: int) -> list[float]:
    """max_devices exactly representable weights summing to exactly 1 whose slot values round *up* where possible.

    levels = 2^18 - 100 = 262,044 and w_k = u_k / 2^25, so w_k * levels = u_k * 262,044 / 2^25 is exact in float.
    u = 335,424 gives 2619 + 16,789,248 / 2^25 (fractional part 0.50036 > 1/2): 99 devices round up to 2620 and
    the remaining weight rounds down, so the slot sum is levels + 49 -- the largest an honest sum can reach, since
    the 100 exact parts add up to exactly levels and each rounding adds strictly less than 1/2.
    """
    assert (max_devices, value_bits) == (100, 18)
    units = [335_424] * 99
    units.append((1 << 25) - sum(units))
    assert units[-1] == 347_456
    assert sum(units) == 1 << 25
    weights = [u / (1 << 25) for u in units]
    assert math.fsum(weights) == 1.0 and sum(weights) == 1.0
    return weights


def test_worst_case_all_at_clip_with_max_devices_encrypted(
    layout: SlotLayout, keypair: tuple[PublicKey, PrivateKey]
) -> None:
    pub, priv = keypair
    weights = _worst_case_weights(layout.max_devices, layout.value_bits)
    length = 30
    half = np.where(np.arange(length) % 2 == 0, layout.clip, -layout.clip)
    for values, expected_slot in (
        (np.full(length, layout.clip), 99 * 2620 + 2713),  # 262,044 + 49: every possible round-up
        (np.full(length, -layout.clip), 0),
        (half, None),
    ):
        encs = []
        for w in weights:
            pts = encode(layout, values, w)
            encs.append([pub.encrypt(p) for p in pts])
        agg_c = [math.prod(col) % pub.nsquare for col in zip(*encs, strict=True)]
        agg = [priv.decrypt(c) for c in agg_c]
        assert all(p < mpz(1) << (KEY_BITS - 1) for p in agg)
        slots = slot_sum(layout, agg, length)
        assert slots.max() <= layout.slot_bound(1.0, layout.max_devices)
        assert slots.max() < 1 << (layout.slot_bits - layout.guard_bits)  # guard bit clear
        if expected_slot is not None:
            assert slots.tolist() == [expected_slot] * length
        out = decode(layout, agg, length, 1.0, layout.max_devices)
        assert np.max(np.abs(out - values)) <= layout.error_bound(1.0, layout.max_devices) + EPS
    assert _round_half_even(335_424 * 262_044, 1 << 25) == 2620
    assert _round_half_even(347_456 * 262_044, 1 << 25) == 2713
    assert 99 * 2620 + 2713 == 2**18 - 100 + 49 < 2**18


def _round_up_units(levels: int, devices: int, denominator_bits: int = 25) -> list[int]:
    """Numerators u_k (weights u_k / 2^D, summing to exactly 2^D) that push an all-at-+clip slot sum to its maximum.

    devices - 1 equal weights whose exact slot value u * levels / 2^D has the smallest fractional part above 1/2
    (each rounds up by almost 1/2); the last device takes the remaining weight. Pure integer arithmetic.
    """
    denominator, half = 1 << denominator_bits, 1 << (denominator_bits - 1)
    u = np.arange(1, denominator // devices + 1, dtype=np.int64)
    frac = (u * levels) % denominator
    above = np.where(frac > half, frac - half, denominator)
    best = int(u[int(np.argmin(above))])
    assert (best * levels) % denominator > half
    units = [best] * (devices - 1)
    units.append(denominator - sum(units))
    assert units[-1] > 0 and sum(units) == denominator
    return units


@pytest.mark.parametrize(
    ("key_bits", "value_bits", "clip", "max_devices", "levels", "expected_slot"),
    [
        (2048, 16, 1.0, 100, 65_436, 65_436 + 49),  # the defaults
        (512, 18, 2.0, 100, 262_044, 262_044 + 49),  # the test fixture
        (512, 7, 1.0, 64, 64, 64 + 31),  # headroom as large as the levels
        (1024, 10, 0.5, 24, 1000, 1000 + 11),
    ],
)
def test_honest_worst_case_sum_stays_below_value_bits(
    key_bits: int, value_bits: int, clip: float, max_devices: int, levels: int, expected_slot: int
) -> None:
    lay = SlotLayout(key_bits, value_bits=value_bits, clip=clip, max_devices=max_devices)
    assert lay.levels == levels == 2**value_bits - max_devices
    units = _round_up_units(levels, max_devices)
    weights = [u / (1 << 25) for u in units]
    assert sum(weights) == 1.0 and math.fsum(weights) == 1.0
    # Independently: the slot sum is the sum of each device's rint(w_k * levels), and it can exceed levels by at
    # most max_devices / 2 - 1 (each rounding adds < 1/2 and the exact parts add up to exactly levels).
    independent = sum(_round_half_even(u * levels, 1 << 25) for u in units)
    assert independent == expected_slot == levels + max_devices // 2 - 1
    length = lay.slots_per_ciphertext + 3  # two plaintexts, the second mostly padding
    agg = add_plaintexts([encode(lay, np.full(length, clip), w) for w in weights])
    assert all(p < mpz(1) << (key_bits - 1) for p in agg)
    slots = unpack(lay, agg, length)
    assert slots[:length].tolist() == [expected_slot] * length
    assert not slots[length:].any()
    assert expected_slot < 2**value_bits  # strictly below: no carry into the guard bit
    assert not np.any(slots >> np.uint64(value_bits))  # guard bit zero in every slot
    for k, p in enumerate(agg):  # ... and, read straight off the plaintext, at every slot position
        used = min(lay.slots_per_ciphertext, length - k * lay.slots_per_ciphertext)
        assert all(not p.bit_test(j * lay.slot_bits + value_bits) for j in range(used))
    assert expected_slot <= lay.slot_bound(1.0, max_devices) == levels + max_devices // 2
    out = decode(lay, agg, length, 1.0, max_devices)
    assert np.max(np.abs(out - clip)) <= lay.error_bound(1.0, max_devices) + EPS


@pytest.mark.parametrize("bad", [2.0000001, -2.0000001, 3.0, -100.0, 1e300])
def test_values_beyond_clip_are_refused(layout: SlotLayout, bad: float) -> None:
    x = np.zeros(10)
    x[3] = bad
    with pytest.raises(CodecRangeError, match="index 3"):
        encode(layout, x, 0.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(layout: SlotLayout, bad: float) -> None:
    x = np.zeros(10)
    x[7] = bad
    with pytest.raises(CodecRangeError, match="value 7"):
        encode(layout, x, 1.0)


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.0000001, 2.0, math.nan, math.inf, -math.inf])
def test_bad_weights_are_refused(layout: SlotLayout, weight: float) -> None:
    with pytest.raises(CodecRangeError, match="weight"):
        encode(layout, np.zeros(5), weight)


def test_clip_boundary_is_accepted(layout: SlotLayout) -> None:
    x = np.array([2.0, -2.0])
    assert quantize(layout, x, 1.0).tolist() == [2**18 - 100, 0]
    out = decode(layout, encode(layout, x, 1.0), 2, 1.0, 1)
    assert out[1] == -2.0
    assert abs(out[0] - 2.0) <= layout.error_bound(1.0, 1)
    # With a power-of-two step (levels = 2^17) the boundary decodes exactly.
    dyadic = SlotLayout(KEY_BITS, value_bits=18, clip=2.0, max_devices=1 << 17)
    assert decode(dyadic, encode(dyadic, x, 1.0), 2, 1.0, 1).tolist() == [2.0, -2.0]


def test_sample_weight() -> None:
    assert sample_weight(3, 10) == 0.3
    assert sample_weight(10, 10) == 1.0
    for samples, total in [(0, 10), (-1, 10), (11, 10), (1, 0), (5, -5)]:
        with pytest.raises(CodecRangeError):
            sample_weight(samples, total)


def test_error_types_are_value_errors() -> None:
    assert issubclass(CodecRangeError, ValueError)
    assert issubclass(SlotOverflowError, ValueError)


# --- decode-side validation -------------------------------------------------------------------------------


def _honest_aggregate(layout: SlotLayout, length: int, devices: int = 3) -> tuple[list[mpz], float]:
    rng = np.random.default_rng(99)
    weights = [1.0 / devices] * devices
    vecs = [encode(layout, rng.uniform(-1, 1, length), w) for w in weights]
    return add_plaintexts(vecs), math.fsum(weights)


@pytest.mark.parametrize("index", [0, 3, 25, 26, 30, 59])
def test_tampered_slot_above_bound_names_the_parameter(layout: SlotLayout, index: int) -> None:
    agg, w = _honest_aggregate(layout, 60)
    decode(layout, agg, 60, w, 3)  # honest aggregate is accepted
    bound = layout.slot_bound(w, 3)
    at_bound = set_slot(layout, agg, index, bound)
    assert decode(layout, at_bound, 60, w, 3)[index] == pytest.approx(
        (bound * layout.step - layout.clip * w) / w
    )
    tampered = set_slot(layout, agg, index, bound + 1)
    with pytest.raises(SlotOverflowError) as info:
        decode(layout, tampered, 60, w, 3)
    assert info.value.indices == [index]
    assert f"first parameter {index}" in str(info.value)


def test_several_tampered_slots_all_named(layout: SlotLayout) -> None:
    agg, w = _honest_aggregate(layout, 60)
    tampered = agg
    for index in (41, 2, 26):
        tampered = set_slot(layout, tampered, index, (1 << layout.slot_bits) - 1)
    with pytest.raises(SlotOverflowError) as info:
        decode(layout, tampered, 60, w, 3)
    assert info.value.indices == [2, 26, 41]


def test_nonzero_padding_slot_raises(layout: SlotLayout) -> None:
    agg, w = _honest_aggregate(layout, 30)  # second plaintext: 4 used slots, 22 padding slots
    for pad_index in (30, 51):
        tampered = set_slot(layout, agg, pad_index, 1)
        with pytest.raises(SlotOverflowError, match="padding") as info:
            decode(layout, tampered, 30, w, 3)
        assert info.value.indices == []


def test_plaintext_wider_than_layout_raises(layout: SlotLayout) -> None:
    agg, w = _honest_aggregate(layout, 30)
    nbytes = (layout.slots_per_ciphertext * layout.slot_bits + 7) // 8
    for extra in (mpz(1) << (8 * nbytes), mpz(1) << (KEY_BITS - 1)):
        with pytest.raises(SlotOverflowError):
            decode(layout, [agg[0] + extra, agg[1]], 30, w, 3)
    with pytest.raises(SlotOverflowError):
        decode(layout, [agg[0], mpz(-1)], 30, w, 3)


def test_bits_between_last_slot_and_byte_boundary_raise(layout: SlotLayout) -> None:
    used = layout.slots_per_ciphertext * layout.slot_bits
    assert used == 494  # 26 slots of 19 bits: bits 494, 495 share the last byte with the top slot
    agg, w = _honest_aggregate(layout, 30)
    with pytest.raises(SlotOverflowError):
        decode(layout, [agg[0] | (mpz(1) << used), agg[1]], 30, w, 3)


def test_plaintext_count_must_match_length(layout: SlotLayout) -> None:
    agg, w = _honest_aggregate(layout, 30)
    with pytest.raises(ValueError, match="cannot hold"):
        decode(layout, agg, 60, w, 3)
    with pytest.raises(ValueError, match="cannot hold"):
        decode(layout, agg[:1], 30, w, 3)
    with pytest.raises(ValueError, match="cannot hold"):
        decode(layout, agg, 26, w, 3)


@pytest.mark.parametrize(
    ("total_weight", "count"), [(0.0, 3), (-0.5, 3), (1.01, 3), (math.nan, 3), (1.0, 0), (1.0, 101)]
)
def test_decode_rejects_bad_weight_or_count(layout: SlotLayout, total_weight: float, count: int) -> None:
    agg, _ = _honest_aggregate(layout, 30)
    with pytest.raises(CodecRangeError):
        decode(layout, agg, 30, total_weight, count)
