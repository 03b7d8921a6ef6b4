"""64-bit keys as uint32 (hi, lo) pairs, the uint32 hashes of a key and its initial row.

JAX runs without x64 here, so a key travels as two uint32 halves. String keys are
fingerprinted to 64 bits with ``string_hash.hash_strings``. The hashes (owner shard,
home slot, sketch counters) are written once for numpy and jax.numpy alike (``xp``), so
the device code and the test reference agree bit for bit.

Shapes: keys [B, L]; ``split_keys`` returns hi, lo [B, L] uint32 and valid [B, L] bool.

Example:
    >>> hi, lo, valid = parse_keys("post", [[3, 2**40 + 7], []], max_ids=4)
    >>> key_hash(np, hi, lo, OWNER_SALT) % 8        # owner shard of each key
"""

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.spec import TableSpec
from lf_jax.embedding.string_hash import hash_strings
from lf_jax.errors import UserInputError

OWNER_SALT = 0x6A09E667
HOME_SALT = 0xBB67AE85
SKETCH_SALT = 0x3C6EF372
GOLDEN32 = 0x9E3779B9


class InvalidKeysError(UserInputError):
    """Keys of a dynamic feature that are not 64-bit unsigned integers or strings."""


def fmix32(xp, h):
    """murmur3's 32-bit finaliser on a uint32 array of module ``xp`` (numpy or jax.numpy)."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def key_hash(xp, hi, lo, salt: int):
    """A uint32 hash of the keys (hi, lo) for ``salt`` (a Python int < 2**32)."""
    return fmix32(xp, lo ^ fmix32(xp, hi ^ xp.uint32(salt)) * xp.uint32(0x9E3779B1))


def salt(base: int, seed: int, index: int = 0) -> int:
    """The salt of hash ``base`` for a policy seed (and a sketch row ``index``)."""
    return (base ^ (seed * 0x27D4EB2F) ^ (index * 0x165667B1)) & 0xFFFFFFFF


def split_keys(keys_u64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys -> (hi, lo) uint32 halves."""
    keys_u64 = np.asarray(keys_u64, np.uint64)
    return (keys_u64 >> np.uint64(32)).astype(np.uint32), keys_u64.astype(np.uint32)


def join_keys(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """(hi, lo) uint32 halves -> uint64 keys."""
    return (np.asarray(hi, np.uint64) << np.uint64(32)) | np.asarray(lo, np.uint64)


def _bag_keys(name: str, row: int, bag: Any) -> np.ndarray:
    if isinstance(bag, (list, tuple)) and all(isinstance(k, int) for k in bag):
        bad = [k for k in bag if isinstance(k, bool) or not 0 <= k < 2**64]
        if bad:
            raise InvalidKeysError(
                f"feature '{name}': keys must be ints in [0, 2**64), got {bad[0]!r} (example {row})"
            )
        return np.array(bag, np.uint64)
    array = np.atleast_1d(np.asarray(bag))
    if array.ndim != 1:
        raise InvalidKeysError(f"feature '{name}': example {row} is not a flat list of keys")
    if not array.size:
        return np.zeros((0,), np.uint64)
    if array.dtype.kind in "USO":
        try:
            return hash_strings(array.astype(str), seed=0)
        except (TypeError, ValueError):
            raise InvalidKeysError(
                f"feature '{name}': example {row} mixes strings with other keys"
            ) from None
    if array.dtype.kind == "u":
        return array.astype(np.uint64)
    if array.dtype.kind != "i":
        raise InvalidKeysError(
            f"feature '{name}': keys must be integers or strings, got dtype {array.dtype} "
            f"(example {row})"
        )
    if array.min() < 0:
        raise InvalidKeysError(
            f"feature '{name}': keys must be >= 0, got {int(array.min())} (example {row})"
        )
    return array.astype(np.uint64)


def parse_keys(name: str, raw: Any, max_ids: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged bags of keys -> (hi, lo, valid) [B, max_ids]; longer bags keep their first
    max_ids keys.

    Accepted: a list of bags (lists of ints in [0, 2**64) or of strings), or a 2-D int64
    array padded with -1, or a 1-D array / list of single keys.
    """
    if isinstance(raw, np.ndarray) and raw.ndim == 2 and raw.dtype.kind == "i":
        bags: list[Any] = [row[row != -1] for row in raw]
    elif isinstance(raw, np.ndarray) and raw.ndim == 1:
        bags = [[key] for key in raw]
    elif isinstance(raw, (list, tuple)):
        bags = [bag if isinstance(bag, (list, tuple, np.ndarray)) else [bag] for bag in raw]
    else:
        raise InvalidKeysError(
            f"feature '{name}': expected a list of bags or an array of keys, got "
            f"{type(raw).__name__}"
        )
    keys = np.zeros((len(bags), max_ids), np.uint64)
    valid = np.zeros((len(bags), max_ids), bool)
    for row, bag in enumerate(bags):
        bag_keys = _bag_keys(name, row, bag)[:max_ids]
        keys[row, : bag_keys.size] = bag_keys
        valid[row, : bag_keys.size] = True
    hi, lo = split_keys(keys)
    return hi, lo, valid


def initial_rows(spec: TableSpec, hi, lo) -> jax.Array:
    """[N, D] float32 initial rows of keys (hi, lo): a function of the table name and the
    key only (``spec.initializer`` and scale), so a key starts from the same row on every
    shard, mesh and step. Counter-based: 32 bits per value from murmur3's finaliser of
    (key hash, column), normals by Box-Muller; elementwise, so cheap for every key of a
    step."""
    n = hi.shape[0]
    if spec.initializer == "zeros":
        return jnp.zeros((n, spec.dim), jnp.float32)
    table_salt = zlib.crc32(spec.name.encode())
    base_n = key_hash(jnp, hi, lo, table_salt)[:, None]
    column = jnp.arange(spec.dim, dtype=jnp.uint32)[None, :]

    def unit(offset: int):  # uniform in (0, 1), 24 bits
        bits = fmix32(
            jnp, base_n + (column * jnp.uint32(2) + jnp.uint32(offset)) * jnp.uint32(GOLDEN32)
        )
        return ((bits >> jnp.uint32(8)).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))

    if spec.initializer == "uniform":
        return spec.scale * (2.0 * unit(0) - 1.0)
    radius = jnp.sqrt(-2.0 * jnp.log(unit(0)))
    return spec.scale * radius * jnp.cos(2.0 * jnp.pi * unit(1))
