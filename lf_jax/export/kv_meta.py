"""The metadata of a KVStore's LMDB directory: opening it, its header, versions, sizes.

An LMDB environment with two databases: "vectors" (the rows, lf_jax.export.kv_store)
and "meta": ``format`` (json header: format, format_version, dims, dtype, written when
the store is created and checked on every open), ``versions`` (json list: version index
-> name) and ``version_counts`` (json list: rows per version index), updated in the
same write transaction as the rows they count.

Example:
    >>> env, meta, rows, header = open_store(Path("/tmp/kv"), 64, "int8", readonly=False,
    ...                                      map_size=1 << 30, sync=True)
    >>> with env.begin(write=True) as txn:
    ...     versions, counts = read_meta(txn, meta)
    ...     index = version_slot(versions, counts, "ckpt-12000")
    ...     write_meta(txn, meta, versions, counts)
"""

import json
from pathlib import Path
from typing import Any

import lmdb

from lf_jax.checks import check_int
from lf_jax.export.kv_inputs import KVStoreError

FORMAT = "lf_jax.KVStore"
FORMAT_VERSION = 1
DTYPES = ("int8", "float32")
MAX_VERSIONS = 65535
_META_FORMAT = b"format"
_META_VERSIONS = b"versions"  # json list: version index -> name
_META_COUNTS = b"version_counts"  # json list: rows per version index


def open_store(
    path: Path, dims: int | None, dtype: str, *, readonly: bool, map_size: int, sync: bool
) -> tuple[Any, Any, Any, dict]:
    """(environment, meta db, vectors db, header) of the store at ``path``: created with
    ``dims`` and ``dtype`` when missing (not ``readonly``), else its header checked
    (format, version, ``dims`` when given). Every failure is one KVStoreError naming
    ``path``; the environment is closed on failure."""
    if dims is not None:
        check_int("dims", dims, KVStoreError)
    if dtype not in DTYPES:
        raise KVStoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    exists = (path / "data.mdb").is_file()
    if not exists and readonly:
        raise KVStoreError(f"KVStore: '{path}' holds no store (no data.mdb) to open read-only")
    if not exists and dims is None:
        raise KVStoreError(f"KVStore: '{path}' holds no store yet; pass dims=... to create one")
    if path.exists() and not path.is_dir():
        raise KVStoreError(f"KVStore: '{path}' exists and is not a directory")
    try:
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=2,
            readonly=readonly,
            lock=True,
            sync=sync,
            metasync=sync,
        )
    except (OSError, lmdb.Error) as error:
        raise KVStoreError(
            f"KVStore: cannot open '{path}'{' for writing' if not readonly else ''}: {error}"
        ) from None
    try:
        meta = env.open_db(b"meta", create=not readonly)
        rows = env.open_db(b"vectors", create=not readonly)
    except lmdb.Error as error:
        env.close()
        raise KVStoreError(f"KVStore: '{path}' is not a KVStore ({error})") from None
    with env.begin(db=meta) as txn:
        stored_header = txn.get(_META_FORMAT)
    header: dict[str, Any]
    if stored_header is None:
        if readonly:
            env.close()
            raise KVStoreError(f"KVStore: '{path}' is an LMDB directory without KVStore metadata")
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dims": check_int("dims", dims, KVStoreError),  # required for a new store
            "dtype": dtype,
        }
        with env.begin(write=True, db=meta) as txn:
            txn.put(_META_FORMAT, json.dumps(header).encode())
            txn.put(_META_VERSIONS, b"[]")
            txn.put(_META_COUNTS, b"[]")
    else:
        header = json.loads(stored_header)
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            env.close()
            raise KVStoreError(
                f"KVStore: '{path}' has format {header.get('format')!r} version "
                f"{header.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}"
            )
        if dims is not None and dims != header["dims"]:
            env.close()
            raise KVStoreError(
                f"dims={dims} does not match the store at '{path}', which holds "
                f"{header['dims']}-dim vectors"
            )
    return env, meta, rows, header


def read_meta(txn, meta) -> tuple[list[str], list[int]]:
    """(version names, rows per version) as stored."""
    versions = json.loads(txn.get(_META_VERSIONS, db=meta))
    counts = json.loads(txn.get(_META_COUNTS, db=meta))
    return versions, counts


def write_meta(txn, meta, versions: list[str], counts: list[int]) -> None:
    """Stores version names and counts (inside the transaction that changed the rows)."""
    txn.put(_META_VERSIONS, json.dumps(versions).encode(), db=meta)
    txn.put(_META_COUNTS, json.dumps(counts).encode(), db=meta)


def version_slot(versions: list[str], counts: list[int], version: str) -> int:
    """The index of ``version``, appended (count 0) when new; at most MAX_VERSIONS."""
    if version not in versions:
        if len(versions) >= MAX_VERSIONS:
            raise KVStoreError(
                f"version {version!r}: the store already holds {MAX_VERSIONS} versions; "
                "rewrite it with fewer"
            )
        versions.append(version)
        counts.append(0)
    return versions.index(version)


def directory_stats(txn, env, meta, rows, path: Path) -> dict:
    """Sizes of the store at ``path``: count, versions {name: rows} (those holding rows),
    bytes_on_disk (allocated blocks of data.mdb), file_bytes, bytes_live (pages of the
    current B-trees: what ``KVStore.copy_compact`` would write; the rest of the file is
    free pages that later writes reuse) and map_size, read in the transaction ``txn``."""
    versions, counts = read_meta(txn, meta)
    trees = [txn.stat(rows), txn.stat(meta), env.stat()]
    page = trees[0]["psize"]
    live_pages = 2 + sum(t["branch_pages"] + t["leaf_pages"] + t["overflow_pages"] for t in trees)
    file_stat = (path / "data.mdb").stat()
    return {
        "count": trees[0]["entries"],
        "versions": {name: n for name, n in zip(versions, counts, strict=False) if n},
        "bytes_on_disk": file_stat.st_blocks * 512,
        "file_bytes": file_stat.st_size,
        "bytes_live": live_pages * page,
        "map_size": env.info()["map_size"],
    }
