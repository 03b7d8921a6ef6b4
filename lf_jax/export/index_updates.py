"""In-place updates of a VectorIndex: ScaNN's upsert and delete, mirrored in the id map.

scann 1.4.2's pybind searcher supports ``upsert`` and ``delete`` on both the tree-AH and
the brute-force searcher. An upserted known id keeps its row; new ids are appended in
order; a deleted row is filled by the last one, one deletion after the other. These
functions apply an update to the searcher and return the ids [N'] (and the prepared
vectors [N', D], when the index holds them) in the searcher's new row order, keeping
``rows`` (id -> row) in step. A VectorIndex (lf_jax.export.scann_index) calls them.

Example:
    >>> new_ids, prepared = upsert_inputs(["p7"], vectors_1d, "cosine", width=64, dims=32)
    >>> ids, vectors, added, replaced = upsert_rows(searcher, ids, vectors, rows,
    ...                                             np.array(["p7"]), prepared_1d, 1024)
    >>> keys = deletable_keys(np.array(["p3"]), rows, missing_ok=False)
    >>> ids, vectors = delete_rows(searcher, ids, vectors, rows, keys)
"""

import numpy as np

from lf_jax.export.index_inputs import (
    VectorIndexError,
    check_ids,
    check_unique_ids,
    prepare_vectors,
)


def upsert_inputs(
    ids, vectors, metric: str, width: int, dims: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids [n], prepared vectors [n, dims]) of an upsert, checked: unique ids, one per
    vector, vectors of the index's input width or already ``dims`` wide; None when
    there are no ids."""
    id_array = check_ids(ids, np.shape(vectors)[0] if np.ndim(vectors) == 2 else None)
    if id_array.size == 0:
        return None
    check_unique_ids(id_array)
    prepared = prepare_vectors(
        vectors,
        field="vectors",
        metric=metric,
        width=width,
        dims=dims if dims < width else None,
        ids=id_array,
    )
    return id_array, prepared


def upsert_rows(
    searcher, ids: np.ndarray, vectors, rows: dict, new_ids: np.ndarray, prepared, batch_size
) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    """(ids, vectors, added, replaced) after upserting ``new_ids`` [n] with ``prepared``
    [n, D] (already checked and cut to the index's dims)."""
    keys = new_ids.tolist()
    indices = [rows.get(key) for key in keys]
    try:
        assigned = searcher.upsert(indices, prepared, batch_size)
    except RuntimeError as error:
        raise VectorIndexError(f"ScaNN upsert failed: {error}") from None
    assigned = np.asarray(assigned, np.int64)
    new = np.array([index is None for index in indices])
    replaced_rows, added_rows = assigned[~new], assigned[new]
    expected_rows = np.arange(ids.size, ids.size + added_rows.size)
    if added_rows.size and not np.array_equal(added_rows, expected_rows):
        raise RuntimeError("ScaNN placed new items out of order; the id map would be wrong")
    ids = np.concatenate([ids, new_ids[new]]) if added_rows.size else ids
    for key, row in zip(new_ids[new].tolist(), added_rows.tolist(), strict=False):
        rows[key] = row
    if vectors is not None:
        vectors = np.array(vectors) if not vectors.flags.writeable else vectors
        vectors[replaced_rows] = prepared[~new]
        vectors = np.concatenate([vectors, prepared[new]]) if added_rows.size else vectors
    return ids, vectors, int(added_rows.size), int(replaced_rows.size)


def deletable_keys(ids: np.ndarray, rows: dict, missing_ok: bool) -> list[str]:
    """The distinct ``ids`` [n] the index holds, in order. An unknown id is an error naming
    it (unless ``missing_ok``), and so is deleting every item (build a new index)."""
    keys = list(dict.fromkeys(ids.tolist()))
    unknown = [key for key in keys if key not in rows]
    if unknown and not missing_ok:
        raise VectorIndexError(
            f"ids: {len(unknown)} of {len(keys)} ids are not in the index "
            f"(first: {unknown[0]!r}); pass missing_ok=True to skip them"
        )
    keys = [key for key in keys if key in rows]
    if keys and len(keys) >= len(rows):
        raise VectorIndexError(
            f"ids: deleting all {len(rows)} items would leave an empty index; build a new "
            "one instead"
        )
    return keys


def delete_rows(
    searcher, ids: np.ndarray, vectors, rows: dict, keys: list[str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, vectors) after deleting ``keys`` (distinct, all in ``rows``, fewer than the
    index holds). On a ScaNN failure ``rows`` is left inconsistent: the caller drops it."""
    ids_now = ids.copy()
    vectors_now = None if vectors is None else np.array(vectors)
    indices, size = [], ids.size
    for key in keys:  # sequential, as ScaNN applies them: the last row fills the hole
        row = rows.pop(key)
        indices.append(row)
        last = size - 1
        if row != last:
            moved = str(ids_now[last])
            ids_now[row] = moved
            rows[moved] = row
            if vectors_now is not None:
                vectors_now[row] = vectors_now[last]
        size -= 1
    try:
        searcher.delete(indices)
    except RuntimeError as error:
        raise VectorIndexError(f"ScaNN delete failed: {error}") from None
    return ids_now[:size], None if vectors_now is None else vectors_now[:size]
