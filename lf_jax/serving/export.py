"""Writing serving artifacts: the ranker and the retrieval model from their weights.

``ranker_artifact`` and ``retrieval_artifact`` take a model's graph, weights and id
snapshots (from a checkpoint: export_serving.py; random, for the load generator:
bench/serving.py), export one ``jax.export`` function per bucket and write the directory
of artifact.py. Buckets: every (Q queries, K candidates) in ``queries`` x ``candidates``.
The ranker also gets ``functions/posts.jax``, the function that computes its post cache
(every post-only part of the ranker, functions.posts_function) from feature-store rows,
POST_CHUNK posts per call; the server runs it when it loads a version.

Shapes: Q queries, K candidates, W feature-store row width, T tasks, N items, D dims.

Example:
    >>> manifest = ranker_artifact(out / "ranker", graphdef=g, params=p, tables=tables,
    ...     features=features, dense_mean=m, dense_std=s, tasks=tasks, task_weights=w,
    ...     layout=layout, num_members=300, num_posts=1000, dtype="int8", version="v0001")
    >>> manifest["bytes"], manifest["functions"]["q1_k512"]["file"]
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from lf_jax.embedding.ids import IdMap
from lf_jax.serving.artifact import write_artifact
from lf_jax.serving.feed_features import FeatureLayout
from lf_jax.serving.functions import (
    encode_table,
    export_function,
    posts_function,
    rank_function,
    ranker_weights,
    retrieve_function,
)

QUERY_BUCKETS = (1, 4, 16)
CANDIDATE_BUCKETS = (128, 512, 2048)
POST_CHUNK = 4096  # post rows per call of the ranker's post-cache function


def _params(params) -> tuple[list[np.ndarray], object]:
    leaves, treedef = jax.tree.flatten(jax.device_get(params))
    return [np.asarray(x) for x in leaves], treedef


def _buckets(queries: Sequence[int], candidates: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(q), int(k)) for q in sorted(set(queries)) for k in sorted(set(candidates))]


def _id_map(prefix: str, count: int) -> IdMap:
    return IdMap.build([f"{prefix}{i}" for i in range(count)], num_oov_buckets=1)


def ranker_artifact(
    directory: Path,
    *,
    graphdef,
    params,
    tables: Mapping[str, np.ndarray],
    features: Mapping[str, tuple[str, str]],
    dense_mean: np.ndarray,
    dense_std: np.ndarray,
    tasks: Sequence[str],
    task_weights: Mapping[str, float],
    layout: FeatureLayout,
    num_members: int,
    num_posts: int,
    dtype: str,
    version: str,
    queries: Sequence[int] = QUERY_BUCKETS,
    candidates: Sequence[int] = CANDIDATE_BUCKETS,
    source: Mapping | None = None,
    quality: Mapping | None = None,
    dynamic: Mapping | None = None,
) -> dict:
    """Writes the ranker's artifact; ``features``: {feature: (table, combiner)} in the
    model's field order; ``tables``: logical [V, D] float32 tables (row i of the member
    and post tables is "m<i>" / "p<i>"), except the dynamic tables of ``dynamic``
    ({"key_rows": {table: int32 [V]}, "summary": {table: {...}}}, dynamic_tables.py):
    their compacted rows, read through key_rows (functions.served_ids)."""
    leaves, treedef = _params(params)
    features = dict(features)
    weights = ranker_weights(
        graphdef,
        treedef,
        features,
        {
            "params": leaves,
            "tables": {name: encode_table(values, dtype) for name, values in tables.items()},
            "dense_mean": np.asarray(dense_mean, np.float32),
            "dense_std": np.asarray(dense_std, np.float32),
            **(
                {"key_rows": {t: np.asarray(v, np.int32) for t, v in dynamic["key_rows"].items()}}
                if dynamic
                else {}
            ),
        },
    )
    chunk = min(POST_CHUNK, num_posts)
    posts_fn = posts_function(graphdef, treedef, features, layout)
    post_args = (np.zeros((chunk, layout.width), np.float32), np.zeros(chunk, np.int32))
    functions = {"posts": export_function(posts_fn, weights, *post_args)}
    cache = jax.eval_shape(posts_fn, weights, *post_args)
    posts_nc = np.zeros((num_posts, cache.shape[1]), np.float32)
    fn = rank_function(graphdef, treedef, features, layout)
    entries = {}
    for q, k in _buckets(queries, candidates):
        name = f"q{q}_k{k}"
        args = (
            posts_nc,
            np.zeros((q, layout.width), np.float32),
            np.zeros(q, np.int32),
            np.zeros((q, k), np.int32),
        )
        functions[name] = export_function(fn, weights, *args)
        entries[name] = {"file": f"functions/{name}.jax", "queries": q, "candidates": k}
    manifest = {
        "model": "ranker",
        "version": version,
        "table_dtype": dtype,
        "tasks": list(tasks),
        "task_weights": {t: float(task_weights.get(t, 0.0)) for t in tasks},
        "functions": entries,
        "post_cache": {
            "file": "functions/posts.jax",
            "rows_per_call": chunk,
            "num_posts": num_posts,
            "width": int(cache.shape[1]),
            "inputs": [
                {"name": "post_rows", "shape": [chunk, layout.width], "dtype": "float32"},
                {"name": "post_table_rows", "shape": [chunk], "dtype": "int32"},
            ],
        },
        "inputs": [
            {"name": "post_cache", "shape": list(posts_nc.shape), "dtype": "float32"},
            {"name": "member_rows", "shape": ["Q", layout.width], "dtype": "float32"},
            {"name": "member_table_rows", "shape": ["Q"], "dtype": "int32"},
            {"name": "post_table_rows", "shape": ["Q", "K"], "dtype": "int32"},
        ],
        "outputs": [{"name": "probs", "shape": ["Q", "K", len(tasks)], "dtype": "float32"}],
        "layout": layout.to_json(),
        "features": {name: list(spec) for name, spec in features.items()},
        "tables": {name: list(np.shape(values)) for name, values in tables.items()},
        "id_maps": ["member", "post"],
        **({"dynamic_tables": dict(dynamic["summary"])} if dynamic else {}),
        "source": dict(source or {}),
        "quality": dict(quality or {}),
    }
    return write_artifact(
        directory,
        manifest=manifest,
        weights=weights,
        functions=functions,
        id_maps={"member": _id_map("m", num_members), "post": _id_map("p", num_posts)},
    )


def retrieval_artifact(
    directory: Path,
    *,
    graphdef,
    params,
    items: np.ndarray,
    item_keys: Sequence[str],
    num_members: int,
    layout: FeatureLayout,
    pad_id: int,
    dtype: str,
    version: str,
    queries: Sequence[int] = QUERY_BUCKETS,
    candidates: Sequence[int] = CANDIDATE_BUCKETS,
    source: Mapping | None = None,
) -> dict:
    """Writes the retrieval artifact: the member tower over the prompt columns of member rows
    and the unit item vectors [N, D] (rows named by ``item_keys``); K buckets above N are
    cut to N."""
    items = np.asarray(items, np.float32)
    leaves, treedef = _params(params)
    weights = {"params": leaves, "items": encode_table(items, dtype)}
    dims = items.shape[1]
    functions, entries, by_q = {}, {}, {}
    ks = sorted({min(int(k), len(items)) for k in candidates})
    fn = retrieve_function(graphdef, treedef, layout, pad_id, dims)
    for q, k in _buckets(queries, ks):  # one function per Q (K is the host's top-K)
        if q not in by_q:
            member_qw = np.zeros((q, layout.width), np.float32)
            by_q[q] = export_function(fn, weights, member_qw)
        name = f"q{q}_k{k}"
        functions[name] = by_q[q]
        entries[name] = {"file": f"functions/{name}.jax", "queries": q, "candidates": k}
    manifest = {
        "model": "retrieval",
        "version": version,
        "table_dtype": dtype,
        "metric": "cosine",
        "num_items": len(items),
        "dims": dims,
        "functions": entries,
        "inputs": [{"name": "member_rows", "shape": ["Q", layout.width], "dtype": "float32"}],
        # cosine scores of every item; the server takes the top K (functions.top_k_rows)
        "outputs": [{"name": "scores", "shape": ["Q", len(items)], "dtype": "float32"}],
        "layout": layout.to_json(),
        "id_maps": ["member", "item"],
        "keys": ["item"],
        "source": dict(source or {}),
    }
    return write_artifact(
        directory,
        manifest=manifest,
        weights=weights,
        functions=functions,
        id_maps={"member": _id_map("m", num_members), "item": IdMap.build(list(item_keys))},
        keys={"item": np.asarray(item_keys)},
    )
