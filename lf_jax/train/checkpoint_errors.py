"""Errors of lf_jax.train.checkpoint and how they are named: CheckpointError (a step that
cannot be read or a save that failed, naming the step and file), CheckpointMismatchError (a
checkpoint of another model config), and the helpers that find the damaged file in an
Orbax/tensorstore exception chain and catch errors of Orbax's background save thread.

Example:
    >>> file, why = damaged_file(error, directory / "4")   # ("/ckpt/4/state/d/ab12", "...")
"""

import logging
import re
from pathlib import Path

from lf_jax.errors import LfJaxError, UserInputError

# tensorstore and orbax name the file they failed on as: local file "/x/y" / File /x/y not
_FILE_IN_ERROR = re.compile(r'(?:local file "|File )(/[^"\s]+)')
_OCDBT_ENTRY = re.compile(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)"')


def damaged_file(error: BaseException | None, step_dir: Path) -> tuple[str, str]:
    """(where, why) of a failed restore, from its exception chain (Orbax wraps tensorstore's
    error): the data file it names, else the OCDBT database and the array, else the step
    directory; why: the innermost error's own words."""
    texts, seen = [], 0
    while error is not None and seen < 8:
        texts.append(" ".join(str(error).split()) or type(error).__name__)
        error, seen = error.__cause__ or error.__context__, seen + 1
    text = "\n".join(texts)
    why = texts[-1].split('": ')[-1] if texts else "unknown error"
    why = why if len(why) <= 160 else why[:160] + "..."
    files = [path for path in _FILE_IN_ERROR.findall(text) if not path.endswith("/")]
    if files:
        return files[-1], why
    entry = _OCDBT_ENTRY.search(text)
    size = re.search(r"not valid for value of size (\d+)", text)
    if entry and size:  # a truncated data file: the one of that size
        sized = [
            p for p in Path(entry[2]).rglob("*") if p.is_file() and p.stat().st_size == int(size[1])
        ]
        if len(sized) == 1:
            return str(sized[0]), why
    if entry:
        return f"{entry[2]} (array {entry[1]})", why
    return str(step_dir), why


class CheckpointError(LfJaxError):
    """A checkpoint that cannot be read, or a save that failed: names the step and file."""


class CheckpointMismatchError(UserInputError):
    """A checkpoint written by another model config: names the first entry that differs."""


class SaveErrors(logging.Filter):
    """Catches the errors Orbax's background save thread logs (with their tracebacks) on
    the ``absl`` logger, so that the main thread raises them as one line instead."""

    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        background = any(
            text in message
            for text in ("background save thread", "Checkpointer failed", "Save Finalize thread")
        )
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and error is not None and background:
            self.errors.append(error)
            return False
        return True


def one_line(error: BaseException) -> str:  # an exception's message on one line
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."
