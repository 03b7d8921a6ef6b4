"""ScaNN parameters for a VectorIndex: the first choice from the corpus size, then tuning.

``choose_params`` picks the mode from the corpus size: under ``brute_force_below``
vectors (2000) an exact float32 brute-force searcher; otherwise a partitioning tree
(about sqrt(N) leaves), asymmetric hashing (2 dims per block, anisotropic quantization
threshold 0.2 for dot product and cosine) and exact reordering of the best
``reorder_k`` candidates. ``build_searcher`` turns those parameters into a ScaNN
searcher. ``run_tuning_trials`` measures recall@k against ``exact_search`` (numpy) for a
ladder of ``leaves_to_search``, then ``reorder_k`` settings, and keeps the cheapest
setting that reaches the goal.

Shapes: corpus [N, D] float32 and queries [Q, D] float32, both prepared (truncated and,
for cosine, normalised); ``exact_search`` returns rows [Q, k] int64 and scores [Q, k]
float32.

Example:
    >>> params, why = choose_params(20_000, num_neighbors=10, metric="dot_product")
    >>> params.mode, params.num_leaves
    ('tree_ah', 141)
    >>> rows, scores = exact_search(corpus, queries, k=10)
    >>> recall_at_k(found_rows, rows)
    0.97
"""

import dataclasses
import math
import os
import time

import numpy as np

from lf_jax.console import get_logger

MODES = ("tree_ah", "brute_force")
BRUTE_FORCE_BELOW = 2000
DIMS_PER_BLOCK = 2
ANISOTROPIC_THRESHOLD = 0.2
TUNE_QUERIES = 1000
# Exact search scores at most this many (query, vector) pairs at a time (16 MiB of float32).
EXACT_TILE = 1 << 22


@dataclasses.dataclass(frozen=True)
class SearchParams:
    """The ScaNN configuration of an index (``mode`` tree_ah or brute_force).

    ``leaves_to_search`` and ``reorder_k`` are search-time settings (``tune`` changes
    them without a rebuild); ``reorder_k`` is for ``num_neighbors`` results and grows in
    proportion for a larger k. The other fields are fixed when the index is trained.
    """

    mode: str
    num_neighbors: int
    num_leaves: int = 0
    leaves_to_search: int = 0
    reorder_k: int = 0
    dims_per_block: int = 0
    anisotropic_quantization_threshold: float | None = None
    training_sample_size: int = 0
    min_partition_size: int = 0

    def to_json(self) -> dict:
        """The fields as a dict, as ``manifest.json`` holds them."""
        return dataclasses.asdict(self)


def exact_search(
    corpus: np.ndarray, queries: np.ndarray, k: int, metric: str = "dot_product"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with numpy: (rows [Q, k] int64, scores [Q, k] float32), best first.

    ``corpus`` and ``queries`` are prepared float32 arrays (already truncated and, for
    cosine, normalised). Best: highest dot product, lowest squared distance. Works in
    tiles of at most EXACT_TILE scores (a matmul, then argpartition per tile), keeping
    the best k of each tile, so memory stays small for any corpus.
    """
    n = corpus.shape[0]
    k = min(k, n)
    l2 = metric == "squared_l2"
    norms = np.einsum("ij,ij->i", corpus, corpus) if l2 else None
    query_chunk = min(queries.shape[0], 256) or 1
    block = max(k, EXACT_TILE // query_chunk)
    rows = np.empty((queries.shape[0], k), np.int64)
    scores = np.empty((queries.shape[0], k), np.float32)
    for start in range(0, queries.shape[0], query_chunk):
        q = queries[start : start + query_chunk]
        candidate_sims, candidate_rows = [], []
        for first in range(0, n, block):
            sim = q @ corpus[first : first + block].T
            if norms is not None:  # squared_l2: rank by 2 q.x - |x|^2 (distance - |q|^2, negated)
                sim *= 2.0
                sim -= norms[first : first + block]
            width = sim.shape[1]
            keep = min(k, width)
            top = (
                np.argpartition(sim, width - keep, axis=1)[:, width - keep :]
                if keep < width
                else np.broadcast_to(np.arange(width), sim.shape)
            )
            candidate_sims.append(np.take_along_axis(sim, top, axis=1))
            candidate_rows.append(top + first)
        sims, cands = np.concatenate(candidate_sims, axis=1), np.concatenate(candidate_rows, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        rows[start : start + q.shape[0]] = np.take_along_axis(cands, order, axis=1)
        best = np.take_along_axis(sims, order, axis=1)
        scores[start : start + q.shape[0]] = (
            (np.einsum("ij,ij->i", q, q)[:, None] - best) if l2 else best
        )
    return rows, scores


def recall_at_k(found_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k (ids or rows; padding never matches)."""
    k = exact_rows.shape[1]
    hits = sum(
        len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found_rows, exact_rows, strict=False)
    )
    return hits / (k * exact_rows.shape[0])


def choose_params(
    count: int, *, num_neighbors: int, metric: str, brute_force_below: int = BRUTE_FORCE_BELOW
) -> tuple[SearchParams, str]:
    """ScaNN parameters for a corpus size, before tuning: (params, why this mode)."""
    if count < brute_force_below:
        return (
            SearchParams(mode="brute_force", num_neighbors=num_neighbors),
            f"brute force: {count} vectors < brute_force_below={brute_force_below}",
        )
    num_leaves = max(2, int(round(math.sqrt(count))))
    leaves_to_search = max(1, math.ceil(num_leaves / 20))
    params = SearchParams(
        mode="tree_ah",
        num_neighbors=num_neighbors,
        num_leaves=num_leaves,
        leaves_to_search=leaves_to_search,
        reorder_k=max(100, 10 * num_neighbors),
        dims_per_block=DIMS_PER_BLOCK,
        anisotropic_quantization_threshold=ANISOTROPIC_THRESHOLD
        if metric != "squared_l2"
        else None,
        training_sample_size=min(count, max(100_000, 250 * num_leaves)),
        min_partition_size=max(1, min(50, count // (4 * num_leaves))),
    )
    return params, (
        f"tree + asymmetric hashing + reordering: {count} vectors >= "
        f"brute_force_below={brute_force_below}, {num_leaves} leaves ~ sqrt(N)"
    )


def build_searcher(corpus: np.ndarray, params: SearchParams, metric: str, training_threads: int):
    """Trains a ScaNN searcher (scann_pybind.ScannNumpy) over prepared ``corpus`` [N, D] float32."""
    from scann import scann_ops_pybind

    distance = "squared_l2" if metric == "squared_l2" else "dot_product"
    builder = scann_ops_pybind.builder(corpus, params.num_neighbors, distance)
    if params.mode == "brute_force":
        builder = builder.score_brute_force()
    else:
        threshold = params.anisotropic_quantization_threshold
        threshold = float("nan") if threshold is None else threshold
        builder = (
            builder.tree(
                num_leaves=params.num_leaves,
                num_leaves_to_search=params.leaves_to_search,
                training_sample_size=params.training_sample_size,
                min_partition_size=params.min_partition_size,
            )
            .score_ah(
                params.dims_per_block,
                anisotropic_quantization_threshold=threshold,
                training_sample_size=min(corpus.shape[0], 100_000),
            )
            .reorder(params.reorder_k)
        )
    builder.set_n_training_threads(training_threads)
    config = builder.create_config()
    return scann_ops_pybind.scann_pybind.ScannNumpy(corpus, config, training_threads)


def _ladder(start: int, stop: int, factor: float) -> list[int]:
    """start, then steps growing by ``factor`` (at least +1), ending at stop: _ladder(1, 5, 1.4)
    == [1, 2, 3, 5]."""
    values = [start]
    while values[-1] < stop:
        values.append(min(stop, max(values[-1] + 1, int(math.ceil(values[-1] * factor)))))
    return values


def recall_of(rows: np.ndarray, scores: np.ndarray, exact_rows: np.ndarray) -> float:
    """recall@k of a ScaNN result [Q, k] against exact rows [Q, k]; unfilled rows (NaN) miss."""
    return recall_at_k(np.where(np.isnan(scores), -1, rows), exact_rows)


def run_tuning_trials(
    search, exact_rows: np.ndarray, params: SearchParams, *, count: int, goal: float
) -> tuple[SearchParams, float, list[dict]]:
    """Cheapest search settings whose recall@k reaches ``goal``: (params, recall, trials).

    ``search(leaves_to_search, reorder_k)`` runs the tuning queries and returns (rows
    [Q, k], scores [Q, k]); ``exact_rows`` [Q, k] are their exact top-k rows. First the
    fewest leaves that reach ``goal`` with a generous reorder_k, then the smallest
    reorder_k that still does at those leaves; a brute-force index is measured once.
    Each trial is {"leaves_to_search", "reorder_k", "recall", "queries_per_second"}.

    Example:
        >>> params, recall, trials = run_tuning_trials(
        ...     lambda leaves, reorder: index._raw_search(queries, 10, leaves, reorder),
        ...     exact_rows, index.params, count=index.count, goal=0.96)
    """
    trials = []

    def measure(leaves, reorder):
        began = time.perf_counter()
        rows, scores = search(leaves, reorder)
        recall = recall_of(rows, scores, exact_rows)
        trials.append(
            {
                "leaves_to_search": leaves,
                "reorder_k": reorder,
                "recall": round(recall, 5),
                "queries_per_second": round(exact_rows.shape[0] / (time.perf_counter() - began), 1),
            }
        )
        return recall

    if params.mode == "brute_force":
        return params, measure(None, None), trials
    max_reorder = min(count, max(50 * params.num_neighbors, 500))
    leaves_ladder = _ladder(1, params.num_leaves, 1.4)
    leaves, recall = leaves_ladder[-1], 0.0  # the loop runs at least once
    for candidate in leaves_ladder:
        recall = measure(candidate, max_reorder)
        if recall >= goal:
            leaves = candidate
            break
    reorder = max_reorder
    if recall >= goal:
        for candidate in _ladder(params.num_neighbors, max_reorder, 1.5)[:-1]:
            candidate_recall = measure(leaves, candidate)
            if candidate_recall >= goal:
                reorder, recall = candidate, candidate_recall
                break
    return dataclasses.replace(params, leaves_to_search=leaves, reorder_k=reorder), recall, trials


def describe_params(params: SearchParams) -> str:
    """The mode and search settings in one line, for logs and ``repr``."""
    if params.mode == "brute_force":
        return "mode=brute_force"
    return (
        f"mode=tree_ah, num_leaves={params.num_leaves}, "
        f"leaves_to_search={params.leaves_to_search}, "
        f"reorder_k={params.reorder_k}"
    )


def tune_search(
    search,
    exact_rows: np.ndarray,
    params: SearchParams,
    *,
    count: int,
    target: float,
    margin: float,
    source: str,
    start: float,
) -> tuple[SearchParams, dict]:
    """(tuned params, report) of ``run_tuning_trials`` towards ``target + margin`` (at
    most 1) on the queries whose exact top-k rows are ``exact_rows`` [Q, k] (``source``
    says where they came from; ``count``: the index's items; ``start``: the
    perf_counter when tuning began). The
    report (``VectorIndex.manifest["recall"]``): recall, k, target_recall, goal,
    target_met, num_queries, queries, count, tune_seconds, trials. Logs the result (a
    warning when the target is not met)."""
    goal = min(1.0, target + margin)
    tuned, recall, trials = run_tuning_trials(search, exact_rows, params, count=count, goal=goal)
    report = {
        "recall": round(recall, 5),
        "k": int(exact_rows.shape[1]),
        "target_recall": target,
        "goal": goal,
        "target_met": recall >= target,
        "num_queries": int(exact_rows.shape[0]),
        "queries": source,
        "count": count,
        "tune_seconds": round(time.perf_counter() - start, 3),
        "trials": trials,
    }
    log = get_logger().info if report["target_met"] else get_logger().warning
    log(
        "VectorIndex.tune: recall@%d = %.4f (target %.3f%s) with %s",
        report["k"],
        recall,
        target,
        "" if report["target_met"] else ", NOT MET",
        describe_params(tuned),
    )
    return tuned, report


def search_rows(
    searcher,
    params: SearchParams,
    queries: np.ndarray,
    k: int,
    leaves: int | None,
    reorder: int | None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows [Q, k], scores [Q, k] float32) of prepared ``queries`` [Q, d] with ``params``'
    settings, or ``leaves`` / ``reorder`` instead (reorder_k grows with k beyond
    num_neighbors); batches of ``batch_size`` over ScaNN's threads for many queries."""
    if params.mode == "brute_force":
        leaves, pre = -1, -1
    else:
        leaves = params.leaves_to_search if leaves is None else leaves
        base = params.reorder_k if reorder is None else reorder
        pre = max(k, math.ceil(base * max(1.0, k / params.num_neighbors)))
    parallel = queries.shape[0] >= 2 * batch_size and (os.cpu_count() or 1) > 1
    rows, scores = searcher.search_batched(
        queries, k, pre, leaves, parallel, batch_size if parallel else 0
    )
    return np.asarray(rows), np.asarray(scores, np.float32)
