"""A ScaNN vector index keyed by the original string ids: build, tune, search, save, load.

``VectorIndex.build`` picks ScaNN parameters from the corpus size: under
``brute_force_below`` vectors (2000) an exact float32 brute-force searcher; otherwise a
partitioning tree (about sqrt(N) leaves), asymmetric hashing (``score_ah``, 2 dims per
block, anisotropic quantization threshold 0.2 for dot product and cosine) and exact
float32 reordering of the best ``reorder_k`` candidates. ``tune`` then measures
recall@k against exact (numpy) search on a sample of queries -- given ones, or corpus
vectors -- and raises ``leaves_to_search`` and ``reorder_k`` until the target recall is
met; the chosen parameters and the measured recall go into ``manifest.json``.

Metrics: ``dot_product`` (scores are dot products, higher is better), ``cosine`` (vectors
and queries are L2-normalised, scores are cosines) and ``squared_l2`` (scores are squared
distances, lower is better). ``dims`` keeps the first ``dims`` dimensions of vectors and
queries (Matryoshka embeddings; renormalised after truncation for cosine); queries may
have the full input width or already ``dims`` columns.

Items can be added, replaced and removed without a rebuild: scann 1.4.2's pybind
searcher supports ``upsert`` and ``delete`` on both the tree-AH and the brute-force
searcher (a deleted row is filled by the last one, which this class mirrors). New
items go to the existing partitions and codebooks, which were trained on the original
corpus: after large changes, ``rebuild()`` retrains and retunes from the current items.

Shapes: vectors [N, D] float; ids [N] str; queries [Q, D] or [D]; ``search`` returns
ids [Q, k] (a numpy str array) and scores [Q, k] float32 ([k] each for a 1-D query).
Rows that ScaNN could not fill (fewer than k candidates in the searched leaves) hold id
"" and score NaN.

Example:
    >>> index = VectorIndex.build(vectors, ids, metric="cosine", target_recall=0.95)
    >>> index.manifest["recall"]["recall"]          # measured against brute force
    0.97
    >>> found_ids, scores = index.search(queries, k=10)
    >>> index.save("/tmp/item_index"); VectorIndex.load("/tmp/item_index").count
"""

from collections.abc import Sequence
import contextlib
import ctypes
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
from pathlib import Path
import shutil
import time
import uuid

import numpy as np

from lf_jax.console import get_logger
from lf_jax.errors import UserInputError

FORMAT = "lf_jax.VectorIndex"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
METRICS = ("dot_product", "squared_l2", "cosine")
MODES = ("tree_ah", "brute_force")
BRUTE_FORCE_BELOW = 2000
DIMS_PER_BLOCK = 2
ANISOTROPIC_THRESHOLD = 0.2
TUNE_QUERIES = 1000
# Exact search scores at most this many (query, vector) pairs at a time (16 MiB of float32).
EXACT_TILE = 1 << 22


class VectorIndexError(UserInputError):
    """Bad vectors, ids, arguments or index directories for a VectorIndex."""


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
        return dataclasses.asdict(self)


def _positive_int(field: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise VectorIndexError(f"{field} must be a positive int, got {value!r}")
    return int(value)


def _check_metric(metric) -> str:
    if metric not in METRICS:
        raise VectorIndexError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def _check_recall(field: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise VectorIndexError(f"{field} must be a number in (0, 1], got {value!r}")
    return float(value)


def _as_ids(ids, count: int | None) -> np.ndarray:
    """A 1-D '<U' array of non-empty ids; count (if given) must match."""
    if isinstance(ids, (str, bytes)):
        raise VectorIndexError(f"ids must be a list or array of str, got a single "
                               f"{type(ids).__name__} {ids!r}")
    if not isinstance(ids, np.ndarray):
        ids = ids if isinstance(ids, Sequence) else list(ids)
        bad = next((i for i, v in enumerate(ids) if not isinstance(v, str)), None)
        if bad is not None:  # numpy would silently turn a stray int into a str
            raise VectorIndexError(f"ids must be str, got {type(ids[bad]).__name__} {ids[bad]!r} "
                                   f"at position {bad}")
    array = np.asarray(ids)
    if array.dtype.kind == "O" and array.size:
        bad = next((i for i, v in enumerate(array.reshape(-1)) if not isinstance(v, str)), None)
        if bad is not None:
            value = array.reshape(-1)[bad]
            raise VectorIndexError(f"ids must be str, got {type(value).__name__} {value!r} at position {bad}")
        array = array.astype(str)
    if array.size == 0:
        array = array.astype(str)
    if array.dtype.kind != "U":
        raise VectorIndexError(f"ids must be str, got an array of {array.dtype} (convert integer ids "
                               "with str() so search returns what you stored)")
    if array.ndim != 1:
        raise VectorIndexError(f"ids must be 1-D, got shape {array.shape}")
    if count is not None and array.size != count:
        raise VectorIndexError(f"ids: got {array.size} ids for {count} vectors")
    empty = np.flatnonzero(np.strings.str_len(array) == 0)
    if empty.size:
        raise VectorIndexError(f"ids must be non-empty strings, got '' at position {int(empty[0])}")
    return array


def _first_duplicate(ids: np.ndarray) -> tuple[str, int, int] | None:
    """The duplicate whose second occurrence comes first: (id, first, second), or None."""
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if same.size == 0:
        return None
    second_positions = order[same + 1]
    pick = int(np.argmin(second_positions))
    key = ids[second_positions[pick]]
    first = int(np.flatnonzero(ids == key)[0])
    return str(key), first, int(second_positions[pick])


def _prepare(vectors, *, field: str, metric: str, width: int | None, dims: int | None,
             ids: np.ndarray | None = None) -> np.ndarray:
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
        expected = f"{width}" if dims in (None, width) else f"{width} (or {dims}, already truncated)"
        raise VectorIndexError(f"{field} must have {expected} columns, got shape {array.shape}")
    if dims is not None and array.shape[1] < dims:
        raise VectorIndexError(f"dims={dims} is more than the {array.shape[1]} columns of {field}")
    array = np.array(array[:, :dims] if dims is not None else array, dtype=np.float32, order="C")  # a copy
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        name = f" (id {str(ids[row])!r})" if ids is not None else ""
        raise VectorIndexError(f"{field}: row {row}{name} holds NaN or Inf; "
                               f"{int((~finite).sum())} of {array.shape[0]} rows are not finite")
    if metric == "cosine":
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if zero.size:
            name = f" (id {str(ids[zero[0]])!r})" if ids is not None else ""
            raise VectorIndexError(f"{field}: row {int(zero[0])}{name} is all zeros; the cosine "
                                   "metric needs non-zero vectors")
        array /= norms
    return array


def exact_search(corpus: np.ndarray, queries: np.ndarray, k: int,
                 metric: str = "dot_product") -> tuple[np.ndarray, np.ndarray]:
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
        q = queries[start:start + query_chunk]
        candidate_sims, candidate_rows = [], []
        for first in range(0, n, block):
            sim = q @ corpus[first:first + block].T
            if l2:  # rank by 2 q.x - |x|^2 (the squared distance minus |q|^2, negated)
                sim *= 2.0
                sim -= norms[first:first + block]
            width = sim.shape[1]
            keep = min(k, width)
            top = np.argpartition(sim, width - keep, axis=1)[:, width - keep:] if keep < width else \
                np.broadcast_to(np.arange(width), sim.shape)
            candidate_sims.append(np.take_along_axis(sim, top, axis=1))
            candidate_rows.append(top + first)
        sims, cands = np.concatenate(candidate_sims, axis=1), np.concatenate(candidate_rows, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        rows[start:start + q.shape[0]] = np.take_along_axis(cands, order, axis=1)
        best = np.take_along_axis(sims, order, axis=1)
        scores[start:start + q.shape[0]] = (np.einsum("ij,ij->i", q, q)[:, None] - best) if l2 else best
    return rows, scores


def recall_at_k(found_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k (ids or rows; padding never matches)."""
    k = exact_rows.shape[1]
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found_rows, exact_rows))
    return hits / (k * exact_rows.shape[0])


def choose_params(count: int, *, num_neighbors: int, metric: str,
                  brute_force_below: int = BRUTE_FORCE_BELOW) -> tuple[SearchParams, str]:
    """ScaNN parameters for a corpus size, before tuning: (params, why this mode)."""
    if count < brute_force_below:
        return (SearchParams(mode="brute_force", num_neighbors=num_neighbors),
                f"brute force: {count} vectors < brute_force_below={brute_force_below}")
    num_leaves = max(2, int(round(math.sqrt(count))))
    leaves_to_search = max(1, math.ceil(num_leaves / 20))
    params = SearchParams(
        mode="tree_ah", num_neighbors=num_neighbors, num_leaves=num_leaves,
        leaves_to_search=leaves_to_search, reorder_k=max(100, 10 * num_neighbors),
        dims_per_block=DIMS_PER_BLOCK,
        anisotropic_quantization_threshold=ANISOTROPIC_THRESHOLD if metric != "squared_l2" else None,
        training_sample_size=min(count, max(100_000, 250 * num_leaves)),
        min_partition_size=max(1, min(50, count // (4 * num_leaves))))
    return params, (f"tree + asymmetric hashing + reordering: {count} vectors >= "
                    f"brute_force_below={brute_force_below}, {num_leaves} leaves ~ sqrt(N)")


def _build_searcher(corpus: np.ndarray, params: SearchParams, metric: str, training_threads: int):
    from scann import scann_ops_pybind
    distance = "squared_l2" if metric == "squared_l2" else "dot_product"
    builder = scann_ops_pybind.builder(corpus, params.num_neighbors, distance)
    if params.mode == "brute_force":
        builder = builder.score_brute_force()
    else:
        threshold = params.anisotropic_quantization_threshold
        threshold = float("nan") if threshold is None else threshold
        builder = (builder.tree(num_leaves=params.num_leaves,
                                num_leaves_to_search=params.leaves_to_search,
                                training_sample_size=params.training_sample_size,
                                min_partition_size=params.min_partition_size)
                   .score_ah(params.dims_per_block,
                             anisotropic_quantization_threshold=threshold,
                             training_sample_size=min(corpus.shape[0], 100_000))
                   .reorder(params.reorder_k))
    builder.set_n_training_threads(training_threads)
    config = builder.create_config()
    return scann_ops_pybind.scann_pybind.ScannNumpy(corpus, config, training_threads)


def _ladder(start: int, stop: int, factor: float) -> list[int]:
    values = [start]
    while values[-1] < stop:
        values.append(min(stop, max(values[-1] + 1, int(math.ceil(values[-1] * factor)))))
    return values


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result != 0:
        errno = ctypes.get_errno()
        if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot swap
            return False
        raise OSError(errno, os.strerror(errno), str(b))
    return True


def _replace_directory(new: Path, target: Path) -> None:
    """Puts ``new`` at ``target``; an existing ``target`` is replaced only once ``new`` is complete."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):  # new now holds the previous index
        shutil.rmtree(new, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)  # a crash between the two renames leaves the old index at `old`
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


class VectorIndex:
    """A ScaNN searcher over float32 vectors, keyed by string ids. Build with ``build`` or ``load``."""

    def __init__(self, *, searcher, ids: np.ndarray, vectors: np.ndarray | None, metric: str,
                 input_dim: int, dims: int, params: SearchParams, manifest: dict):
        self._searcher = searcher
        self._ids = ids
        self._row: dict[str, int] | None = None  # id -> row, built on the first upsert/delete
        self._vectors = vectors
        self.metric = metric
        self.input_dim = input_dim
        self.dims = dims
        self.params = params
        self.manifest = manifest

    # ----------------------------------------------------------------- build
    @classmethod
    def build(cls, vectors, ids, *, metric: str = "dot_product", target_recall: float = 0.95,
              num_neighbors: int = 10, dims: int | None = None, tune: bool = True,
              tune_queries=None, num_tune_queries: int = TUNE_QUERIES, recall_margin: float = 0.01,
              brute_force_below: int = BRUTE_FORCE_BELOW, model: str | None = None,
              checkpoint_step: int | None = None, training_threads: int = 0,
              seed: int = 0) -> "VectorIndex":
        """Builds (and by default tunes) an index over ``vectors`` [N, D] with string ``ids`` [N].

        target_recall: recall@num_neighbors that ``tune`` aims for (plus ``recall_margin``
        for the noise of the sample). tune_queries: [Q, D] queries to tune on (default: a
        sample of ``num_tune_queries`` corpus vectors). dims: keep the first ``dims``
        columns (Matryoshka). model, checkpoint_step: recorded in the manifest.
        """
        metric = _check_metric(metric)
        target_recall = _check_recall("target_recall", target_recall)
        num_neighbors = _positive_int("num_neighbors", num_neighbors)
        brute_force_below = _positive_int("brute_force_below", brute_force_below)
        if checkpoint_step is not None and (not isinstance(checkpoint_step, (int, np.integer))
                                            or isinstance(checkpoint_step, bool) or checkpoint_step < 0):
            raise VectorIndexError(f"checkpoint_step must be an int >= 0 or None, got {checkpoint_step!r}")
        shape = np.shape(vectors)
        if len(shape) != 2:
            raise VectorIndexError(f"vectors must be 2-D [N, D], got shape {shape}")
        if shape[0] == 0:
            raise VectorIndexError("vectors: the corpus is empty (0 vectors); an index needs at least one")
        if dims is not None:
            dims = _positive_int("dims", dims)
            if dims > shape[1]:
                raise VectorIndexError(f"dims={dims} is more than the vectors' {shape[1]} columns")
        id_array = _as_ids(ids, shape[0])
        duplicate = _first_duplicate(id_array)
        if duplicate is not None:
            key, first, second = duplicate
            raise VectorIndexError(f"ids must be unique, but {key!r} appears at positions {first} "
                                   f"and {second}")
        if num_neighbors > shape[0]:
            raise VectorIndexError(f"num_neighbors={num_neighbors} is more than the {shape[0]} vectors")
        corpus = _prepare(vectors, field="vectors", metric=metric, width=None, dims=dims, ids=id_array)
        params, reason = choose_params(corpus.shape[0], num_neighbors=num_neighbors, metric=metric,
                                       brute_force_below=brute_force_below)
        start = time.perf_counter()
        try:
            searcher = _build_searcher(corpus, params, metric, training_threads)
        except RuntimeError as error:  # ScaNN's own checks (should not happen after ours)
            raise VectorIndexError(f"ScaNN could not build the index ({params.mode}): {error}") from None
        build_seconds = time.perf_counter() - start
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": model,
            "checkpoint_step": None if checkpoint_step is None else int(checkpoint_step),
            "metric": metric, "input_dim": int(shape[1]),
            "dims": corpus.shape[1], "count": corpus.shape[0], "mode_reason": reason,
            "brute_force_below": brute_force_below, "build_seconds": round(build_seconds, 3),
            "built_at": _now(),
            "scann_version": _scann_version(), "target_recall": target_recall,
            "recall": None, "updates_since_recall": 0,
        }
        index = cls(searcher=searcher, ids=id_array, vectors=corpus, metric=metric,
                    input_dim=int(shape[1]), dims=corpus.shape[1], params=params, manifest=manifest)
        get_logger().info("VectorIndex: built %s over %d x %d in %.1f s (%s)", params.mode,
                          corpus.shape[0], corpus.shape[1], build_seconds, reason)
        if tune:
            index.tune(queries=tune_queries, target_recall=target_recall, num_queries=num_tune_queries,
                       margin=recall_margin, seed=seed)
        return index

    # ------------------------------------------------------------------ tune
    def _prepare_queries(self, queries, field: str = "queries") -> np.ndarray:
        return _prepare(queries, field=field, metric=self.metric, width=self.input_dim,
                        dims=self.dims if self.dims < self.input_dim else None)

    def _raw_search(self, queries: np.ndarray, k: int, leaves: int | None, reorder: int | None,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        if self.params.mode == "brute_force":
            leaves, pre = -1, -1
        else:
            leaves = self.params.leaves_to_search if leaves is None else leaves
            base = self.params.reorder_k if reorder is None else reorder
            pre = max(k, math.ceil(base * max(1.0, k / self.params.num_neighbors)))
        parallel = queries.shape[0] >= 2 * batch_size and (os.cpu_count() or 1) > 1
        rows, scores = self._searcher.search_batched(queries, k, pre, leaves, parallel,
                                                     batch_size if parallel else 0)
        return np.asarray(rows), np.asarray(scores, np.float32)

    def _tune_queries(self, queries, num_queries: int, seed: int) -> tuple[np.ndarray, str]:
        if queries is not None:
            return self._prepare_queries(queries, "tune_queries"), "given queries"
        vectors = self._require_vectors("tune")
        take = min(num_queries, self.count)
        rows = np.sort(np.random.default_rng(seed).choice(self.count, take, replace=False))
        return np.ascontiguousarray(vectors[rows]), "corpus vectors (a random sample)"

    def _require_vectors(self, what: str) -> np.ndarray:
        if self._vectors is None:
            raise VectorIndexError(f"{what} needs the corpus vectors, which this index does not hold "
                                   "(its directory lacks dataset.npy); rebuild it with VectorIndex.build")
        return self._vectors

    def measure_recall(self, queries=None, *, k: int | None = None, num_queries: int = TUNE_QUERIES,
                       seed: int = 0, leaves_to_search: int | None = None,
                       reorder_k: int | None = None) -> float:
        """recall@k of ``search`` against exact search on ``queries`` (or a corpus sample)."""
        k = self._check_k(k)
        prepared, _ = self._tune_queries(queries, num_queries, seed)
        exact_rows, _ = exact_search(self._require_vectors("measure_recall"), prepared, k, self.metric)
        rows, scores = self._raw_search(prepared, k, leaves_to_search, reorder_k)
        return recall_at_k(np.where(np.isnan(scores), -1, rows), exact_rows)

    def tune(self, queries=None, *, target_recall: float | None = None, k: int | None = None,
             num_queries: int = TUNE_QUERIES, margin: float = 0.01, seed: int = 0) -> dict:
        """Raises leaves_to_search, then reorder_k, until recall@k meets the target.

        Measures recall@k (k = num_neighbors by default) against exact search on
        ``queries`` (or ``num_queries`` corpus vectors) for a ladder of settings: first
        the fewest leaves that reach ``target_recall + margin`` with a generous reorder_k,
        then the smallest reorder_k that still does at those leaves. Updates ``params``
        and ``manifest["recall"]`` and returns that report. No rebuild is needed.
        """
        target = _check_recall("target_recall", self.manifest["target_recall"] if target_recall is None
                               else target_recall)
        k = self._check_k(k)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
            raise VectorIndexError(f"margin must be a number in [0, 1), got {margin!r}")
        num_queries = _positive_int("num_queries", num_queries)
        prepared, source = self._tune_queries(queries, num_queries, seed)
        start = time.perf_counter()
        exact_rows, _ = exact_search(self._require_vectors("tune"), prepared, k, self.metric)
        goal = min(1.0, target + margin)
        trials = []

        def measure(leaves, reorder):
            began = time.perf_counter()
            rows, scores = self._raw_search(prepared, k, leaves, reorder)
            recall = recall_at_k(np.where(np.isnan(scores), -1, rows), exact_rows)
            trials.append({"leaves_to_search": leaves, "reorder_k": reorder, "recall": round(recall, 5),
                           "queries_per_second": round(prepared.shape[0] / (time.perf_counter() - began), 1)})
            return recall

        params = self.params
        if params.mode == "brute_force":
            recall = measure(None, None)
        else:
            max_reorder = min(self.count, max(50 * params.num_neighbors, 500))
            leaves_ladder = _ladder(1, params.num_leaves, 1.4)
            leaves, recall = leaves_ladder[-1], None
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
            params = dataclasses.replace(params, leaves_to_search=leaves, reorder_k=reorder)
        report = {"recall": round(recall, 5), "k": k, "target_recall": target, "goal": goal,
                  "target_met": recall >= target, "num_queries": int(prepared.shape[0]),
                  "queries": source, "count": self.count,
                  "tune_seconds": round(time.perf_counter() - start, 3),
                  "trials": trials}
        self.params = params
        self.manifest.update(recall=report, target_recall=target, updates_since_recall=0)
        log = get_logger().info if report["target_met"] else get_logger().warning
        log("VectorIndex.tune: recall@%d = %.4f (target %.3f%s) with %s", k, recall, target,
            "" if report["target_met"] else ", NOT MET", _describe(params))
        return report

    # ---------------------------------------------------------------- search
    @property
    def count(self) -> int:
        """Number of items in the index."""
        return int(self._ids.size)

    @property
    def ids(self) -> np.ndarray:
        """The ids in row order (a read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    def _check_k(self, k) -> int:
        k = self.params.num_neighbors if k is None else _positive_int("k", k)
        if k > self.count:
            raise VectorIndexError(f"k={k} is more than the {self.count} items in the index")
        return k

    def search(self, queries, k: int | None = None, *, leaves_to_search: int | None = None,
               reorder_k: int | None = None, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids and scores for each query: (ids [Q, k] str, scores [Q, k] float32).

        Batched: ScaNN splits the queries into batches of ``batch_size`` over its threads.
        leaves_to_search / reorder_k override the tuned settings for this call.
        """
        k = self._check_k(k)
        single = np.ndim(queries) == 1
        prepared = self._prepare_queries(np.reshape(queries, (1, -1)) if single else queries)
        if leaves_to_search is not None:
            leaves_to_search = _positive_int("leaves_to_search", leaves_to_search)
        if reorder_k is not None:
            reorder_k = _positive_int("reorder_k", reorder_k)
        rows, scores = self._raw_search(prepared, k, leaves_to_search, reorder_k,
                                        _positive_int("batch_size", batch_size))
        missing = np.isnan(scores)
        found = self._ids[np.where(missing, 0, rows).astype(np.int64)]
        if missing.any():
            found[missing] = ""
        return (found[0], scores[0]) if single else (found, scores)

    # --------------------------------------------------------------- updates
    def _rows(self) -> dict[str, int]:
        if self._row is None:
            self._row = {key: row for row, key in enumerate(self._ids.tolist())}
        return self._row

    def upsert(self, ids, vectors, *, batch_size: int = 1024) -> dict:
        """Adds new ids and replaces the vectors of known ones, without a rebuild.

        vectors [n, D] (D = the input width, or ``dims``). Returns {"added", "replaced"}.
        """
        id_array = _as_ids(ids, np.shape(vectors)[0] if np.ndim(vectors) == 2 else None)
        if id_array.size == 0:
            return {"added": 0, "replaced": 0}
        duplicate = _first_duplicate(id_array)
        if duplicate is not None:
            key, first, second = duplicate
            raise VectorIndexError(f"ids must be unique, but {key!r} appears at positions {first} "
                                   f"and {second}")
        prepared = _prepare(vectors, field="vectors", metric=self.metric, width=self.input_dim,
                            dims=self.dims if self.dims < self.input_dim else None, ids=id_array)
        rows = self._rows()
        keys = id_array.tolist()
        indices = [rows.get(key) for key in keys]
        try:
            assigned = self._searcher.upsert(indices, prepared, _positive_int("batch_size", batch_size))
        except RuntimeError as error:
            raise VectorIndexError(f"ScaNN upsert failed: {error}") from None
        assigned = np.asarray(assigned, np.int64)
        new = np.array([index is None for index in indices])
        replaced_rows = assigned[~new]
        added_rows = assigned[new]
        expected_rows = np.arange(self.count, self.count + added_rows.size)
        if added_rows.size and not np.array_equal(added_rows, expected_rows):
            raise RuntimeError("ScaNN placed new items out of order; the id map would be wrong")
        self._ids = np.concatenate([self._ids, id_array[new]]) if added_rows.size else self._ids
        for key, row in zip(id_array[new].tolist(), added_rows.tolist()):
            rows[key] = row
        if self._vectors is not None:
            vectors_now = np.array(self._vectors) if not self._vectors.flags.writeable else self._vectors
            vectors_now[replaced_rows] = prepared[~new]
            self._vectors = np.concatenate([vectors_now, prepared[new]]) if added_rows.size else vectors_now
        self._after_update(int(id_array.size))
        return {"added": int(added_rows.size), "replaced": int(replaced_rows.size)}

    def delete(self, ids, *, missing_ok: bool = False) -> int:
        """Removes ids from the index without a rebuild; returns how many were removed.

        An unknown id is an error naming it (unless ``missing_ok``). The last row moves
        into each freed row, as ScaNN does.
        """
        id_array = _as_ids(ids, None)
        rows = self._rows()
        keys = list(dict.fromkeys(id_array.tolist()))
        unknown = [key for key in keys if key not in rows]
        if unknown and not missing_ok:
            raise VectorIndexError(f"ids: {len(unknown)} of {len(keys)} ids are not in the index "
                                   f"(first: {unknown[0]!r}); pass missing_ok=True to skip them")
        keys = [key for key in keys if key in rows]
        if len(keys) >= self.count:
            raise VectorIndexError(f"ids: deleting all {self.count} items would leave an empty "
                                   "index; build a new one instead")
        if not keys:
            return 0
        ids_now = self._ids.copy()
        vectors_now = None if self._vectors is None else np.array(self._vectors)
        indices, size = [], self.count
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
            self._searcher.delete(indices)
        except RuntimeError as error:
            self._row = None
            raise VectorIndexError(f"ScaNN delete failed: {error}") from None
        self._ids = ids_now[:size]
        self._vectors = None if vectors_now is None else vectors_now[:size]
        self._after_update(len(keys))
        return len(keys)

    def _after_update(self, changed: int) -> None:
        self.manifest["count"] = self.count
        self.manifest["updates_since_recall"] = self.manifest.get("updates_since_recall", 0) + changed

    def rebuild(self, *, target_recall: float | None = None, **build_kwargs) -> "VectorIndex":
        """A new index trained and tuned on the current items (after many upserts/deletes)."""
        keep = {"metric": self.metric, "num_neighbors": self.params.num_neighbors,
                "target_recall": self.manifest["target_recall"] if target_recall is None else target_recall,
                "model": self.manifest.get("model"), "checkpoint_step": self.manifest.get("checkpoint_step"),
                "brute_force_below": self.manifest.get("brute_force_below", BRUTE_FORCE_BELOW)}
        keep.update(build_kwargs)
        return VectorIndex.build(np.asarray(self._require_vectors("rebuild")), self._ids, **keep)

    # ------------------------------------------------------------ save, load
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to ``directory`` atomically; returns its path.

        Everything is written to a temporary directory next to the target, synced, then
        swapped in with one rename (renameat2 exchange on Linux); a failed save leaves
        any previous index at ``directory`` as it was. An existing ``directory`` must be
        an index or empty: other directories are never replaced.
        """
        target = Path(directory).absolute()
        if target.exists() and not target.is_dir():
            raise VectorIndexError(f"VectorIndex.save: '{target}' exists and is not a directory")
        if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
            raise VectorIndexError(f"VectorIndex.save: '{target}' is a non-empty directory without "
                                   f"{MANIFEST}; refusing to replace it")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            temp.mkdir()
        except OSError as error:
            raise VectorIndexError(f"VectorIndex.save: cannot write under '{target.parent}': "
                                   f"{error.strerror or error}") from None
        try:
            self._write(temp)
            _fsync_tree(temp)
            _replace_directory(temp, target)
        except (OSError, RuntimeError) as error:
            raise VectorIndexError(f"VectorIndex.save: cannot write '{target}': "
                                   f"{getattr(error, 'strerror', None) or error}") from None
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
        get_logger().info("VectorIndex: saved %d items to %s", self.count, target)
        return target

    def _write(self, directory: Path) -> None:
        self._searcher.serialize(str(directory), True)  # asset paths relative to the directory
        # utf-8 bytes ('S'): a quarter of numpy's UTF-32 strings for ASCII ids
        np.save(directory / IDS_FILE, np.strings.encode(self._ids, "utf-8"), allow_pickle=False)
        files = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                 for path in sorted(directory.iterdir())}
        manifest = dict(self.manifest, count=self.count, params=self.params.to_json(),
                        saved_at=_now(), files=files)
        with open(directory / MANIFEST, "w") as file:
            json.dump(manifest, file, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, verify: bool = True) -> "VectorIndex":
        """Reads an index written by ``save``; ``verify`` checks every file's sha256 first."""
        directory = Path(directory)
        if not directory.is_dir():
            raise VectorIndexError(f"VectorIndex.load: '{directory}' is not a directory")
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise VectorIndexError(f"VectorIndex.load: '{directory}' has no {MANIFEST}; not an index "
                                   "directory (or an interrupted copy)") from None
        except (OSError, ValueError) as error:
            raise VectorIndexError(f"VectorIndex.load: '{directory / MANIFEST}' is not readable "
                                   f"JSON: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise VectorIndexError(f"VectorIndex.load: '{directory / MANIFEST}' is not a {FORMAT} manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise VectorIndexError(f"VectorIndex.load: '{directory}' has format_version "
                                   f"{manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
        try:
            files = dict(manifest["files"])
            params = SearchParams(**manifest["params"])
            metric, input_dim, dims, count = (manifest["metric"], int(manifest["input_dim"]),
                                              int(manifest["dims"]), int(manifest["count"]))
        except (KeyError, TypeError, ValueError) as error:
            raise VectorIndexError(f"VectorIndex.load: '{directory / MANIFEST}' lacks or garbles "
                                   f"{error}") from None
        for name, info in files.items():
            path = directory / name
            if not path.is_file():
                raise VectorIndexError(f"VectorIndex.load: '{path}' is missing; the index is incomplete")
            expected = info if isinstance(info, dict) else {}
            if (path.stat().st_size != expected.get("bytes")
                    or (verify and _sha256(path) != expected.get("sha256"))):
                raise VectorIndexError(f"VectorIndex.load: '{path}' does not match its checksum in "
                                       f"{MANIFEST}; the index is corrupt")
        try:
            ids = np.load(directory / IDS_FILE, allow_pickle=False)
            ids = np.strings.decode(ids, "utf-8") if ids.dtype.kind == "S" else ids
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise VectorIndexError(f"VectorIndex.load: '{directory / IDS_FILE}' is not readable: "
                                   f"{error}") from None
        if ids.dtype.kind != "U" or ids.shape != (count,):
            raise VectorIndexError(f"VectorIndex.load: '{directory / IDS_FILE}' holds {ids.dtype} "
                                   f"{ids.shape}, expected {count} str ids")
        try:
            from scann import scann_ops_pybind
            assets = (directory / "scann_assets.pbtxt").read_text()
            searcher = scann_ops_pybind.scann_pybind.ScannNumpy(str(directory), assets)
        except (OSError, RuntimeError, ValueError) as error:
            raise VectorIndexError(f"VectorIndex.load: ScaNN cannot read '{directory}': {error}") from None
        if searcher.size() != count:
            raise VectorIndexError(f"VectorIndex.load: '{directory}' holds {searcher.size()} vectors "
                                   f"but {count} ids; the index is corrupt")
        vectors = None
        if (directory / "dataset.npy").is_file():  # mapped: stays valid if the directory is replaced
            vectors = np.load(directory / "dataset.npy", mmap_mode="r", allow_pickle=False)
            if vectors.shape != (count, dims):
                vectors = None
        manifest = {key: value for key, value in manifest.items() if key not in ("files", "params")}
        return cls(searcher=searcher, ids=ids, vectors=vectors, metric=metric, input_dim=input_dim,
                   dims=dims, params=params, manifest=manifest)

    def __repr__(self) -> str:
        recall = (self.manifest.get("recall") or {}).get("recall")
        return (f"VectorIndex(count={self.count}, dims={self.dims}, metric={self.metric!r}, "
                f"{_describe(self.params)}, recall={recall})")


def _describe(params: SearchParams) -> str:
    if params.mode == "brute_force":
        return "mode=brute_force"
    return (f"mode=tree_ah, num_leaves={params.num_leaves}, leaves_to_search={params.leaves_to_search}, "
            f"reorder_k={params.reorder_k}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _scann_version() -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("scann")
    return None
