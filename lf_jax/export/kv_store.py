"""An LMDB key-value store of entity vectors for online lookup, int8-quantized per row.

Each row, keyed by the entity's string id (utf-8, 1-511 bytes), holds a float32 scale,
the index of the model version that wrote it and the vector's int8 codes: symmetric
quantization, ``scale = max|v| / 127`` and ``codes = round(v / scale)``, so a row of
D dimensions takes D + 6 bytes instead of 4 D (``dtype="float32"`` stores exact floats).
``get`` returns dequantized float32 vectors, ``get_raw`` the codes, scales and versions.

Writes go in batches, one LMDB write transaction per batch: a batch is either all in the
store or not at all, also when the writer is killed (LMDB commits by switching its meta
page; a process killed mid-transaction leaves the previous state). ``update`` rewrites
only the rows that are new or whose vector moved by more than ``tolerance`` (relative L2
change of the dequantized vectors), for near-line re-embedding: a row keeps the version
of the model that last changed it. Version counts and the dimension live in a small
metadata database, updated in the same transactions.

One process writes at a time (LMDB's writer lock; other writers wait); any number of
processes may read. A writer whose map another writer grew adopts the new size and
retries its batch; an LMDB failure is one KVStoreError.

Shapes: ids [n] str; vectors [n, D] float; ``get`` -> [n, D] float32.

Example:
    >>> with KVStore("/tmp/member_vectors", dims=64) as store:
    ...     store.put(member_ids, vectors, version="ckpt-12000")
    ...     counts = store.update(member_ids, new_vectors, version="ckpt-13000")
    ...     member_vectors = store.get(["urn:li:member:7"])      # [1, 64] float32
    ...     store.stats()["bytes_on_disk"]

The quantization and row layout live in quantize.py, the id and vector checks in
kv_inputs.py, the LMDB directory's header and version bookkeeping in kv_meta.py.
"""

import dataclasses
import os
from pathlib import Path

import lmdb
import numpy as np

from lf_jax.checks import check_int
from lf_jax.console import get_logger, progress
from lf_jax.export.kv_inputs import (
    KVStoreError,
    check_unique_keys,
    check_vectors,
    encode_keys,
)
from lf_jax.export.kv_meta import (
    directory_stats,
    open_store,
    read_meta,
    version_slot,
    write_meta,
)
from lf_jax.export.quantize import RowCodec

DEFAULT_MAP_SIZE = 1 << 30  # grows by doubling when full
DEFAULT_BATCH_SIZE = 10_000
MAX_RETRIES = 32  # per batch: map growths and adoptions of another writer's resize


@dataclasses.dataclass(frozen=True)
class UpdateCounts:
    """What ``update`` did: ``written`` = ``new`` + changed rows; ``unchanged`` rows were kept."""

    written: int
    unchanged: int
    new: int


@dataclasses.dataclass(frozen=True)
class RawRows:
    """Stored rows as they are: codes [n, D] (int8, or float32), scales [n], versions [n] str."""

    codes: np.ndarray
    scales: np.ndarray
    versions: np.ndarray


class KVStore:
    """Entity vectors in an LMDB directory, keyed by string id (see the module docstring).

    path: a directory (created if missing). dims: vector width; required to create a
    store, checked against an existing one. dtype: "int8" (default) or "float32", fixed
    at creation. readonly: open for lookups only (many processes may do so at once).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dims: int | None = None,
        *,
        dtype: str = "int8",
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        sync: bool = True,
    ):
        self.path = Path(path)
        self._env, self._meta, self._rows, header = open_store(
            self.path, dims, dtype, readonly=readonly, map_size=map_size, sync=sync
        )
        self.dims: int = int(header["dims"])
        self.dtype: str = header["dtype"]
        self.readonly = readonly
        self._codec = RowCodec(self.dims, self.dtype)
        self._row_dtype = self._codec.row_dtype

    # ------------------------------------------------------------- plumbing
    def _reader(self):
        """A read transaction; adopts a map grown by another process (MDB_MAP_RESIZED)."""
        try:
            return self._env.begin()
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
            return self._env.begin()

    def generation(self) -> int:
        """The id of the last write transaction committed to the store (by any process): it
        changes on every write, so a reader holding rows in memory knows when to reread."""
        with self._reader() as txn:
            return int(txn.id())

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        with self._reader() as txn:
            return txn.stat(self._rows)["entries"]

    def __contains__(self, entity_id: str) -> bool:
        key = encode_keys([entity_id])[0]
        with self._reader() as txn:
            return txn.get(key, db=self._rows) is not None

    def _decode(self, values: list[bytes], keys: list[bytes]) -> np.ndarray:
        """records [n] of stored values (one frombuffer over their concatenation); a value of
        the wrong size is an error naming its key."""
        size = self._row_dtype.itemsize
        lengths = np.fromiter(map(len, values), np.int64, len(values))
        bad = np.flatnonzero(lengths != size)
        if bad.size:
            key, length = keys[int(bad[0])], int(lengths[bad[0]])
            raise KVStoreError(
                f"KVStore: row {key.decode()!r} in '{self.path}' has {length} bytes, "
                f"expected {size}; the store is corrupt or of another layout"
            )
        return self._codec.decode(values)

    def _write_batch(self, txn, keys: list[bytes], values: list[bytes]) -> None:
        """Puts one batch inside its transaction (a seam for tests that kill the writer)."""
        with txn.cursor(db=self._rows) as cursor:
            # Sorted keys past the last stored one are appended: LMDB then fills every page.
            append = not cursor.last() or cursor.key() < keys[0]
            cursor.putmulti(zip(keys, values, strict=False), append=append)

    def _grow(self) -> None:
        size = self._env.info()["map_size"] * 2
        get_logger().info(
            "KVStore: %s is full; growing the map to %.1f GiB", self.path, size / 2**30
        )
        self._env.set_mapsize(size)

    # --------------------------------------------------------------- writes
    def _check_writable(self) -> None:
        if self.readonly:
            raise KVStoreError(f"KVStore: '{self.path}' was opened read-only")

    def _write(
        self, ids, vectors, version, *, batch_size: int, tolerance: float | None, desc: str
    ) -> UpdateCounts:
        self._check_writable()
        if (
            not isinstance(version, (str, int, np.integer))
            or isinstance(version, bool)
            or str(version) == ""
        ):
            raise KVStoreError(f"version must be a non-empty str or an int, got {version!r}")
        check_int("batch_size", batch_size, KVStoreError)
        version = str(version)
        keys = encode_keys(ids)
        check_unique_keys(keys)
        vectors = check_vectors(vectors, dims=self.dims, keys=keys)
        # Batches are ranges of sorted keys: each transaction touches few pages, and a
        # first load appends (full pages, no copy-on-write churn).
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        vectors = vectors[np.asarray(order, np.int64)] if keys else vectors
        written = unchanged = new = 0
        with progress(total=len(keys), desc=desc, unit="row") as bar:
            for start in range(0, len(keys), batch_size):
                batch_keys = keys[start : start + batch_size]
                batch = vectors[start : start + batch_size]
                counts = self._write_with_retries(batch_keys, batch, version, tolerance)
                written, unchanged, new = (
                    written + counts[0],
                    unchanged + counts[1],
                    new + counts[2],
                )
                bar.update(len(batch_keys))
        return UpdateCounts(written=written, unchanged=unchanged, new=new)

    def _write_with_retries(
        self, keys: list[bytes], vectors: np.ndarray, version: str, tolerance: float | None
    ) -> tuple[int, int, int]:
        """One batch's transaction: a full map is grown, a map grown by another writer
        (MDB_MAP_RESIZED) adopted, and the batch retried; other LMDB failures, or more than
        MAX_RETRIES retries, are one KVStoreError."""
        for _ in range(MAX_RETRIES):
            try:
                return self._write_transaction(keys, vectors, version, tolerance)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)  # adopt the size another writer grew the map to
            except lmdb.Error as error:
                raise KVStoreError(f"KVStore: writing to '{self.path}' failed: {error}") from None
        raise KVStoreError(
            f"KVStore: writing to '{self.path}' failed {MAX_RETRIES} times (the map kept "
            "filling or being resized by another writer)"
        )

    def _write_transaction(
        self, keys: list[bytes], vectors: np.ndarray, version: str, tolerance: float | None
    ) -> tuple[int, int, int]:
        with self._env.begin(write=True) as txn:
            versions, counts = read_meta(txn, self._meta)
            version_index = version_slot(versions, counts, version)
            records = self._codec.encode(vectors, version_index)
            old_values = [txn.get(key, db=self._rows) for key in keys]
            present = np.array([value is not None for value in old_values])
            write = np.ones(len(keys), bool)
            if present.any():
                old = self._decode(
                    [v for v in old_values if v is not None],
                    [k for k, v in zip(keys, old_values, strict=False) if v is not None],
                )
                if tolerance is not None:
                    stored = self._codec.vectors(old)
                    fresh = self._codec.vectors(records[present])
                    change = np.linalg.norm(fresh - stored, axis=1)
                    write[present] = change > tolerance * np.linalg.norm(fresh, axis=1)
                for old_version in old["version"][write[present]].tolist():
                    counts[old_version] -= 1
            if write.any():
                chosen = np.flatnonzero(write)
                self._write_batch(
                    txn, [keys[i] for i in chosen.tolist()], self._codec.values(records[chosen])
                )
                counts[version_index] += int(chosen.size)
            write_meta(txn, self._meta, versions, counts)
        num_new = int((~present).sum())
        return int(write.sum()), int((~write).sum()), num_new

    def put(self, ids, vectors, version, *, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
        """Writes every row (new or not); returns rows written.

        Rows are sorted by id and written ``batch_size`` at a time, one transaction each:
        a batch is all in or all out, also if the process dies.
        """
        return self._write(
            ids, vectors, version, batch_size=batch_size, tolerance=None, desc="kv put"
        ).written

    def update(
        self,
        ids,
        vectors,
        version,
        *,
        tolerance: float = 1e-3,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> UpdateCounts:
        """Writes only new rows and rows whose vector changed; returns the counts.

        A stored row is rewritten (with ``version``) when
        ``|new - stored| > tolerance * |new|`` (L2, after quantizing both), so unchanged
        re-embeddings, and noise below the tolerance, cost no write. tolerance=0 rewrites
        every row whose stored codes differ.
        """
        if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance < 0:
            raise KVStoreError(f"tolerance must be a number >= 0, got {tolerance!r}")
        return self._write(
            ids,
            vectors,
            version,
            batch_size=batch_size,
            tolerance=float(tolerance),
            desc="kv update",
        )

    def delete(self, ids, *, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
        """Removes rows (unknown ids are skipped); returns how many were removed."""
        self._check_writable()
        keys = list(dict.fromkeys(encode_keys(ids)))
        removed = 0
        for start in range(0, len(keys), batch_size):
            with self._env.begin(write=True) as txn:
                versions, counts = read_meta(txn, self._meta)
                for key in keys[start : start + batch_size]:
                    value = txn.pop(key, db=self._rows)
                    if value is not None:
                        counts[self._decode([value], [key])["version"][0]] -= 1
                        removed += 1
                write_meta(txn, self._meta, versions, counts)
        return removed

    # ---------------------------------------------------------------- reads
    def _read(self, ids, missing: str) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        if missing not in ("raise", "nan", "zeros"):
            raise KVStoreError(f"missing must be 'raise', 'nan' or 'zeros', got {missing!r}")
        keys = encode_keys(ids)
        with self._reader() as txn, txn.cursor(db=self._rows) as cursor:
            pairs = cursor.getmulti(keys)  # (key, value) of the keys found, in their order
        if len(pairs) == len(keys):
            found = np.ones(len(keys), bool)
            values = [value for _, value in pairs]
        else:
            stored = dict(pairs)
            found = np.array([key in stored for key in keys], bool)
            values = [stored[key] for key in keys if key in stored]
        if not found.all() and missing == "raise":
            first = int(np.argmin(found))
            raise KVStoreError(
                f"ids: {int((~found).sum())} of {len(keys)} ids are not in the store "
                f"(first: {keys[first].decode()!r} at position {first}); pass "
                "missing='nan' or 'zeros' to fill them"
            )
        if found.all():
            records = self._decode(values, keys) if keys else np.zeros(0, self._row_dtype)
        else:
            records = np.zeros(len(keys), self._row_dtype)
            if found.any():
                known = [key for key, f in zip(keys, found.tolist(), strict=True) if f]
                records[found] = self._decode(values, known)
        return records, found, keys

    def get(self, ids, *, missing: str = "raise") -> np.ndarray:
        """Dequantized float32 vectors [n, D] for ``ids``.

        missing: "raise" (an error naming the first unknown id), "nan" or "zeros" (fill).
        """
        records, found, _ = self._read(ids, missing)
        vectors = self._codec.vectors(records)
        if missing == "nan":
            vectors[~found] = np.nan
        return vectors

    def get_raw(self, ids, *, missing: str = "raise") -> RawRows:
        """Stored codes [n, D], scales [n] and version names [n] ('' for missing ids)."""
        records, found, _ = self._read(ids, missing)
        with self._reader() as txn:
            names = np.array(read_meta(txn, self._meta)[0] or [""])
        versions = names[records["version"].astype(np.int64)]
        versions[~found] = ""
        return RawRows(
            codes=records["codes"].copy(), scales=records["scale"].copy(), versions=versions
        )

    def ids(self) -> list[str]:
        """Every id in the store, in key (utf-8 byte) order."""
        with self._reader() as txn, txn.cursor(db=self._rows) as cursor:
            return [key.decode() for key in cursor.iternext(keys=True, values=False)]

    def stats(self) -> dict:
        """Counts and sizes of the store: count, dims, dtype, versions {name: rows},
        bytes_on_disk, file_bytes, bytes_live, bytes_float32, map_size (see
        ``kv_meta.directory_stats``) and row_bytes (value bytes per row)."""
        with self._reader() as txn:
            stats = directory_stats(txn, self._env, self._meta, self._rows, self.path)
        return {
            "count": stats["count"],
            "dims": self.dims,
            "dtype": self.dtype,
            **stats,
            "bytes_float32": stats["count"] * self.dims * 4,
            "row_bytes": self._row_dtype.itemsize,
        }

    def copy_compact(self, directory: str | os.PathLike) -> Path:
        """Writes a compacted copy (no free pages) of the store to a new or empty directory.

        A consistent snapshot, also while another process writes: for shipping the
        store to online serving. Returns the directory.
        """
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise KVStoreError(f"copy_compact: '{directory}' must be a new or empty directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._env.copy(str(directory), compact=True)
        except (OSError, lmdb.Error) as error:
            raise KVStoreError(f"copy_compact: cannot write '{directory}': {error}") from None
        return directory
