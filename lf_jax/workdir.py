"""Output directories: created up front, with one clear error when they cannot be written.

Example:
    >>> ensure_writable_dir("runs/ranker", "workdir")
    PosixPath('runs/ranker')
"""

import os
from pathlib import Path

from lf_jax.errors import UserInputError


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Creates ``path`` and checks a file can be written there, before any device work.

    Raises UserInputError naming ``what`` and the path otherwise.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".lf_jax_write_probe.{os.getpid()}"  # one per process
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserInputError(f"{what} '{directory}' is not writable: {error.strerror}") from None
    return directory
