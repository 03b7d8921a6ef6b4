"""Output directories: created up front, with one clear error when they cannot be written,
and flushed to disk before a rename publishes them.

Example:
    >>> ensure_writable_dir("runs/ranker", "workdir")
    PosixPath('runs/ranker')
    >>> fsync_tree(Path("runs/export/.tmp-posts"))       # then os.replace(...)
    >>> temp = temp_sibling(Path("runs/posts"))    # runs/.posts.tmp-<pid>-<hex>, stale ones gone
"""

import os
import re
import shutil
import uuid
from pathlib import Path

from lf_jax.console import get_logger
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


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def temp_sibling(target: Path) -> Path:
    """A fresh (not yet created) temporary path ``.<name>.tmp-<pid>-<hex>`` beside
    ``target``, for a writer that fills it and renames it onto ``target``.

    Temporary directories of ``target`` left by a writer that was killed (kill -9 during an
    export or an index save) are removed first: those whose pid no longer runs on this
    host, and those named without a pid (older versions). Each removal is logged.
    """
    pattern = re.compile(re.escape(f".{target.name}.tmp-") + r"(?:(\d+)-)?[0-9a-f]+")
    if target.parent.is_dir():
        for path in target.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match and path.is_dir() and not (match[1] and _pid_running(int(match[1]))):
                shutil.rmtree(path, ignore_errors=True)
                get_logger().info("removed '%s', left by an interrupted writer", path)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
