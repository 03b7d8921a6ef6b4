"""Output directories: created up front, with one clear error when they cannot be written,
and flushed to disk before a rename publishes them.

Example:
    >>> ensure_writable_dir("runs/ranker", "workdir")
    PosixPath('runs/ranker')
    >>> fsync_tree(Path("runs/export/.tmp-posts"))       # then os.replace(...)
"""

import os
import re
from pathlib import Path

from lf_jax.errors import UserInputError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def reject_remote(path: str | os.PathLike, what: str) -> None:
    """UserInputError for a URL (``gs://``, ``s3://``, any fsspec/epath scheme): lf_jax
    writes workdirs, datasets and exports through the local filesystem, and ``Path`` would
    silently turn ``gs://b/run`` into a local directory ``gs:/b/run``.

    Example:
        >>> reject_remote("gs://bucket/run", "--workdir")   # UserInputError: ... mount ...
    """
    text = os.fspath(path)
    if _URL.match(str(text)):
        raise UserInputError(
            f"{what} '{text}' is a remote URL; lf_jax reads and writes it through the local "
            "filesystem: mount the bucket (e.g. Cloud Storage FUSE, /gcs/BUCKET) and pass "
            "the mounted path"
        )


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Creates ``path`` and checks a file can be written there, before any device work.

    Raises UserInputError naming ``what`` and the path otherwise (a URL included, see
    reject_remote).
    """
    reject_remote(path, what)
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".lf_jax_write_probe.{os.getpid()}"  # one per process
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserInputError(f"{what} '{directory}' is not writable: {error.strerror}") from None
    return directory


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory``, deepest first, then ``directory``."""
    for path in [*sorted(directory.rglob("*"), key=lambda p: -len(p.parts)), directory]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replaceable_dir(
    path: str | os.PathLike, marker: str, error: type[Exception], what: str
) -> Path:
    """``path`` as an absolute path that a writer may (re)place with one rename: absent,
    empty, or a directory holding ``marker`` (its own earlier output). Anything else is
    ``error`` naming ``what`` and the path: other directories are never replaced."""
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise error(f"{what} '{target}' exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise error(
            f"{what} '{target}' is a non-empty directory without {marker}; "
            "refusing to replace it (choose an empty or new directory)"
        )
    return target
