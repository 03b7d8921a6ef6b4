"""The hashing pieces of IdMap's minimal perfect hash (ids.py): ranges, level slots,
fingerprints, bit-vector ranks and the duplicate check of a build.

Every function is numpy, vectorised over keys. Shapes: hashes / keys [N] uint64.

Example:
    >>> slots = level_slots(hashes, level=0, num_slots=64 * words)   # [N] int64 in [0, 64 words)
    >>> fps = fingerprints_of(hashes, 16)                             # [N] uint16
"""

import numpy as np

from lf_jax.checks import first_duplicate
from lf_jax.embedding.string_hash import GOLDEN, MASK64, as_string_array, mix64

FINGERPRINT_SALT = 0x5EED_F1A6_E2B1_7A11


def reduce_to_range(hashes: np.ndarray, size: int) -> np.ndarray:
    """Maps uniform uint64 hashes to [0, size) (multiply-high of the top 32 bits), int64."""
    return (((hashes >> np.uint64(32)) * np.uint64(size)) >> np.uint64(32)).astype(np.int64)


def level_slots(keys: np.ndarray, level: int, num_slots: int) -> np.ndarray:
    salt = np.uint64((GOLDEN * (level + 1)) & MASK64)
    return reduce_to_range(mix64(keys ^ salt), num_slots)


def fingerprints_of(keys: np.ndarray, bits: int) -> np.ndarray:
    top = mix64(keys ^ np.uint64(FINGERPRINT_SALT)) >> np.uint64(64 - bits)
    return top.astype(f"<u{bits // 8}")


def words_rank(words: np.ndarray) -> np.ndarray:
    """Exclusive running popcount per 64-bit word (the rank of each word's first bit)."""
    counts = np.bitwise_count(words).astype(np.int64)
    return (np.cumsum(counts) - counts).astype(np.uint32)


def first_duplicate_hash(keys, hashes: np.ndarray) -> tuple[str, int, int] | None:
    """The duplicate whose second occurrence comes first: (key, first, second), or None."""
    order = np.argsort(hashes, kind="stable")
    same = hashes[order][1:] == hashes[order][:-1]
    if not same.any():
        return None
    suspects = np.unique(np.concatenate([order[:-1][same], order[1:][same]]))
    flat = keys.reshape(-1) if isinstance(keys, np.ndarray) else keys
    duplicate = first_duplicate(as_string_array([flat[i] for i in suspects], "keys"))
    if duplicate is None:
        return None  # a 64-bit collision of two different keys: the caller re-seeds
    key, first, second = duplicate  # positions among the suspects, in row order
    return key, int(suspects[first]), int(suspects[second])
