"""Packed, threshold Paillier for model updates.

- :mod:`paillier`: keys (g = n + 1, DJN base), encryption, range checks, python-paillier interop
- :mod:`randomness`: fixed-base table for h_s^a and a single-use precomputed pool
- :mod:`codec`: fixed-point quantization and slot packing with overflow-proof headroom
- :mod:`homomorphic`: incremental weighted sums of ciphertext vectors (Eq. 4)
- :mod:`threshold`: t-of-l dealing, partial decryption with batch proofs, combination
- :mod:`vector`: whole-update encrypt / decode helpers
"""

from blockdeepnet.crypto.codec import CodecRangeError, SlotLayout, SlotOverflowError
from blockdeepnet.crypto.homomorphic import Accumulator, weighted_sum
from blockdeepnet.crypto.paillier import CiphertextRangeError, PrivateKey, PublicKey, generate_keypair
from blockdeepnet.crypto.randomness import FixedBaseTable, OnTheSpot, RandomnessPool
from blockdeepnet.crypto.threshold import (
    InvalidShareError,
    KeyShare,
    NotEnoughSharesError,
    PartialDecryption,
    ThresholdPublicKey,
    combine,
    deal,
    verify_partial,
)

__all__ = [
    "Accumulator",
    "CiphertextRangeError",
    "CodecRangeError",
    "FixedBaseTable",
    "InvalidShareError",
    "KeyShare",
    "NotEnoughSharesError",
    "OnTheSpot",
    "PartialDecryption",
    "PrivateKey",
    "PublicKey",
    "RandomnessPool",
    "SlotLayout",
    "SlotOverflowError",
    "ThresholdPublicKey",
    "combine",
    "deal",
    "generate_keypair",
    "verify_partial",
    "weighted_sum",
]
