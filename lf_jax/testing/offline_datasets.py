"""Builds the project's tfds datasets for a test run with the network blocked, once per run.

The test suite shares one tiny feed_logs build between its xdist workers: whoever holds
``<shared>.lock`` first builds ``<shared>/feed_logs``, everyone else waits on the lock
and then finds the data prepared. ``make test``'s controller process starts this module
as a background process before any test runs (tests/conftest.py), so the ~45 CPU s build
overlaps the first tests instead of holding a worker.

Example::

    python -m lf_jax.testing.offline_datasets /tmp/run/feed_logs_tiny   # prints "locked"
"""

import os
import socket
import sys
from pathlib import Path
from unittest import mock

from filelock import FileLock


def _no_network(*args, **kwargs):
    raise AssertionError("building a dataset tried to reach the network")


def build_offline(name: str, config: str, data_dir: str | Path):
    """``lf_jax.input.build_dataset(name, config, data_dir)`` with sockets that cannot
    connect: a builder that tries to download fails instead of hanging."""
    from lf_jax.input import build_dataset

    with (
        mock.patch.object(socket.socket, "connect", _no_network),
        mock.patch.object(socket, "create_connection", _no_network),
    ):
        return build_dataset(name, config=config, data_dir=str(data_dir))


def build_shared_feed_logs(shared: Path, on_locked=None):
    """Builds feed_logs/tiny into ``shared`` under ``<shared>.lock``; calls ``on_locked()``
    once the lock is held (the background builder tells its parent so)."""
    with FileLock(f"{shared}.lock"):
        if on_locked is not None:
            on_locked()
        return build_offline("feed_logs", "tiny", shared)


def _announce_locked():
    """Tells the parent (reading our stdout pipe) that the lock is held, then sends our
    stdout to stderr: nobody reads the pipe after that line."""
    print("locked", flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    build_shared_feed_logs(Path(sys.argv[1]), on_locked=_announce_locked)
