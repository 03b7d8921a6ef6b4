"""The project's one logger and its progress bars.

Progress bars show on an interactive terminal and in a Jupyter kernel (tqdm.auto: a
widget with ipywidgets, text otherwise); they are off when stderr is neither or when the
CI environment variable is set, so logs stay readable.

Example:
    >>> set_verbosity("info")
    >>> for step in progress(range(100), desc="train"):
    ...     pass
"""

import logging
import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

LOGGER_NAME = "lf_jax"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def get_logger() -> logging.Logger:
    """The lf_jax logger (configure once with set_verbosity)."""
    return logging.getLogger(LOGGER_NAME)


def set_verbosity(level: str | int = "info") -> logging.Logger:
    """Sets the lf_jax log level and installs one stderr handler (idempotent).

    ``level`` is debug | info | warning | error or an int 0-3 (0 = warning, 3 = debug).
    """
    if isinstance(level, int) and not isinstance(level, bool):
        if not 0 <= level <= 3:
            raise ValueError(f"verbosity must be 0-3 or a level name, got {level!r}")
        resolved = [logging.WARNING, logging.INFO, logging.INFO, logging.DEBUG][level]
    elif isinstance(level, str) and level.lower() in _LEVELS:
        resolved = _LEVELS[level.lower()]
    else:
        raise ValueError(f"verbosity must be one of {sorted(_LEVELS)} or 0-3, got {level!r}")
    logger = get_logger()
    logger.setLevel(resolved)
    if not any(getattr(h, "_lf_jax", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname).1s lf_jax] %(message)s", datefmt="%H:%M:%S")
        )
        handler._lf_jax = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def ensure_logging() -> logging.Logger:
    """INFO lines on stderr unless the lf_jax logger is configured already (set_verbosity,
    or handlers a user added): training from a notebook shows its log lines."""
    logger = get_logger()
    if not logger.handlers:
        set_verbosity("info")
    return logger


def progress_enabled() -> bool:
    """True on an interactive terminal or in a Jupyter (IPython) kernel, outside CI."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        return False
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    **kwargs,
) -> tqdm:
    """A tqdm bar that is disabled off-TTY and in CI (``disable`` may force it)."""
    kwargs.setdefault("disable", not progress_enabled())
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
