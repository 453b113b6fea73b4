"""Fixed-point quantization and slot packing of model updates into Paillier plaintexts.

Layout (one plaintext = one ciphertext)::

    plaintext = sum_{j < S} v_j * 2^(j * slot_bits)        S = slots_per_ciphertext = (|n| - 1) // slot_bits
    slot_bits = value_bits + guard_bits                     levels = 2^value_bits - max_devices

Parameter i sits in ciphertext i // S, slot i % S. Unused slots of the last plaintext are zero.
All S * slot_bits bits lie below 2^(|n| - 1) <= n, so the packed value is always a valid plaintext.

Encoding (device k, Eq. 4 weight w_k = s_k / s applied *before* encryption)::

    v_k = rint(w_k * (x + C) * levels / (2C))       x outside [-C, C] is refused, never wrapped

so 0 <= v_k <= w_k * levels + 1/2. The gateway multiplies ciphertexts (adds slots). For any set of included
devices with sum(w_k) = W <= 1 every slot sum stays <= levels * W + count/2 < 2^value_bits: the headroom
reserved for rounding is max_devices levels, no carry can reach the next slot, and the guard bit(s) of an
honest sum are always zero. Pre-scaling by the weight is what keeps the headroom this small (otherwise it would
be log2(total samples) bits per slot).

Decoding::

    mean = (V * 2C / levels - C * W) / W          (W < 1 when devices dropped out: one scalar corrects it)

Error bound: each device's rounding is at most half a step, so |mean - sum_k w_k x_k / W| <= count * C / levels / W.
A slot above its bound (a dishonest device encrypting out-of-range values) raises :class:`SlotOverflowError`
instead of being applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from gmpy2 import mpz


class CodecRangeError(ValueError):
    """An input value or weight lies outside what the layout can carry without overflow."""


class SlotOverflowError(ValueError):
    """A decrypted slot exceeds the bound an honest weighted sum can reach; the aggregate is not applied."""

    def __init__(self, message: str, indices: Sequence[int]) -> None:
        super().__init__(message)
        self.indices = list(indices)


@dataclass(frozen=True)
class SlotLayout:
    """Quantization and packing parameters shared by the whole fleet (announced with each round)."""

    key_bits: int
    value_bits: int = 16
    clip: float = 1.0
    max_devices: int = 100
    guard_bits: int = 1
    slot_bits: int = field(init=False)
    slots_per_ciphertext: int = field(init=False)

    def __post_init__(self) -> None:
        if not 2 <= self.value_bits <= 52:
            raise ValueError(f"value_bits must be 2..52, got {self.value_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if self.max_devices < 1:
            raise ValueError(f"max_devices must be >= 1, got {self.max_devices}")
        if self.guard_bits < 1:
            raise ValueError("at least one guard bit is required to detect overflow")
        if (1 << self.value_bits) - self.max_devices < 2:
            raise ValueError(
                f"value_bits={self.value_bits} leaves no levels for max_devices={self.max_devices}"
            )
        slot_bits = self.value_bits + self.guard_bits
        if slot_bits > 63:
            raise ValueError(f"slot of {slot_bits} bits exceeds 63; lower value_bits or guard_bits")
        slots = (self.key_bits - 1) // slot_bits
        if slots < 1:
            raise ValueError(f"a {self.key_bits}-bit key cannot hold one {slot_bits}-bit slot")
        object.__setattr__(self, "slot_bits", slot_bits)
        object.__setattr__(self, "slots_per_ciphertext", slots)

    @property
    def levels(self) -> int:
        """Quantization levels of one device at full weight; the rest of 2^value_bits is rounding headroom."""
        return (1 << self.value_bits) - self.max_devices

    @property
    def step(self) -> float:
        """Quantization step of one slot unit."""
        return 2.0 * self.clip / self.levels

    def ciphertexts_for(self, length: int) -> int:
        return -(-length // self.slots_per_ciphertext)

    def slot_bound(self, total_weight: float, count: int) -> int:
        """Largest slot value an honest sum of ``count`` updates with total weight W can reach."""
        return math.floor(self.levels * total_weight + count / 2 + 1e-9 * self.levels)

    def error_bound(self, total_weight: float, count: int) -> float:
        """Worst-case absolute error of a decoded weighted mean (see module docstring)."""
        return count * (self.clip / self.levels) / total_weight

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["slot_bits"], d["slots_per_ciphertext"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlotLayout:
        try:
            return cls(
                key_bits=int(data["key_bits"]),
                value_bits=int(data["value_bits"]),
                clip=float(data["clip"]),
                max_devices=int(data["max_devices"]),
                guard_bits=int(data.get("guard_bits", 1)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed slot layout: {exc}") from exc


def sample_weight(samples: int, total_samples: int) -> float:
    """Eq. 4 weight s_k / s of one device, validated."""
    if samples <= 0 or total_samples <= 0 or samples > total_samples:
        raise CodecRangeError(f"invalid sample counts {samples} of {total_samples}")
    return samples / total_samples


def quantize(layout: SlotLayout, values: np.ndarray, weight: float) -> np.ndarray:
    """Slot values (uint64) for one device's weighted update; refuses anything that could overflow."""
    if not (math.isfinite(weight) and 0.0 < weight <= 1.0):
        raise CodecRangeError(f"weight must be in (0, 1], got {weight}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        bad = int(np.flatnonzero(~np.isfinite(x))[0])
        raise CodecRangeError(f"value {bad} is not finite")
    over = np.abs(x) > layout.clip
    if np.any(over):
        bad = int(np.flatnonzero(over)[0])
        raise CodecRangeError(
            f"{int(over.sum())} value(s) exceed the clip range ±{layout.clip} (first: index {bad} = {x[bad]:.6g}); "
            "refusing rather than wrapping into a neighbouring slot"
        )
    scale = weight * layout.levels / (2.0 * layout.clip)
    return np.rint((x + layout.clip) * scale).astype(np.uint64)


_PACK_ROWS = 64
"""Plaintexts handled per step by :func:`pack` / :func:`unpack`. Their bit matrices cost 8 bytes per bit as
uint64 (a whole 2048-bit update at once is ~70 MB); 64 rows keep it near 1 MB (issue 6: the agent's peak RSS on a
Raspberry Pi 3 must stay under 150 MB) at no measurable cost in speed."""


def pack(layout: SlotLayout, slots: np.ndarray) -> list[mpz]:
    """Pack slot values into plaintext integers, little-endian slot order (vectorized bit shuffling)."""
    s, w = layout.slots_per_ciphertext, layout.slot_bits
    count = layout.ciphertexts_for(len(slots))
    padded = np.zeros(count * s, dtype="<u8")
    padded[: len(slots)] = slots
    out: list[mpz] = []
    for first in range(0, count, _PACK_ROWS):
        rows = min(_PACK_ROWS, count - first)
        chunk = padded[first * s : (first + rows) * s]
        # Little-endian bytes of each slot -> its low w bits -> one bit row per plaintext -> bytes.
        bits = np.unpackbits(chunk.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :w]
        packed = np.packbits(bits.reshape(rows, s * w), axis=1, bitorder="little")
        out.extend(mpz(int.from_bytes(row.tobytes(), "little")) for row in packed)
    return out


def unpack(layout: SlotLayout, plaintexts: Sequence[int | mpz], length: int) -> np.ndarray:
    """Inverse of :func:`pack`; returns all slots (including padding) as uint64."""
    s, w = layout.slots_per_ciphertext, layout.slot_bits
    nbytes = (s * w + 7) // 8
    if len(plaintexts) != layout.ciphertexts_for(length):
        raise ValueError(f"{len(plaintexts)} plaintexts cannot hold exactly {length} values")
    values = np.empty(len(plaintexts) * s, dtype=np.uint64)
    shifts = np.arange(w, dtype=np.uint64)
    for first in range(0, len(plaintexts), _PACK_ROWS):
        chunk = plaintexts[first : first + _PACK_ROWS]
        try:
            raw = b"".join(int(p).to_bytes(nbytes, "little") for p in chunk)
        except OverflowError as exc:
            raise SlotOverflowError("a plaintext is wider than the slot layout", []) from exc
        bits = np.unpackbits(
            np.frombuffer(raw, dtype=np.uint8).reshape(len(chunk), nbytes), axis=1, bitorder="little"
        )
        if np.any(bits[:, s * w :]):
            raise SlotOverflowError("bits set above the last slot", [])
        wide = bits[:, : s * w].reshape(-1, w).astype(np.uint64)
        values[first * s : (first + len(chunk)) * s] = (wide << shifts).sum(axis=1, dtype=np.uint64)
    return values


def encode(layout: SlotLayout, values: np.ndarray, weight: float = 1.0) -> list[mpz]:
    """Quantize and pack one device's update (weight = its Eq. 4 share s_k / s)."""
    return pack(layout, quantize(layout, values, weight))


def decode(
    layout: SlotLayout, plaintexts: Sequence[int | mpz], length: int, total_weight: float, count: int
) -> np.ndarray:
    """Weighted mean (float64) of ``count`` encoded updates whose weights sum to ``total_weight``.

    Raises :class:`SlotOverflowError` naming the offending parameter indices when any slot exceeds the bound an
    honest sum can reach, or when a padding slot is non-zero.
    """
    if not (0.0 < total_weight <= 1.0 + 1e-9):
        raise CodecRangeError(f"total weight must be in (0, 1], got {total_weight}")
    if not 1 <= count <= layout.max_devices:
        raise CodecRangeError(f"count {count} outside 1..{layout.max_devices} (the layout's fleet size)")
    slots = unpack(layout, plaintexts, length)
    bound = layout.slot_bound(total_weight, count)
    over = np.flatnonzero(slots[:length] > np.uint64(bound))
    if over.size:
        raise SlotOverflowError(
            f"{over.size} slot(s) exceed the honest-sum bound {bound} (first parameter {int(over[0])}): "
            "an update carried out-of-range values; aggregate flagged, not applied",
            over.tolist(),
        )
    if np.any(slots[length:]):
        raise SlotOverflowError("non-zero padding slot: an update carried data beyond the model", [])
    total = slots[:length].astype(np.float64) * layout.step - layout.clip * total_weight
    return total / total_weight
