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
searcher (a deleted row is filled by the last one, which index_updates.py mirrors). New
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

Input checks live in index_inputs.py, building in index_build.py, parameter choice and
tuning in scann_tuning.py, in-place updates in index_updates.py, the directory format in
index_files.py.
"""

import os
import time
from pathlib import Path

import numpy as np

from lf_jax.checks import check_int
from lf_jax.console import get_logger
from lf_jax.export.index_build import build_parts
from lf_jax.export.index_files import (
    read_index_directory,
    write_atomically,
    write_index_files,
)
from lf_jax.export.index_inputs import (
    VectorIndexError,
    check_ids,
    check_recall,
    prepare_vectors,
)
from lf_jax.export.index_updates import (
    deletable_keys,
    delete_rows,
    upsert_inputs,
    upsert_rows,
)
from lf_jax.export.scann_tuning import (
    BRUTE_FORCE_BELOW,
    TUNE_QUERIES,
    SearchParams,
    describe_params,
    exact_search,
    recall_of,
    search_rows,
    tune_search,
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
        index = cls(
            **build_parts(
                vectors,
                ids,
                metric=metric,
                target_recall=target_recall,
                num_neighbors=num_neighbors,
                dims=dims,
                brute_force_below=brute_force_below,
                model=model,
                checkpoint_step=checkpoint_step,
                training_threads=training_threads,
            )
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

    def _raw_search(self, queries, k, leaves, reorder, batch_size: int = 256):
        return search_rows(self._searcher, self.params, queries, k, leaves, reorder, batch_size)

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
        self.params, report = tune_search(
            lambda leaves, reorder: self._raw_search(prepared, k, leaves, reorder),
            exact_rows,
            self.params,
            count=self.count,
            target=target,
            margin=margin,
            source=source,
            start=start,
        )
        self.manifest.update(recall=report, target_recall=target, updates_since_recall=0)
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
        inputs = upsert_inputs(ids, vectors, self.metric, self.input_dim, self.dims)
        if inputs is None:
            return {"added": 0, "replaced": 0}
        id_array, prepared = inputs
        self._ids, self._vectors, added, replaced = upsert_rows(
            self._searcher,
            self._ids,
            self._vectors,
            self._rows(),
            id_array,
            prepared,
            check_int("batch_size", batch_size, VectorIndexError),
        )
        self._after_update(int(id_array.size))
        return {"added": added, "replaced": replaced}

    def delete(self, ids, *, missing_ok: bool = False) -> int:
        """Removes ids from the index without a rebuild; returns how many were removed.

        An unknown id is an error naming it (unless ``missing_ok``). The last row moves
        into each freed row, as ScaNN does.
        """
        rows = self._rows()
        keys = deletable_keys(check_ids(ids, None), rows, missing_ok)
        if not keys:
            return 0
        try:
            self._ids, self._vectors = delete_rows(
                self._searcher, self._ids, self._vectors, rows, keys
            )
        except VectorIndexError:
            self._row = None
            raise
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
