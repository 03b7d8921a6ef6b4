"""Building a VectorIndex: input checks, ScaNN parameters from the corpus size, the
searcher and the manifest (lf_jax.export.scann_index's ``VectorIndex.build`` calls it).

``build_parts`` returns the VectorIndex constructor's keyword arguments, as
``index_files.read_index_directory`` does for ``load``; tuning is the index's own
(``VectorIndex.tune``).

Example:
    >>> index = VectorIndex(**build_parts(vectors, ids, metric="cosine", target_recall=0.95,
    ...                                   num_neighbors=10, dims=None, brute_force_below=2000,
    ...                                   model=None, checkpoint_step=None, training_threads=0))
"""

import time

import numpy as np

from lf_jax.checks import check_int
from lf_jax.console import get_logger
from lf_jax.export.index_files import FORMAT, FORMAT_VERSION, manifest_timestamp, scann_version
from lf_jax.export.index_inputs import (
    VectorIndexError,
    check_ids,
    check_metric,
    check_recall,
    check_unique_ids,
    prepare_vectors,
)
from lf_jax.export.scann_tuning import build_searcher, choose_params


def build_parts(
    vectors,
    ids,
    *,
    metric: str,
    target_recall: float,
    num_neighbors: int,
    dims: int | None,
    brute_force_below: int,
    model: str | None,
    checkpoint_step: int | None,
    training_threads: int,
) -> dict:
    """{searcher, ids, vectors, metric, input_dim, dims, params, manifest} of a new index
    over ``vectors`` [N, D] with string ``ids`` [N] (see ``VectorIndex.build``); bad
    input is one VectorIndexError naming the field."""
    metric = check_metric(metric)
    target_recall = check_recall("target_recall", target_recall)
    num_neighbors = check_int("num_neighbors", num_neighbors, VectorIndexError)
    brute_force_below = check_int("brute_force_below", brute_force_below, VectorIndexError)
    if checkpoint_step is not None:
        check_int("checkpoint_step", checkpoint_step, VectorIndexError, minimum=0)
    shape = np.shape(vectors)
    if len(shape) != 2:
        raise VectorIndexError(f"vectors must be 2-D [N, D], got shape {shape}")
    if shape[0] == 0:
        raise VectorIndexError(
            "vectors: the corpus is empty (0 vectors); an index needs at least one"
        )
    if dims is not None:
        dims = check_int("dims", dims, VectorIndexError)
        if dims > shape[1]:
            raise VectorIndexError(f"dims={dims} is more than the vectors' {shape[1]} columns")
    id_array = check_ids(ids, shape[0])
    check_unique_ids(id_array)
    if num_neighbors > shape[0]:
        raise VectorIndexError(f"num_neighbors={num_neighbors} is more than the {shape[0]} vectors")
    corpus = prepare_vectors(
        vectors, field="vectors", metric=metric, width=None, dims=dims, ids=id_array
    )
    params, reason = choose_params(
        corpus.shape[0],
        num_neighbors=num_neighbors,
        metric=metric,
        brute_force_below=brute_force_below,
    )
    start = time.perf_counter()
    try:
        searcher = build_searcher(corpus, params, metric, training_threads)
    except RuntimeError as error:  # ScaNN's own checks (should not happen after ours)
        raise VectorIndexError(
            f"ScaNN could not build the index ({params.mode}): {error}"
        ) from None
    build_seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "checkpoint_step": None if checkpoint_step is None else int(checkpoint_step),
        "metric": metric,
        "input_dim": int(shape[1]),
        "dims": corpus.shape[1],
        "count": corpus.shape[0],
        "mode_reason": reason,
        "brute_force_below": brute_force_below,
        "build_seconds": round(build_seconds, 3),
        "built_at": manifest_timestamp(),
        "scann_version": scann_version(),
        "target_recall": target_recall,
        "recall": None,
        "updates_since_recall": 0,
    }
    get_logger().info(
        "VectorIndex: built %s over %d x %d in %.1f s (%s)",
        params.mode,
        corpus.shape[0],
        corpus.shape[1],
        build_seconds,
        reason,
    )
    return {
        "searcher": searcher,
        "ids": id_array,
        "vectors": corpus,
        "metric": metric,
        "input_dim": int(shape[1]),
        "dims": corpus.shape[1],
        "params": params,
        "manifest": manifest,
    }
