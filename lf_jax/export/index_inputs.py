"""Checks on what callers hand a VectorIndex: metric, recall targets, ids and vectors.

Every check raises ``VectorIndexError`` (a ``UserInputError``) naming the field and the
first bad position, before anything reaches ScaNN. ``prepare_vectors`` turns a checked
[n, D] array into the float32 [n, dims] array ScaNN sees: truncated to ``dims`` columns
(Matryoshka) and, for the cosine metric, L2-normalised.

Shapes: ids [N] str; vectors [n, D] float -> prepared [n, dims] float32.

Example:
    >>> ids = check_ids(["urn:li:item:1", "urn:li:item:2"], count=2)
    >>> prepare_vectors(np.ones((2, 8)), field="vectors", metric="cosine", width=None,
    ...                 dims=4).shape
    (2, 4)
"""

from collections.abc import Sequence

import numpy as np

from lf_jax.checks import first_duplicate
from lf_jax.errors import UserInputError

METRICS = ("dot_product", "squared_l2", "cosine")


class VectorIndexError(UserInputError):
    """Bad vectors, ids, arguments or index directories for a VectorIndex."""


def check_metric(metric) -> str:
    """``metric`` if it is one of METRICS."""
    if metric not in METRICS:
        raise VectorIndexError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_recall(field: str, value) -> float:
    """``value`` as a float in (0, 1], else an error naming ``field``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise VectorIndexError(f"{field} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_ids(ids, count: int | None) -> np.ndarray:
    """A 1-D '<U' array of non-empty ids; count (if given) must match."""
    if isinstance(ids, (str, bytes)):
        raise VectorIndexError(
            f"ids must be a list or array of str, got a single {type(ids).__name__} {ids!r}"
        )
    if not isinstance(ids, np.ndarray):
        ids = ids if isinstance(ids, Sequence) else list(ids)
        bad = next((i for i, v in enumerate(ids) if not isinstance(v, str)), None)
        if bad is not None:  # numpy would silently turn a stray int into a str
            raise VectorIndexError(
                f"ids must be str, got {type(ids[bad]).__name__} {ids[bad]!r} at position {bad}"
            )
    array = np.asarray(ids)
    if array.dtype.kind == "O" and array.size:
        bad = next((i for i, v in enumerate(array.reshape(-1)) if not isinstance(v, str)), None)
        if bad is not None:
            value = array.reshape(-1)[bad]
            raise VectorIndexError(
                f"ids must be str, got {type(value).__name__} {value!r} at position {bad}"
            )
        array = array.astype(str)
    if array.size == 0:
        array = array.astype(str)
    if array.dtype.kind != "U":
        raise VectorIndexError(
            f"ids must be str, got an array of {array.dtype} (convert integer ids "
            "with str() so search returns what you stored)"
        )
    if array.ndim != 1:
        raise VectorIndexError(f"ids must be 1-D, got shape {array.shape}")
    if count is not None and array.size != count:
        raise VectorIndexError(f"ids: got {array.size} ids for {count} vectors")
    empty = np.flatnonzero(np.strings.str_len(array) == 0)
    if empty.size:
        raise VectorIndexError(f"ids must be non-empty strings, got '' at position {int(empty[0])}")
    return array


def check_unique_ids(ids: np.ndarray) -> None:
    """An error naming the first duplicate in ``ids`` [N] str, if there is one."""
    duplicate = first_duplicate(ids)
    if duplicate is not None:
        key, first, second = duplicate
        raise VectorIndexError(
            f"ids must be unique, but {key!r} appears at positions {first} and {second}"
        )


def prepare_vectors(
    vectors,
    *,
    field: str,
    metric: str,
    width: int | None,
    dims: int | None,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """Checks a [n, D] float array and returns float32 [n, dims], normalised for cosine.

    width: the expected D (None: any); a D equal to ``dims`` is accepted too (queries
    already truncated). dims None keeps every column.
    """
    array = np.asarray(vectors)
    if array.dtype.kind not in "fiu":
        raise VectorIndexError(f"{field} must be a float array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise VectorIndexError(f"{field} must be 2-D [n, D], got shape {array.shape}")
    if array.shape[0] == 0:
        raise VectorIndexError(f"{field} is empty (shape {array.shape}); need at least one vector")
    if width is not None and array.shape[1] not in (width, dims):
        expected = (
            f"{width}" if dims in (None, width) else f"{width} (or {dims}, already truncated)"
        )
        raise VectorIndexError(f"{field} must have {expected} columns, got shape {array.shape}")
    if dims is not None and array.shape[1] < dims:
        raise VectorIndexError(f"dims={dims} is more than the {array.shape[1]} columns of {field}")
    array = np.array(
        array[:, :dims] if dims is not None else array, dtype=np.float32, order="C"
    )  # a copy
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        name = f" (id {str(ids[row])!r})" if ids is not None else ""
        raise VectorIndexError(
            f"{field}: row {row}{name} holds NaN or Inf; "
            f"{int((~finite).sum())} of {array.shape[0]} rows are not finite"
        )
    if metric == "cosine":
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if zero.size:
            name = f" (id {str(ids[zero[0]])!r})" if ids is not None else ""
            raise VectorIndexError(
                f"{field}: row {int(zero[0])}{name} is all zeros; the cosine "
                "metric needs non-zero vectors"
            )
        array /= norms
    return array
