"""The on-disk form of a VectorIndex: a directory of ScaNN assets, ids and a manifest.

A saved index is a directory holding ScaNN's serialised searcher (``scann_assets.pbtxt``
and the arrays it names, ``dataset.npy`` among them: the corpus vectors), ``ids.npy``
(the ids in row order, as utf-8 bytes) and ``manifest.json``: format and version,
metric, dims, count, ScaNN parameters, measured recall, provenance, and each file's size
and sha256. ``write_atomically`` fills a temporary directory next to the target, syncs
it and swaps it in with one rename (renameat2 exchange on Linux), so a failed save
leaves any previous index as it was. ``read_index_directory`` checks the manifest and
every file against it before ScaNN reads anything.

Shapes: ids.npy [N] bytes; dataset.npy [N, dims] float32.

Example:
    >>> target = write_atomically("/tmp/item_index", index._write)
    >>> VectorIndex(**read_index_directory(target, verify=True)).count
    20000
"""

import contextlib
import ctypes
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from lf_jax.export.index_inputs import VectorIndexError
from lf_jax.export.scann_tuning import SearchParams
from lf_jax.workdir import fsync_tree, replaceable_dir, temp_sibling

FORMAT = "lf_jax.VectorIndex"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"
IDS_FILE = "ids.npy"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read 4 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result != 0:
        errno = ctypes.get_errno()
        if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot swap
            return False
        raise OSError(errno, os.strerror(errno), str(b))
    return True


def replace_directory(new: Path, target: Path) -> None:
    """Puts ``new`` at ``target``; an existing ``target`` is replaced only once ``new`` is
    complete."""
    if not target.exists():
        os.rename(new, target)
        return
    if exchange_paths(new, target):  # new now holds the previous index
        shutil.rmtree(new, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)  # a crash between the two renames leaves the old index at `old`
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def manifest_timestamp() -> str:
    """Now, in UTC, to the second (ISO 8601): the manifest's built_at and saved_at."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def scann_version() -> str | None:
    """The installed scann package's version (recorded in the manifest), or None."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("scann")
    return None


def write_atomically(directory: str | os.PathLike, write) -> Path:
    """Runs ``write(temp_directory)``, then swaps the result in at ``directory``; returns its path.

    Everything is written to a temporary directory next to the target, synced, then
    swapped in with one rename; a failed write leaves any previous index at
    ``directory`` as it was. An existing ``directory`` must be an index or empty:
    other directories are never replaced.
    """
    target = replaceable_dir(directory, MANIFEST, VectorIndexError, "VectorIndex.save:")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_sibling(target)
        temp.mkdir()
    except OSError as error:
        raise VectorIndexError(
            f"VectorIndex.save: cannot write under '{target.parent}': {error.strerror or error}"
        ) from None
    try:
        write(temp)
        fsync_tree(temp)
        replace_directory(temp, target)
    except (OSError, RuntimeError) as error:
        raise VectorIndexError(
            f"VectorIndex.save: cannot write '{target}': "
            f"{getattr(error, 'strerror', None) or error}"
        ) from None
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return target


def write_index_files(directory: Path, searcher, ids: np.ndarray, manifest: dict) -> None:
    """Writes the searcher, ``ids`` [N] str and ``manifest`` (plus saved_at and files) to
    ``directory``."""
    searcher.serialize(str(directory), True)  # asset paths relative to the directory
    # utf-8 bytes ('S'): a quarter of numpy's UTF-32 strings for ASCII ids
    np.save(directory / IDS_FILE, np.strings.encode(ids, "utf-8"), allow_pickle=False)
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(directory.iterdir())
    }
    manifest = seal_manifest(dict(manifest, saved_at=manifest_timestamp(), files=files))
    with open(directory / MANIFEST, "w") as file:
        json.dump(manifest, file, indent=2)


def _manifest_digest(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != MANIFEST_SHA256}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` plus ``manifest_sha256``: the sha256 of its canonical JSON (sorted keys,
    no spaces) without that key, so that any edit of the file, even valid JSON, is found."""
    return dict(manifest, **{MANIFEST_SHA256: _manifest_digest(manifest)})


def check_manifest_seal(manifest: dict, path: Path, error: type[Exception]) -> None:
    """Raises ``error`` naming ``path`` when ``manifest`` was edited after it was sealed."""
    if manifest.get(MANIFEST_SHA256) != _manifest_digest(manifest):
        problem = "has no checksum" if MANIFEST_SHA256 not in manifest else "was edited"
        raise error(
            f"'{path}' {problem}: its {MANIFEST_SHA256} does not match its content; "
            "rewrite it with the tool that made it"
        )


def _read_manifest(directory: Path) -> dict:
    """The parsed manifest.json of an index directory, after format and version checks."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise VectorIndexError(
            f"VectorIndex.load: '{directory}' has no {MANIFEST}; not an index "
            "directory (or an interrupted copy)"
        ) from None
    except (OSError, ValueError) as error:
        raise VectorIndexError(
            f"VectorIndex.load: '{directory / MANIFEST}' is not readable JSON: {error}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VectorIndexError(
            f"VectorIndex.load: '{directory / MANIFEST}' is not a {FORMAT} manifest"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise VectorIndexError(
            f"VectorIndex.load: '{directory}' has format_version "
            f"{manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    check_manifest_seal(manifest, directory / MANIFEST, VectorIndexError)
    return manifest


def read_index_directory(directory: str | os.PathLike, *, verify: bool = True) -> dict:
    """Reads an index written by ``write_index_files``: the keyword arguments of VectorIndex.

    ``verify`` checks every file's sha256 against the manifest (sizes are always checked).
    Returns {"searcher", "ids", "vectors", "metric", "input_dim", "dims", "params",
    "manifest"}; vectors [N, dims] is memory-mapped, or None without dataset.npy.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise VectorIndexError(f"VectorIndex.load: '{directory}' is not a directory")
    manifest = _read_manifest(directory)
    try:
        files = dict(manifest["files"])
        params = SearchParams(**manifest["params"])
        metric, input_dim, dims, count = (
            manifest["metric"],
            int(manifest["input_dim"]),
            int(manifest["dims"]),
            int(manifest["count"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise VectorIndexError(
            f"VectorIndex.load: '{directory / MANIFEST}' lacks or garbles {error}"
        ) from None
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            raise VectorIndexError(
                f"VectorIndex.load: '{path}' is missing; the index is incomplete"
            )
        expected = info if isinstance(info, dict) else {}
        if path.stat().st_size != expected.get("bytes") or (
            verify and file_sha256(path) != expected.get("sha256")
        ):
            raise VectorIndexError(
                f"VectorIndex.load: '{path}' does not match its checksum in "
                f"{MANIFEST}; the index is corrupt"
            )
    try:
        ids = np.load(directory / IDS_FILE, allow_pickle=False)
        ids = np.strings.decode(ids, "utf-8") if ids.dtype.kind == "S" else ids
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise VectorIndexError(
            f"VectorIndex.load: '{directory / IDS_FILE}' is not readable: {error}"
        ) from None
    if ids.dtype.kind != "U" or ids.shape != (count,):
        raise VectorIndexError(
            f"VectorIndex.load: '{directory / IDS_FILE}' holds {ids.dtype} "
            f"{ids.shape}, expected {count} str ids"
        )
    try:
        from scann import scann_ops_pybind

        assets = (directory / "scann_assets.pbtxt").read_text()
        searcher = scann_ops_pybind.scann_pybind.ScannNumpy(str(directory), assets)
    except (OSError, RuntimeError, ValueError) as error:
        raise VectorIndexError(
            f"VectorIndex.load: ScaNN cannot read '{directory}': {error}"
        ) from None
    if searcher.size() != count:
        raise VectorIndexError(
            f"VectorIndex.load: '{directory}' holds {searcher.size()} vectors "
            f"but {count} ids; the index is corrupt"
        )
    vectors = None
    if (directory / "dataset.npy").is_file():  # mapped: stays valid if the directory is replaced
        vectors = np.load(directory / "dataset.npy", mmap_mode="r", allow_pickle=False)
        if vectors.shape != (count, dims):
            vectors = None
    manifest = {key: value for key, value in manifest.items() if key not in ("files", "params")}
    return {
        "searcher": searcher,
        "ids": ids,
        "vectors": vectors,
        "metric": metric,
        "input_dim": input_dim,
        "dims": dims,
        "params": params,
        "manifest": manifest,
    }
