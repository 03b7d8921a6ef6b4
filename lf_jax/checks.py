"""Host-side checks shared by every module: integer arguments and duplicate ids.

Each check raises the caller's error class (a UserInputError subclass) with one message
naming the field and the value, so a bad argument reads the same wherever it is checked.

Example:
    >>> check_int("batch_size", 0, PipelineError)
    PipelineError: batch_size must be a positive int, got 0
    >>> first_duplicate(np.array(["a", "b", "a"]))
    ('a', 0, 2)
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from lf_jax.errors import UserInputError


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(
    field: str,
    value,
    error: type[Exception] = UserInputError,
    *,
    minimum: int = 1,
    hint: str = "",
) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), else ``error`` naming ``field``:
    "<field> must be a positive int<hint>, got <value>" (or "an int >= <minimum>")."""
    if not is_int(value) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise error(f"{field} must be {kind}{hint}, got {value!r}")
    return int(value)


def first_duplicate(ids: Sequence | np.ndarray) -> tuple[Any, int, int] | None:
    """The duplicate whose second occurrence comes first: (id, first row, second row), or
    None. The id comes back as a Python object (str, bytes, int)."""
    ids = np.asarray(ids) if isinstance(ids, np.ndarray) else np.asarray(list(ids), object)
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if same.size == 0:
        return None
    second_positions = order[same + 1]
    pick = int(np.argmin(second_positions))
    key = ids[second_positions[pick]]
    first = int(np.flatnonzero(ids == key)[0])
    return (key.item() if isinstance(key, np.generic) else key), first, int(second_positions[pick])
