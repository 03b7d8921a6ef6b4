"""Checks on what callers hand a KVStore: string ids as LMDB keys, and vectors.

Every check raises ``KVStoreError`` (a ``UserInputError``) naming the field and the
first bad position before any transaction starts. Keys are the ids' utf-8 bytes, which
LMDB needs to be 1-511 bytes long.

Shapes: ids [n] str -> keys [n] bytes; vectors [n, D] float -> [n, D] float32.

Example:
    >>> keys = encode_keys(["urn:li:member:7", "urn:li:member:9"])
    >>> check_unique_keys(keys)
    >>> check_vectors(np.zeros((2, 64)), dims=64, keys=keys).dtype
    dtype('float32')
"""

from collections.abc import Sequence

import numpy as np

from lf_jax.checks import first_duplicate
from lf_jax.errors import UserInputError

MAX_KEY_BYTES = 511


class KVStoreError(UserInputError):
    """Bad ids, vectors, arguments or store directories for a KVStore."""


def encode_keys(ids, field: str = "ids") -> list[bytes]:
    """The utf-8 keys of a 1-D list or array of str ids, each 1-MAX_KEY_BYTES bytes long."""
    if isinstance(ids, (str, bytes)):
        raise KVStoreError(
            f"{field} must be a list or array of str, got a single {type(ids).__name__} {ids!r}"
        )
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise KVStoreError(f"{field} must be 1-D, got shape {ids.shape}")
        ids = ids.tolist()
    elif not isinstance(ids, Sequence):
        ids = list(ids)
    try:  # the common case in one pass; a bad id is located below
        keys = [key.encode("utf-8") for key in ids if isinstance(key, str)]
    except UnicodeEncodeError:
        keys = []
    lengths = np.fromiter(map(len, keys), np.int64, len(keys))
    if len(keys) == len(ids) and (
        not keys or (int(lengths.min()) > 0 and int(lengths.max()) <= MAX_KEY_BYTES)
    ):
        return keys
    for position, key in enumerate(ids):
        if not isinstance(key, str):
            raise KVStoreError(
                f"{field} must be str, got {type(key).__name__} {key!r} at position {position}"
            )
        try:
            encoded = key.encode("utf-8")
        except UnicodeEncodeError as error:
            raise KVStoreError(
                f"{field}: id at position {position} ({key[:60]!r}) is not valid utf-8 ({error})"
            ) from None
        if not 0 < len(encoded) <= MAX_KEY_BYTES:
            raise KVStoreError(
                f"{field}: id at position {position} ({key[:60]!r}) is {len(encoded)} "
                f"utf-8 bytes; LMDB keys must be 1-{MAX_KEY_BYTES} bytes"
            )
    raise AssertionError("unreachable: every id passed its checks")


def check_unique_keys(keys: list[bytes], field: str = "ids") -> None:
    """An error naming the first key that appears twice in ``keys``, if any does."""
    duplicate = first_duplicate(keys) if len(set(keys)) != len(keys) else None
    if duplicate is not None:
        key, first, second = duplicate
        raise KVStoreError(
            f"{field} must be unique within a call, but {key.decode()!r} appears at "
            f"positions {first} and {second}"
        )


def check_vectors(vectors, *, dims: int, keys: list[bytes]) -> np.ndarray:
    """Finite float vectors [len(keys), dims] as float32; errors name the first bad row's id."""
    count = len(keys)
    array = np.asarray(vectors)
    if array.dtype.kind not in "fiu":
        raise KVStoreError(f"vectors must be a float array, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] != dims:
        raise KVStoreError(f"vectors must have shape [n, {dims}], got {array.shape}")
    if array.shape[0] != count:
        raise KVStoreError(f"vectors: got {array.shape[0]} vectors for {count} ids")
    array = np.asarray(array, np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise KVStoreError(f"vectors: row {row} (id {keys[row].decode()!r}) holds NaN or Inf")
    return array
