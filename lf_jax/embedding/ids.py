"""String ids -> table rows: a minimal perfect hash over a vocabulary snapshot.

``IdMap.build`` hashes every string id of a snapshot to a 64-bit key, then places the
keys with a BBHash-style construction (levels of bit arrays of ``gamma * n`` slots; a key
alone in its slot is placed, colliding keys try again one level down). A key's row is the
rank of its bit across all levels, so known ids get distinct rows in [0, n) with no
key stored. A fingerprint per row (a second hash of the key) tells unknown ids apart:
they go to one of ``num_oov_buckets`` OOV rows n .. n + num_oov_buckets - 1, chosen by
hash. With ``preserve_order`` (the default) the row of ``keys[i]`` is ``i``, so the
snapshot itself maps rows back to string ids (export, pretrained vectors). Vectorised
numpy: lookups loop over string positions and levels, never over keys. Keys compare as
exact code point sequences (a trailing "\\x00" is dropped: numpy strings cannot hold one).

Shapes: ``keys`` is a sequence or array of str (any shape); ``lookup`` and ``contains``
return arrays of the same shape (int32 rows, bool).

Example:
    >>> id_map = IdMap.build(["urn:li:member:1", "urn:li:member:7"], num_oov_buckets=2)
    >>> id_map.lookup(["urn:li:member:7", "urn:li:member:1", "urn:li:member:99"])
    array([1, 0, 3], dtype=int32)          # 99 is unknown: an OOV row in [2, 4)
    >>> id_map.save("/tmp/member_ids"); IdMap.load("/tmp/member_ids").num_rows
    4

The string hashing (hash_strings, mix64, IdMapError) lives in string_hash.py, the
perfect hash's levels, fingerprints and ranks in id_map_hashing.py.
"""

import dataclasses
import json
import math
import os
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lf_jax.checks import check_int
from lf_jax.embedding.id_map_hashing import (
    fingerprints_of,
    first_duplicate_hash,
    level_slots,
    reduce_to_range,
    words_rank,
)
from lf_jax.embedding.string_hash import (
    GOLDEN,
    MASK64,
    IdMapError,
    check_seed,
    hash_strings,
    mix64,
)

FILE_NAME = "id_map.npz"
FORMAT = "lf_jax.IdMap"
FORMAT_VERSION = 1
FINGERPRINT_BITS = (8, 16, 32)
MAX_LEVELS = 48
_OOV_SALT = 0x00B0_C4E7_5A17_0FF5


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class IdMap:
    """A minimal perfect hash from a snapshot of n string ids to rows [0, n), plus OOV rows.

    Build with ``IdMap.build``; ``num_rows`` (n + num_oov_buckets) is the vocab_size of
    the table it feeds. ``nbytes`` is what it keeps in memory (no key is stored).
    """

    num_keys: int
    num_oov_buckets: int
    seed: int
    hash_seed: int
    gamma: float
    fingerprint_bits: int
    level_words: np.ndarray  # [levels + 1] int64: word offset of each level
    words: np.ndarray  # [W] uint64: the levels' bit arrays, concatenated
    rank: np.ndarray  # [W] uint32: set bits before each word
    fingerprints: np.ndarray  # [n] uint8/16/32, by hash index
    order: np.ndarray | None  # [n] uint32: hash index -> snapshot position
    fallback_keys: np.ndarray  # [F] uint64 sorted: keys left after MAX_LEVELS (rarely any)

    @classmethod
    def build(
        cls,
        keys,
        *,
        num_oov_buckets: int = 1,
        seed: int = 0,
        gamma: float = 2.0,
        fingerprint_bits: int = 32,
        preserve_order: bool = True,
    ) -> "IdMap":
        """Builds the map from a snapshot of unique string ids.

        gamma: bit-array slots per key at each level (>= 1): larger builds and looks up
        faster with more bits. fingerprint_bits: 8 | 16 | 32; an unknown id is taken for
        a known one with probability about 2**-fingerprint_bits. preserve_order: row of
        ``keys[i]`` is ``i`` (4 more bytes per key); otherwise rows follow the hash.
        """
        check_int("num_oov_buckets", num_oov_buckets, IdMapError, minimum=0)
        if (
            not isinstance(gamma, (int, float))
            or isinstance(gamma, bool)
            or not 1.0 <= gamma <= 16.0
        ):
            raise IdMapError(f"gamma must be a number in [1, 16], got {gamma!r}")
        if fingerprint_bits not in FINGERPRINT_BITS:
            raise IdMapError(
                f"fingerprint_bits must be one of {FINGERPRINT_BITS}, got {fingerprint_bits!r}"
            )
        seed = check_seed(seed)
        if not isinstance(keys, (np.ndarray, Sequence)):
            keys = list(keys)
        for attempt in range(4):
            hash_seed = (seed + attempt * GOLDEN) & MASK64
            hashes = hash_strings(keys, hash_seed).reshape(-1)
            n = hashes.size
            if n == 0:
                raise IdMapError(
                    "keys: the vocabulary snapshot is empty; an IdMap needs at least one id"
                )
            if n + num_oov_buckets >= 2**31:
                raise IdMapError(
                    f"keys: {n} ids + {num_oov_buckets} OOV buckets do not fit int32 rows"
                )
            if np.unique(hashes).size == n:
                break
            duplicate = first_duplicate_hash(keys, hashes)
            if duplicate is not None:
                key, first, second = duplicate
                raise IdMapError(
                    f"keys: the snapshot must hold unique ids, but {key!r} appears "
                    f"at positions {first} and {second}"
                )
        else:  # pragma: no cover - needs four 64-bit collisions in a row
            raise IdMapError(
                f"keys: 64-bit hash collisions with seeds {seed}..{hash_seed}; try another seed"
            )
        return cls._place(
            hashes,
            num_oov_buckets=int(num_oov_buckets),
            seed=seed,
            hash_seed=hash_seed,
            gamma=float(gamma),
            fingerprint_bits=fingerprint_bits,
            preserve_order=preserve_order,
        )

    @classmethod
    def _place(cls, hashes, *, preserve_order, **header) -> "IdMap":
        n = hashes.size
        index_of_key = np.empty(n, np.int64)
        remaining = np.arange(n)
        word_blocks, level_words, placed = [], [0], 0
        for level in range(MAX_LEVELS):
            if remaining.size == 0:
                break
            num_slots = 64 * math.ceil(header["gamma"] * remaining.size / 64)
            slots = level_slots(hashes[remaining], level, num_slots)
            single = np.bincount(slots, minlength=num_slots) == 1
            alone = single[slots]
            index_of_key[remaining[alone]] = placed + np.cumsum(single)[slots[alone]] - 1
            placed += int(alone.sum())
            word_blocks.append(np.packbits(single, bitorder="little").view("<u8"))
            level_words.append(level_words[-1] + word_blocks[-1].size)
            remaining = remaining[~alone]
        fallback = np.sort(hashes[remaining])
        index_of_key[remaining[np.argsort(hashes[remaining])]] = np.arange(placed, n)
        words = np.concatenate(word_blocks)
        fingerprints = np.empty(n, f"<u{header['fingerprint_bits'] // 8}")
        fingerprints[index_of_key] = fingerprints_of(hashes, header["fingerprint_bits"])
        order = None
        if preserve_order:
            order = np.empty(n, np.uint32)
            order[index_of_key] = np.arange(n, dtype=np.uint32)
        return cls(
            num_keys=n,
            level_words=np.asarray(level_words, np.int64),
            words=words,
            rank=words_rank(words),
            fingerprints=fingerprints,
            order=order,
            fallback_keys=fallback,
            **header,
        )

    @property
    def num_rows(self) -> int:
        """Rows of the table this map feeds: known ids, then the OOV buckets."""
        return self.num_keys + self.num_oov_buckets

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays kept in memory."""
        arrays = (
            self.level_words,
            self.words,
            self.rank,
            self.fingerprints,
            self.order,
            self.fallback_keys,
        )
        return sum(a.nbytes for a in arrays if a is not None)

    def __repr__(self) -> str:
        return (
            f"IdMap(num_keys={self.num_keys}, num_oov_buckets={self.num_oov_buckets}, "
            f"levels={self.level_words.size - 1}, bits_per_key="
            f"{8 * self.nbytes / self.num_keys:.1f})"
        )

    def _hash_index(self, hashes: np.ndarray) -> np.ndarray:
        """[q] uint64 -> [q] int64 hash index in [0, n) of a known key's slot, -1 if none."""
        index = np.full(hashes.size, -1, np.int64)
        remaining = np.arange(hashes.size)
        for level in range(self.level_words.size - 1):
            if remaining.size == 0:
                break
            start, stop = self.level_words[level], self.level_words[level + 1]
            bit = level_slots(hashes[remaining], level, 64 * int(stop - start)) + 64 * int(start)
            word = self.words[bit >> 6]
            offset = (bit & 63).astype(np.uint64)
            hit = ((word >> offset) & np.uint64(1)).astype(bool)
            below = word[hit] & ((np.uint64(1) << offset[hit]) - np.uint64(1))
            index[remaining[hit]] = self.rank[bit[hit] >> 6] + np.bitwise_count(below).astype(
                np.int64
            )
            remaining = remaining[~hit]
        if remaining.size and self.fallback_keys.size:
            at = np.searchsorted(self.fallback_keys, hashes[remaining]).clip(
                max=self.fallback_keys.size - 1
            )
            found = self.fallback_keys[at] == hashes[remaining]
            index[remaining[found]] = self.num_keys - self.fallback_keys.size + at[found]
        return index

    def _known(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = self._hash_index(hashes)
        known = index >= 0
        known[known] = self.fingerprints[index[known]] == fingerprints_of(
            hashes[known], self.fingerprint_bits
        )
        return index, known

    def contains(self, keys) -> np.ndarray:
        """True where a key is in the snapshot (up to fingerprint false accepts); shape of keys."""
        hashes = hash_strings(keys, self.hash_seed)
        return self._known(hashes.reshape(-1))[1].reshape(hashes.shape)

    def lookup(self, keys) -> np.ndarray:
        """Rows of ``keys``, int32, shape of keys: [0, n) for known ids, OOV rows otherwise.

        With num_oov_buckets=0, an unknown id is an error naming the first one.
        """
        if not isinstance(keys, (np.ndarray, Sequence)):
            keys = list(keys)
        hashes = hash_strings(keys, self.hash_seed)
        flat = hashes.reshape(-1)
        index, known = self._known(flat)
        rows = np.empty(flat.size, np.int64)
        rows[known] = index[known] if self.order is None else self.order[index[known]]
        unknown = ~known
        if unknown.any():
            if self.num_oov_buckets == 0:
                first = int(np.argmax(unknown))
                key = (
                    np.asarray(keys).reshape(-1)[first]
                    if not isinstance(keys, list)
                    else keys[first]
                )
                raise IdMapError(
                    f"keys: {int(unknown.sum())} of {flat.size} ids are not in the "
                    f"vocabulary (first: {str(key)!r} at position {first}); build the "
                    "IdMap with num_oov_buckets >= 1 to send them to OOV rows"
                )
            buckets = reduce_to_range(
                mix64(flat[unknown] ^ np.uint64(_OOV_SALT)), self.num_oov_buckets
            )
            rows[unknown] = self.num_keys + buckets
        return rows.astype(np.int32).reshape(hashes.shape)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``directory/id_map.npz`` atomically (temp file, then rename); returns its path.

        An existing file is replaced only once the new one is complete.
        """
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IdMapError(
                f"IdMap.save: directory '{directory}' cannot be created: {error.strerror or error}"
            ) from None
        path = directory / FILE_NAME
        temp = directory / f".{FILE_NAME}.{uuid.uuid4().hex}.tmp"
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "num_keys": self.num_keys,
            "num_oov_buckets": self.num_oov_buckets,
            "seed": self.seed,
            "hash_seed": self.hash_seed,
            "gamma": self.gamma,
            "fingerprint_bits": self.fingerprint_bits,
            "preserve_order": self.order is not None,
        }
        arrays: dict[str, Any] = {
            "header": np.array(json.dumps(header)),
            "level_words": self.level_words,
            "words": self.words,
            "fingerprints": self.fingerprints,
            "fallback_keys": self.fallback_keys,
        }
        if self.order is not None:
            arrays["order"] = self.order
        try:
            with open(temp, "wb") as file:
                np.savez(file, **arrays)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except OSError as error:
            raise IdMapError(
                f"IdMap.save: cannot write '{path}': {error.strerror or error}"
            ) from None
        finally:
            temp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "IdMap":
        """Reads a map written by ``save`` (a directory, or the .npz file itself)."""
        path = Path(directory)
        if path.is_dir() or not path.suffix == ".npz":
            path = path / FILE_NAME
        if not path.is_file():
            raise IdMapError(f"IdMap.load: '{path}' does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(str(npz["header"]))
                arrays = {name: npz[name] for name in npz.files if name != "header"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise IdMapError(
                f"IdMap.load: '{path}' is not a readable IdMap file: {error}"
            ) from None
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise IdMapError(
                f"IdMap.load: '{path}' has format {header.get('format')!r} version "
                f"{header.get('version')!r}, expected {FORMAT!r} {FORMAT_VERSION}"
            )
        try:
            words = arrays["words"].astype("<u8", copy=False)
            id_map = cls(
                num_keys=int(header["num_keys"]),
                num_oov_buckets=int(header["num_oov_buckets"]),
                seed=int(header["seed"]),
                hash_seed=int(header["hash_seed"]),
                gamma=float(header["gamma"]),
                fingerprint_bits=int(header["fingerprint_bits"]),
                level_words=arrays["level_words"],
                words=words,
                rank=words_rank(words),
                fingerprints=arrays["fingerprints"],
                order=arrays["order"] if header["preserve_order"] else None,
                fallback_keys=arrays["fallback_keys"],
            )
        except KeyError as error:
            raise IdMapError(f"IdMap.load: '{path}' lacks {error}") from None
        n = id_map.num_keys
        if (
            id_map.fingerprints.size != n
            or id_map.level_words[-1] != words.size
            or id_map.fingerprints.dtype.itemsize * 8 != id_map.fingerprint_bits
            or int(np.bitwise_count(words).sum()) + id_map.fallback_keys.size != n
            or (id_map.order is not None and id_map.order.size != n)
        ):
            raise IdMapError(f"IdMap.load: '{path}' is inconsistent (num_keys={n}); rebuild it")
        return id_map
