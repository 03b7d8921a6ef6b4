"""Host-side preprocessing: ragged ids -> padded static-shape arrays.

Accepted forms per feature (B examples):
  * a list of lists of ints (ragged bags) or a list of ints (one id each),
  * a tuple ``(values, lengths)`` of 1-D integer arrays,
  * a 2-D integer array [B, L'] padded with -1, or a 1-D integer array [B].
Bags longer than ``max_ids`` keep their first max_ids ids (or raise when the feature
sets ``truncate=False``). Weights (only for ``weighted`` features) take the same forms,
one finite number per id; in a padded 2-D weights array the values at the ids' -1
padding are ignored. A ``mean`` feature's bags with a nonzero weight need a positive weight sum.
Output ids are [B, max_ids] int32 padded with -1; weights are [B, max_ids] float32 (1 for
unweighted ids, 0 for padding).

Example:
    >>> batch = preprocess(features, tables, {"history": [[1, 2, 3], [], [7]]})
    >>> batch.ids["history"].shape
    (3, 50)
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError


class InvalidIdsError(UserInputError):
    """Ids that are out of range, negative, non-integer, or badly shaped."""


class SparseBatch(NamedTuple):
    """Padded ids and weights per feature: ids [B, L] int32 (-1 pad), weights [B, L] f32."""

    ids: dict
    weights: dict


def _to_padded(name: str, raw: Any, max_ids: int, truncate: bool, what: str) -> np.ndarray:
    """Returns [B, max_ids] float64 values with NaN padding (ids or weights)."""
    if isinstance(raw, tuple) and len(raw) == 2:
        values, lengths = (np.asarray(part) for part in raw)
        if values.ndim != 1 or lengths.ndim != 1:
            raise InvalidIdsError(
                f"feature '{name}': (values, lengths) must both be 1-D, got shapes "
                f"{values.shape} and {lengths.shape}"
            )
        if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
            raise InvalidIdsError(
                f"feature '{name}': lengths must be integers, got dtype {lengths.dtype}"
            )
        if lengths.size and lengths.min() < 0:
            raise InvalidIdsError(
                f"feature '{name}': lengths must be >= 0, got {int(lengths.min())} "
                f"(example {int(np.argmin(lengths))})"
            )
        if lengths.size and lengths.sum() != values.size:
            raise InvalidIdsError(
                f"feature '{name}': lengths sum to {int(lengths.sum())} but there "
                f"are {values.size} {what}"
            )
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        raw = [values[s : s + n] for s, n in zip(starts, lengths, strict=False)]
    if isinstance(raw, np.ndarray) and raw.ndim in (1, 2) and raw.dtype != object:
        array = raw[:, None] if raw.ndim == 1 else raw
        _check_dtype(name, array, what)
        out = np.full((array.shape[0], max_ids), np.nan)
        width = min(array.shape[1], max_ids)
        if array.shape[1] > max_ids and not truncate:
            too_long = (
                np.nonzero((array[:, max_ids:] != -1).any(axis=1))[0].tolist()
                if what == "ids"
                else []
            )
            if len(too_long):
                raise InvalidIdsError(
                    f"feature '{name}': example {too_long[0]} has more than "
                    f"max_ids={max_ids} ids and truncate=False"
                )
        block = array[:, :width].astype(np.float64)
        if what == "ids":
            block[array[:, :width] == -1] = np.nan
        out[:, :width] = block
        return out
    if isinstance(raw, np.ndarray) and raw.ndim > 2:
        raise InvalidIdsError(
            f"feature '{name}': {what} array must be 1-D or 2-D, got shape {raw.shape}"
        )
    if not isinstance(raw, (list, tuple, np.ndarray)):
        raise InvalidIdsError(
            f"feature '{name}': expected a list, (values, lengths) or an array of "
            f"{what}, got {type(raw).__name__}"
        )
    out = np.full((len(raw), max_ids), np.nan)
    for row, bag in enumerate(raw):
        try:
            bag = np.atleast_1d(np.asarray(bag))
        except ValueError:  # a ragged nested list such as [1, [2, 3]]
            raise InvalidIdsError(
                f"feature '{name}': example {row} is not a flat list of {what}"
            ) from None
        if bag.ndim != 1:
            raise InvalidIdsError(f"feature '{name}': example {row} is not a flat list of {what}")
        if bag.size:
            _check_dtype(name, bag, what, row)
        if bag.size > max_ids and not truncate:
            raise InvalidIdsError(
                f"feature '{name}': example {row} has {bag.size} ids, more than "
                f"max_ids={max_ids}, and truncate=False"
            )
        out[row, : min(bag.size, max_ids)] = bag[:max_ids]
    return out


def _check_dtype(name, array, what, row=None):
    where = "" if row is None else f" (example {row})"
    if what == "ids" and not np.issubdtype(array.dtype, np.integer):
        raise InvalidIdsError(
            f"feature '{name}': ids must be integers, got dtype {array.dtype}{where}"
        )
    if what == "weights" and not np.issubdtype(array.dtype, np.number):
        raise InvalidIdsError(
            f"feature '{name}': weights must be numbers, got dtype {array.dtype}{where}"
        )
    if what == "weights" and not np.isfinite(array).all():
        bad = array[~np.isfinite(array)].flat[0]
        raise InvalidIdsError(f"feature '{name}': weights must be finite, got {bad}{where}")


def _check_mean_weights(name: str, weights_bl: np.ndarray, valid_bl: np.ndarray) -> None:
    """A weighted mean divides by the bag's weight sum: a bag with a nonzero weight must
    have a positive sum (an empty bag, or one whose weights are all zero, pools to
    zeros)."""
    sums_b = weights_bl.sum(axis=1, dtype=np.float64)
    weighted_b = (valid_bl & (weights_bl != 0)).any(axis=1)
    bad = weighted_b & (sums_b <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidIdsError(
            f"feature '{name}': example {row} has weights summing to {sums_b[row]:g}; a "
            "weighted mean needs a positive weight sum in every bag with a nonzero weight"
        )


def preprocess(
    features: Mapping[str, FeatureSpec],
    tables: Mapping[str, TableSpec],
    raw_ids: Mapping[str, Any],
    raw_weights: Mapping[str, Any] | None = None,
) -> SparseBatch:
    """Validates and pads every feature; see the module docstring for accepted forms."""
    raw_weights = raw_weights or {}
    missing = sorted(set(features) - set(raw_ids))
    if missing:
        raise InvalidIdsError(f"batch lacks feature(s) {missing}")
    unknown = sorted(set(raw_ids) - set(features))
    if unknown:
        raise InvalidIdsError(
            f"batch has unknown feature(s) {unknown} (features: {sorted(features)})"
        )
    unweighted = sorted(set(raw_weights) - {n for n, f in features.items() if f.weighted})
    if unweighted:
        raise InvalidIdsError(
            f"batch has weights for feature(s) {unweighted}, which are unknown or "
            f"not weighted (set weighted=True in their FeatureSpec)"
        )
    ids, weights, batch_size = {}, {}, None
    for name, feature in features.items():
        padded = _to_padded(name, raw_ids[name], feature.max_ids, feature.truncate, "ids")
        if batch_size is None:
            batch_size = padded.shape[0]
        elif padded.shape[0] != batch_size:
            raise InvalidIdsError(
                f"feature '{name}' has {padded.shape[0]} examples, expected "
                f"{batch_size} like the other features"
            )
        valid = ~np.isnan(padded)
        vocab = tables[feature.table].vocab_size
        bad = valid & ((padded < 0) | (padded >= vocab))
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            if feature.oov_row is None:
                raise InvalidIdsError(
                    f"feature '{name}': id {int(padded[row, col])} (example {row}) is outside "
                    "table "
                    f"'{feature.table}' rows [0, {vocab}); set oov_row to map such ids"
                )
            padded[bad] = feature.oov_row
        ids[name] = np.where(valid, padded, -1).astype(np.int32)
        if feature.weighted:
            if name not in raw_weights:
                raise InvalidIdsError(
                    f"feature '{name}' is weighted but the batch has no weights for it"
                )
            raw_w = raw_weights[name]
            w = _to_padded(name, raw_w, feature.max_ids, True, "weights")
            if w.shape != padded.shape:
                raise InvalidIdsError(
                    f"feature '{name}': weights are for {w.shape[0]} examples, "
                    f"ids for {padded.shape[0]}"
                )
            # A padded weights array has values at the ids' -1 padding: they are ignored.
            padded_form = (
                isinstance(raw_w, np.ndarray) and raw_w.ndim == 2 and raw_w.dtype != object
            )
            mismatch = (np.isnan(w) & valid) | (~np.isnan(w) & ~valid & (not padded_form))
            if mismatch.any():
                row = int(np.nonzero(mismatch.any(axis=1))[0][0])
                raise InvalidIdsError(
                    f"feature '{name}': example {row} has {int(valid[row].sum())} "
                    f"ids but {int((~np.isnan(w[row])).sum())} weights"
                )
            weights[name] = np.where(valid, w, 0.0).astype(np.float32)
            if feature.combiner == "mean":
                _check_mean_weights(name, weights[name], valid)
        else:
            weights[name] = valid.astype(np.float32)
    return SparseBatch(ids, weights)


def check_id_fill(id_fill) -> None:
    """``UserInputError`` unless ``id_fill`` is a number in (0, 1] (EmbeddingCollection)."""
    if isinstance(id_fill, bool) or not isinstance(id_fill, (int, float)):
        raise UserInputError(f"id_fill must be a number in (0, 1], got {id_fill!r}")
    if not 0 < id_fill <= 1:
        raise UserInputError(f"id_fill must be in (0, 1], got {id_fill!r}")


def check_activation_grads(features: Mapping, tables: Mapping, batch: SparseBatch, grads) -> None:
    """``UserInputError`` naming the feature unless ``grads`` holds, for every feature of
    ``batch``, the shape of its activations with the batch's leading axes: [..., B, D]
    pooled, [..., B, max_ids, D] for combiner "none" (D: its table's dim). Shapes only:
    raised while tracing, before any device work (``apply_gradients``)."""
    missing = sorted(set(batch.ids) - set(grads))
    if missing:
        raise UserInputError(
            f"activation gradients are missing for features {missing} (given: {sorted(grads)})"
        )
    for name, ids in batch.ids.items():
        feature = features[name]
        dim = tables[feature.table].dim
        want = (*ids.shape[:-1], dim) if feature.pooled else (*ids.shape, dim)
        got = tuple(np.shape(grads[name]))
        if got != want:
            raise UserInputError(
                f"feature '{name}': activation gradient of shape {got}, expected {want} (the "
                f"lookup's output: batch {ids.shape[:-1]}, "
                f"{'pooled' if feature.pooled else f'sequence of {ids.shape[-1]}'}, dim {dim} "
                f"of table '{feature.table}')"
            )


def id_fill(batches: Sequence[SparseBatch], num_devices: int, step: float = 0.125) -> float:
    """The largest fraction of real ids (>= 0) among one device's padded id slots of any
    feature, over ``batches`` split into ``num_devices`` contiguous shards of examples
    (as EmbeddingCollection.shard_batch places them), rounded up to a multiple of
    ``step`` (so that similar data gives the same value and the step does not
    recompile) and at most 1. Pass it as EmbeddingCollection's ``id_fill``.

    Example:
        >>> id_fill([batch], num_devices=8)  # bags of 1-20 ids, max_ids=20: 0.625
    """
    if not batches:
        raise UserInputError("id_fill: need at least one batch, got none")
    if not 0 < step <= 1:
        raise UserInputError(f"id_fill: step must be in (0, 1], got {step!r}")
    most = 0.0
    for batch in batches:
        for name, ids in batch.ids.items():
            ids = np.asarray(ids)
            if ids.ndim != 2 or ids.shape[0] % num_devices:
                raise UserInputError(
                    f"id_fill: feature '{name}' ids must be [B, L] with B divisible by "
                    f"{num_devices} devices, got shape {ids.shape}"
                )
            shards = (ids >= 0).reshape(num_devices, -1).mean(axis=1)
            most = max(most, float(shards.max()))
    return min(1.0, max(step, math.ceil(most / step - 1e-9) * step))
