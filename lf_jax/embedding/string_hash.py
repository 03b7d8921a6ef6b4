"""Seeded 64-bit hashes of string ids, vectorised with numpy: ``hash_strings`` and ``mix64``.

A key's hash is FNV-1a over pairs of its code points, with an xorshift per step, the
length folded in, then the murmur3 64-bit finaliser (``mix64``); the seed picks the FNV
basis. The hash of a key depends only on the key and the seed, never on the other keys
of the batch, and is the same on every machine. Keys are hashed HASH_CHUNK at a time,
looping over string positions, never over keys. IdMap (ids.py) and the hashing trick
(open_vocab.py) are built on these hashes.

Shapes: keys is a str, or a sequence or array of str (or utf-8 bytes) of any shape;
``hash_strings`` returns uint64 of the same shape.

Example:
    >>> hashes = hash_strings(["urn:li:member:1", "urn:li:member:2"], seed=0)   # [2] uint64
    >>> mix64(np.arange(3, dtype=np.uint64))     # [3] uint64, all distinct (a bijection)
"""

from collections.abc import Sequence

import numpy as np

from lf_jax.errors import UserInputError

HASH_CHUNK = 1 << 16
GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: an odd constant for mixing
MASK64 = (1 << 64) - 1
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = 0xCBF29CE484222325


class IdMapError(UserInputError):
    """Bad keys, arguments or files for an IdMap (``hash_strings`` raises it for bad keys too)."""


def mix64(h: np.ndarray | np.unsignedinteger) -> np.ndarray:
    """The murmur3 64-bit finaliser (a bijection with full avalanche), on a uint64 array."""
    h = np.array(h, dtype=np.uint64)  # a copy: callers keep their keys
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def check_seed(seed) -> int:
    """``seed`` as an int in [0, 2**64) (bools refused)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= MASK64:
        raise IdMapError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def as_string_array(chunk, field: str) -> np.ndarray:
    """A 1-D '<U' array from a chunk of str (or utf-8 bytes) keys."""
    array = np.asarray(chunk)
    if array.dtype.kind == "O":
        array = array.astype(str)
    elif array.dtype.kind == "S":
        try:
            array = np.strings.decode(array, "utf-8")
        except UnicodeDecodeError as error:
            raise IdMapError(f"{field}: bytes keys must be utf-8, got {error}") from None
    elif array.dtype.kind != "U":
        raise IdMapError(
            f"{field} must be strings, got an array of {array.dtype} (integer ids "
            "need no IdMap: use open_vocab.hash_to_rows or the ids themselves)"
        )
    return array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1)


def _key_chunks(keys, field: str):
    """(shape of ``keys``, a generator of flat 1-D '<U' chunks of at most HASH_CHUNK keys)."""
    if isinstance(keys, (str, bytes)):
        keys = np.asarray(keys)
    if isinstance(keys, np.ndarray):
        flat = keys.reshape(-1)
        shape = keys.shape
        chunks = (flat[start : start + HASH_CHUNK] for start in range(0, flat.size, HASH_CHUNK))
    elif (
        isinstance(keys, Sequence) and len(keys) and isinstance(keys[0], (list, tuple, np.ndarray))
    ):
        return _key_chunks(np.asarray(keys), field)
    else:
        if not isinstance(keys, Sequence):
            keys = list(keys)
        shape = (len(keys),)
        chunks = (keys[start : start + HASH_CHUNK] for start in range(0, len(keys), HASH_CHUNK))
    return shape, (as_string_array(chunk, field) for chunk in chunks)


def _hash_chunk(strings: np.ndarray, basis: int) -> np.ndarray:
    """FNV-1a over pairs of code points with an xorshift per step, then mix64; '<U' -> uint64."""
    n = strings.size
    lengths = np.strings.str_len(strings).astype(np.int64)
    if n == 0:
        return np.zeros(0, np.uint64)
    width = max(strings.dtype.itemsize // 4, 1)
    # Longest first, so the keys still running at step j are a prefix: no masks.
    order = np.argsort(-lengths, kind="stable")
    lengths_sorted = lengths[order]
    codes = np.zeros((n, width + width % 2), "<u4")
    codes[:, :width] = np.ascontiguousarray(strings).view("<u4").reshape(n, width)[order]
    pairs = codes.view("<u8")  # code points 2j and 2j + 1 (zero past the end) in one word
    steps = (int(lengths_sorted[0]) + 1) // 2
    running = np.searchsorted(-lengths_sorted, -2 * np.arange(steps), side="left")
    hashes = np.full(n, basis, np.uint64)
    for step, count in enumerate(running):
        head = hashes[:count]
        head ^= pairs[:count, step]
        head *= _FNV_PRIME
        head ^= head >> np.uint64(29)
    hashes ^= lengths_sorted.astype(np.uint64) * np.uint64(GOLDEN)
    out = np.empty(n, np.uint64)
    out[order] = mix64(hashes)
    return out


def hash_strings(keys, seed: int = 0, *, field: str = "keys") -> np.ndarray:
    """64-bit seeded hashes of string ids, vectorised; shape of ``keys``, uint64.

    The hash of a key depends only on the key and the seed (never on the other keys of
    the batch), and is the same on every machine.

    Example:
        >>> hash_strings(["urn:li:member:1", "urn:li:member:2"], seed=0).dtype
        dtype('uint64')
    """
    basis = int(mix64(np.uint64(_FNV_OFFSET ^ check_seed(seed))))
    shape, chunks = _key_chunks(keys, field)
    parts = [_hash_chunk(chunk, basis) for chunk in chunks]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    return flat.reshape(shape)
