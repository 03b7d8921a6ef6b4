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

Input checks live in index_inputs.py, parameter choice and tuning in scann_tuning.py, the
directory format in index_files.py.
"""

import math
import os
import time
from pathlib import Path

import numpy as np

from lf_jax.checks import check_int
from lf_jax.console import get_logger
from lf_jax.export.index_files import (
    FORMAT,
    FORMAT_VERSION,
    manifest_timestamp,
    read_index_directory,
    scann_version,
    write_atomically,
    write_index_files,
)
from lf_jax.export.index_inputs import (
    VectorIndexError,
    check_ids,
    check_metric,
    check_recall,
    check_unique_ids,
    prepare_vectors,
)
from lf_jax.export.scann_tuning import (
    BRUTE_FORCE_BELOW,
    TUNE_QUERIES,
    SearchParams,
    build_searcher,
    choose_params,
    describe_params,
    exact_search,
    recall_of,
    run_tuning_trials,
)


class VectorIndex:
    """A ScaNN searcher over float32 vectors, keyed by string ids. Build with ``build`` or
    ``load``."""

    def __init__(
        self,
        *,
        searcher,
        ids: np.ndarray,
        vectors: np.ndarray | None,
        metric: str,
        input_dim: int,
        dims: int,
        params: SearchParams,
        manifest: dict,
    ):
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
    def build(
        cls,
        vectors,
        ids,
        *,
        metric: str = "dot_product",
        target_recall: float = 0.95,
        num_neighbors: int = 10,
        dims: int | None = None,
        tune: bool = True,
        tune_queries=None,
        num_tune_queries: int = TUNE_QUERIES,
        recall_margin: float = 0.01,
        brute_force_below: int = BRUTE_FORCE_BELOW,
        model: str | None = None,
        checkpoint_step: int | None = None,
        training_threads: int = 0,
        seed: int = 0,
    ) -> "VectorIndex":
        """Builds (and by default tunes) an index over ``vectors`` [N, D] with string ``ids`` [N].

        target_recall: recall@num_neighbors that ``tune`` aims for (plus ``recall_margin``
        for the noise of the sample). tune_queries: [Q, D] queries to tune on (default: a
        sample of ``num_tune_queries`` corpus vectors). dims: keep the first ``dims``
        columns (Matryoshka). model, checkpoint_step: recorded in the manifest.
        """
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
            raise VectorIndexError(
                f"num_neighbors={num_neighbors} is more than the {shape[0]} vectors"
            )
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
        index = cls(
            searcher=searcher,
            ids=id_array,
            vectors=corpus,
            metric=metric,
            input_dim=int(shape[1]),
            dims=corpus.shape[1],
            params=params,
            manifest=manifest,
        )
        get_logger().info(
            "VectorIndex: built %s over %d x %d in %.1f s (%s)",
            params.mode,
            corpus.shape[0],
            corpus.shape[1],
            build_seconds,
            reason,
        )
        if tune:
            index.tune(
                queries=tune_queries,
                target_recall=target_recall,
                num_queries=num_tune_queries,
                margin=recall_margin,
                seed=seed,
            )
        return index

    # ------------------------------------------------------------------ tune
    def _prepare_queries(self, queries, field: str = "queries") -> np.ndarray:
        return prepare_vectors(
            queries,
            field=field,
            metric=self.metric,
            width=self.input_dim,
            dims=self.dims if self.dims < self.input_dim else None,
        )

    def _raw_search(
        self,
        queries: np.ndarray,
        k: int,
        leaves: int | None,
        reorder: int | None,
        batch_size: int = 256,
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.params.mode == "brute_force":
            leaves, pre = -1, -1
        else:
            leaves = self.params.leaves_to_search if leaves is None else leaves
            base = self.params.reorder_k if reorder is None else reorder
            pre = max(k, math.ceil(base * max(1.0, k / self.params.num_neighbors)))
        parallel = queries.shape[0] >= 2 * batch_size and (os.cpu_count() or 1) > 1
        rows, scores = self._searcher.search_batched(
            queries, k, pre, leaves, parallel, batch_size if parallel else 0
        )
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
            raise VectorIndexError(
                f"{what} needs the corpus vectors, which this index does not hold "
                "(its directory lacks dataset.npy); rebuild it with VectorIndex.build"
            )
        return self._vectors

    def measure_recall(
        self,
        queries=None,
        *,
        k: int | None = None,
        num_queries: int = TUNE_QUERIES,
        seed: int = 0,
        leaves_to_search: int | None = None,
        reorder_k: int | None = None,
    ) -> float:
        """recall@k of ``search`` against exact search on ``queries`` (or a corpus sample)."""
        k = self._check_k(k)
        prepared, _ = self._tune_queries(queries, num_queries, seed)
        exact_rows, _ = exact_search(
            self._require_vectors("measure_recall"), prepared, k, self.metric
        )
        rows, scores = self._raw_search(prepared, k, leaves_to_search, reorder_k)
        return recall_of(rows, scores, exact_rows)

    def tune(
        self,
        queries=None,
        *,
        target_recall: float | None = None,
        k: int | None = None,
        num_queries: int = TUNE_QUERIES,
        margin: float = 0.01,
        seed: int = 0,
    ) -> dict:
        """Raises leaves_to_search, then reorder_k, until recall@k meets the target.

        Measures recall@k (k = num_neighbors by default) against exact search on
        ``queries`` (or ``num_queries`` corpus vectors) for a ladder of settings: first
        the fewest leaves that reach ``target_recall + margin`` with a generous reorder_k,
        then the smallest reorder_k that still does at those leaves. Updates ``params``
        and ``manifest["recall"]`` and returns that report. No rebuild is needed.
        """
        target = check_recall(
            "target_recall",
            self.manifest["target_recall"] if target_recall is None else target_recall,
        )
        k = self._check_k(k)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
            raise VectorIndexError(f"margin must be a number in [0, 1), got {margin!r}")
        num_queries = check_int("num_queries", num_queries, VectorIndexError)
        prepared, source = self._tune_queries(queries, num_queries, seed)
        start = time.perf_counter()
        exact_rows, _ = exact_search(self._require_vectors("tune"), prepared, k, self.metric)
        goal = min(1.0, target + margin)
        params, recall, trials = run_tuning_trials(
            lambda leaves, reorder: self._raw_search(prepared, k, leaves, reorder),
            exact_rows,
            self.params,
            count=self.count,
            goal=goal,
        )
        report = {
            "recall": round(recall, 5),
            "k": k,
            "target_recall": target,
            "goal": goal,
            "target_met": recall >= target,
            "num_queries": int(prepared.shape[0]),
            "queries": source,
            "count": self.count,
            "tune_seconds": round(time.perf_counter() - start, 3),
            "trials": trials,
        }
        self.params = params
        self.manifest.update(recall=report, target_recall=target, updates_since_recall=0)
        log = get_logger().info if report["target_met"] else get_logger().warning
        log(
            "VectorIndex.tune: recall@%d = %.4f (target %.3f%s) with %s",
            k,
            recall,
            target,
            "" if report["target_met"] else ", NOT MET",
            describe_params(params),
        )
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
        k = self.params.num_neighbors if k is None else check_int("k", k, VectorIndexError)
        if k > self.count:
            raise VectorIndexError(f"k={k} is more than the {self.count} items in the index")
        return k

    def search(
        self,
        queries,
        k: int | None = None,
        *,
        leaves_to_search: int | None = None,
        reorder_k: int | None = None,
        batch_size: int = 256,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids and scores for each query: (ids [Q, k] str, scores [Q, k] float32).

        Batched: ScaNN splits the queries into batches of ``batch_size`` over its threads.
        leaves_to_search / reorder_k override the tuned settings for this call.
        """
        k = self._check_k(k)
        single = np.ndim(queries) == 1
        prepared = self._prepare_queries(np.reshape(queries, (1, -1)) if single else queries)
        if leaves_to_search is not None:
            leaves_to_search = check_int("leaves_to_search", leaves_to_search, VectorIndexError)
        if reorder_k is not None:
            reorder_k = check_int("reorder_k", reorder_k, VectorIndexError)
        rows, scores = self._raw_search(
            prepared,
            k,
            leaves_to_search,
            reorder_k,
            check_int("batch_size", batch_size, VectorIndexError),
        )
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
        id_array = check_ids(ids, np.shape(vectors)[0] if np.ndim(vectors) == 2 else None)
        if id_array.size == 0:
            return {"added": 0, "replaced": 0}
        check_unique_ids(id_array)
        prepared = prepare_vectors(
            vectors,
            field="vectors",
            metric=self.metric,
            width=self.input_dim,
            dims=self.dims if self.dims < self.input_dim else None,
            ids=id_array,
        )
        rows = self._rows()
        keys = id_array.tolist()
        indices = [rows.get(key) for key in keys]
        try:
            assigned = self._searcher.upsert(
                indices, prepared, check_int("batch_size", batch_size, VectorIndexError)
            )
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
        for key, row in zip(id_array[new].tolist(), added_rows.tolist(), strict=False):
            rows[key] = row
        if self._vectors is not None:
            vectors_now = (
                np.array(self._vectors) if not self._vectors.flags.writeable else self._vectors
            )
            vectors_now[replaced_rows] = prepared[~new]
            self._vectors = (
                np.concatenate([vectors_now, prepared[new]]) if added_rows.size else vectors_now
            )
        self._after_update(int(id_array.size))
        return {"added": int(added_rows.size), "replaced": int(replaced_rows.size)}

    def delete(self, ids, *, missing_ok: bool = False) -> int:
        """Removes ids from the index without a rebuild; returns how many were removed.

        An unknown id is an error naming it (unless ``missing_ok``). The last row moves
        into each freed row, as ScaNN does.
        """
        id_array = check_ids(ids, None)
        rows = self._rows()
        keys = list(dict.fromkeys(id_array.tolist()))
        unknown = [key for key in keys if key not in rows]
        if unknown and not missing_ok:
            raise VectorIndexError(
                f"ids: {len(unknown)} of {len(keys)} ids are not in the index "
                f"(first: {unknown[0]!r}); pass missing_ok=True to skip them"
            )
        keys = [key for key in keys if key in rows]
        if len(keys) >= self.count:
            raise VectorIndexError(
                f"ids: deleting all {self.count} items would leave an empty "
                "index; build a new one instead"
            )
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
        self.manifest["updates_since_recall"] = (
            self.manifest.get("updates_since_recall", 0) + changed
        )

    def rebuild(self, *, target_recall: float | None = None, **build_kwargs) -> "VectorIndex":
        """A new index trained and tuned on the current items (after many upserts/deletes)."""
        keep = {
            "metric": self.metric,
            "num_neighbors": self.params.num_neighbors,
            "target_recall": self.manifest["target_recall"]
            if target_recall is None
            else target_recall,
            "model": self.manifest.get("model"),
            "checkpoint_step": self.manifest.get("checkpoint_step"),
            "brute_force_below": self.manifest.get("brute_force_below", BRUTE_FORCE_BELOW),
        }
        keep.update(build_kwargs)
        return VectorIndex.build(np.asarray(self._require_vectors("rebuild")), self._ids, **keep)

    # ------------------------------------------------------------ save, load
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to ``directory`` atomically; returns its path.

        A failed save leaves any previous index at ``directory`` as it was; an existing
        ``directory`` must be an index or empty (see ``index_files.write_atomically``).
        """
        target = write_atomically(directory, self._write)
        get_logger().info("VectorIndex: saved %d items to %s", self.count, target)
        return target

    def _write(self, directory: Path) -> None:
        write_index_files(
            directory,
            self._searcher,
            self._ids,
            dict(self.manifest, count=self.count, params=self.params.to_json()),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, *, verify: bool = True) -> "VectorIndex":
        """Reads an index written by ``save``; ``verify`` checks every file's sha256 first."""
        return cls(**read_index_directory(directory, verify=verify))

    def __repr__(self) -> str:
        recall = (self.manifest.get("recall") or {}).get("recall")
        return (
            f"VectorIndex(count={self.count}, dims={self.dims}, metric={self.metric!r}, "
            f"{describe_params(self.params)}, recall={recall})"
        )
