"""The serving core behind ``lf-jax serve``: loaded versions, batched device work, hot swap.

An artifacts directory (``lf-jax export --serving``) holds ``versions/<v>/{retrieval,ranker}``,
``features/`` (the feature store) and ``CURRENT`` (the version to serve). ``Service``
loads the current version on one CPU device, computes the ranker's post cache from the
store (every post-only part of the ranker for every post, on the device; recomputed when
the store changes: ``refresh_features``, polled by the server), compiles every bucket,
and runs one worker
thread that takes every request waiting (up to the largest query bucket), so concurrent
requests share one retrieval call and one ranking call. ``swap`` loads and compiles
another version beside the one serving, then switches in one reference assignment: a
batch runs wholly on the version it started with, and no request waits on a load.

Stages: "retrieve" (member -> top K items), "rank" (member + candidate posts -> scores),
"feed" (both: retrieve K, rank them, return the top N).

Example:
    >>> service = Service("runs/demo/serving")
    >>> result = service.submit(Request("feed", "m3", k=500, top_n=10)).result()
    >>> result["post_ids"][:3], result["version"]
"""

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from pathlib import Path

import jax
import numpy as np

from lf_jax.errors import UserInputError
from lf_jax.serving.artifact import ArtifactError, ServedModel
from lf_jax.serving.feature_store import FeatureStore
from lf_jax.serving.functions import top_k_rows

STAGES = ("retrieve", "rank", "feed")
CURRENT = "CURRENT"


class RequestError(UserInputError):
    """A request the service cannot answer; ``status`` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Request:
    """One member's request; ``post_ids`` for "rank", ``k`` for "retrieve" and "feed"."""

    stage: str
    member_id: str
    k: int = 0
    post_ids: list[str] | None = None
    top_n: int | None = None
    # the ranker's table rows of member_id and the posts to rank (Version.check, _process)
    member_row: int = -1
    post_rows: np.ndarray | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    received: float = dataclasses.field(default_factory=time.perf_counter)


class Version:
    """One artifact version, loaded and compiled on ``device``, with the ranker's post cache
    computed from ``store`` (every post-only part of the ranker, on the device)."""

    def __init__(self, directory: Path, device, store: FeatureStore):
        self.name = directory.name
        self.models: dict[str, ServedModel] = {}
        for model in ("retrieval", "ranker"):
            if (directory / model).is_dir():
                self.models[model] = ServedModel.load(directory / model, device)
        if not self.models:
            raise ArtifactError(f"artifact version '{directory}' holds no retrieval/ or ranker/")
        ranker = self.models.get("ranker")
        self.post_cache: jax.Array | None = None
        self.store_generation = -1
        if ranker is not None:
            self.refresh_post_cache(store)
        self.compile_seconds = sum(
            m.warm_up(self.post_cache) if m is ranker else m.warm_up() for m in self.models.values()
        )
        self.tasks = ranker.manifest["tasks"] if ranker else []
        self.task_weights = (
            np.array([ranker.manifest["task_weights"][t] for t in self.tasks], np.float32)
            if ranker
            else None
        )
        # the store's members' id-map rows, looked up once here (Version.check's lookups)
        self.members_known = self.check_model().remember_rows("member", store.member_ids())
        retrieval = self.models.get("retrieval")
        # retrieved item row -> the ranker's post table row (feed requests skip the id map)
        self.item_post_rows = (
            ranker.rows("post", retrieval.keys["item"].tolist())[0]
            if ranker and retrieval
            else None
        )

    def refresh_post_cache(self, store: FeatureStore) -> bool:
        """Recomputes the post cache from the store's rows when the store changed since the
        last computation (near-line updates); returns whether it did. The new cache is
        swapped in by one reference assignment: a batch uses the one it started with."""
        generation = store.generation()
        ranker = self.models.get("ranker")
        if ranker is None or generation == self.store_generation:
            return False
        _, rows = store.read([], ranker.post_keys())
        self.post_cache = ranker.post_cache(rows)
        self.store_generation = generation
        return True

    def stages(self) -> list[str]:
        have = set(self.models)
        return [
            s
            for s, needs in (
                ("retrieve", {"retrieval"}),
                ("rank", {"ranker"}),
                ("feed", {"retrieval", "ranker"}),
            )
            if needs <= have
        ]

    def max_candidates(self, model: str) -> int:
        return max(k for _, k in self.models[model].buckets)

    def check_model(self) -> ServedModel:
        """The model whose member id map ``check`` reads (the ranker's, if served)."""
        return self.models.get("ranker") or next(iter(self.models.values()))

    def check(self, request: Request) -> tuple[str, int] | None:
        """(reason, status) when ``request`` cannot be answered by this version, else None."""
        member_rows, known_member = self.check_model().rows("member", [request.member_id])
        if not known_member[0]:
            return f"member_id {request.member_id!r} is not a known member", 404
        request.member_row = int(member_rows[0])
        if request.stage == "rank":
            posts = request.post_ids or []
            limit = self.max_candidates("ranker")
            if not 1 <= len(posts) <= limit:
                return f"post_ids must name 1 to {limit} posts, got {len(posts)}", 400
            if len(set(posts)) != len(posts):
                return "post_ids must not repeat a post", 400
            rows, known = self.models["ranker"].rows("post", posts)
            if not known.all():
                first = posts[int(np.argmin(known))]
                return f"post_ids: {first!r} is not a known post", 404
            request.post_rows = rows
        else:
            limit = min(self.max_candidates("retrieval"), self.max_candidates("ranker"))
            if request.stage == "retrieve":
                limit = self.max_candidates("retrieval")
            if not 1 <= request.k <= limit:
                return f"k must be an int in [1, {limit}], got {request.k!r}", 400
        return None

    def compiles(self) -> int:
        """Compilations since warm-up (0 while every request hits a compiled bucket)."""
        return sum(m.cache_size() - m.compiles for m in self.models.values())


def read_current(root: Path) -> str:
    path = root / CURRENT
    if not path.is_file():
        raise ArtifactError(
            f"'{root}' has no {CURRENT} file: export with `lf-jax export --serving`"
        )
    return path.read_text().strip()


class Service:
    """Loads ``root``'s current version and answers requests (see the module docstring)."""

    def __init__(self, root: str | Path, *, max_queries: int | None = None, window_ms: float = 0.0):
        self.root = Path(root)
        self.device = jax.local_devices(backend="cpu")[0]
        self.store = FeatureStore.open(self.root / "features")
        self.current = Version(
            self.root / "versions" / read_current(self.root), self.device, self.store
        )
        self.max_queries = max_queries or max(
            q for m in self.current.models.values() for q, _ in m.buckets
        )
        self.window_s = window_ms / 1e3
        self.timings: dict[str, collections.deque] = {
            name: collections.deque(maxlen=20_000)
            for name in ("queue_ms", "features_ms", "retrieve_ms", "rank_ms", "total_ms")
        }
        self.batches: collections.Counter[int] = collections.Counter()
        self.swaps: list[dict] = []
        self._swap_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="lf_jax-serving", daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------- requests
    def submit(self, request: Request) -> concurrent.futures.Future:
        if request.stage not in self.current.stages():
            raise RequestError(
                f"stage {request.stage!r} is not served by version {self.current.name} "
                f"(stages: {self.current.stages()})",
                404,
            )
        self._queue.put(request)
        return request.future

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if self.window_s:
                time.sleep(self.window_s)
            batch = [first]
            while len(batch) < self.max_queries:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            version = self.current  # the whole batch runs on one version
            try:
                self._process(version, batch)
            except Exception as error:  # a bug must not stop the worker; each request learns
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)

    def _fail(self, request: Request, message: str, status: int) -> None:
        request.future.set_exception(RequestError(message, status))

    def _process(self, version: Version, batch: list[Request]) -> None:
        start = time.perf_counter()
        self.batches[len(batch)] += 1
        live = []
        for request in batch:
            problem = version.check(request)
            if problem is not None:
                self._fail(request, *problem)
            else:
                live.append(request)
        if not live:
            return
        ranker = version.models.get("ranker")
        # candidates to rank per request (their post table rows: request.post_rows)
        rank_posts: dict[int, int] = {
            i: len(r.post_ids or []) for i, r in enumerate(live) if r.stage == "rank"
        }
        # one read: the batch's member rows (post features are in the post cache)
        t = time.perf_counter()
        member_rows, _ = self.store.read([r.member_id for r in live], [])
        features_ms = 1e3 * (time.perf_counter() - t)
        retrieve_ms = 0.0
        retrieved: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        wants = [i for i, r in enumerate(live) if r.stage in ("retrieve", "feed")]
        if wants:
            t = time.perf_counter()
            found = self._retrieve(version, [live[i] for i in wants], member_rows[wants])
            retrieved = dict(zip(wants, found, strict=True))
            retrieve_ms = 1e3 * (time.perf_counter() - t)
            for i in wants:
                if live[i].stage == "feed":
                    assert version.item_post_rows is not None  # feed: both models
                    rank_posts[i] = len(retrieved[i][1])
                    live[i].post_rows = version.item_post_rows[retrieved[i][1]]
        rank_ms = 0.0
        scored: dict[int, np.ndarray] = {}
        if rank_posts and ranker is not None:
            t = time.perf_counter()
            scored = self._rank(version, live, member_rows, rank_posts)
            rank_ms = 1e3 * (time.perf_counter() - t)
        done = time.perf_counter()
        # retrieved item row -> post id, for the posts an answer names
        retrieval = version.models.get("retrieval")
        item_keys = retrieval.keys["item"] if retrieval else np.zeros(0, str)
        for i, request in enumerate(live):
            out: dict = {"member_id": request.member_id, "version": version.name}
            if request.stage == "retrieve":
                scores, rows = retrieved[i]
                out["post_ids"] = item_keys[rows].tolist()
                out["retrieval_scores"] = scores.tolist()
            else:
                probs_kt = scored[i]
                score_k = probs_kt @ version.task_weights
                top_n = min(request.top_n or len(score_k), len(score_k))
                order = top_k_rows(score_k[None], top_n)[1][0]  # ties: the earlier candidate
                if request.stage == "rank":
                    out["post_ids"] = [(request.post_ids or [])[j] for j in order]
                else:  # only the answer's posts get their string ids
                    out["post_ids"] = item_keys[retrieved[i][1][order]].tolist()
                out["scores"] = score_k[order].tolist()
                out["task_probs"] = {
                    t: probs_kt[order, n].tolist() for n, t in enumerate(version.tasks)
                }
                if request.stage == "feed":
                    out["retrieval_scores"] = retrieved[i][0][order].tolist()
                    out["num_candidates"] = len(score_k)
            total_ms = 1e3 * (done - request.received)
            out["timings_ms"] = {
                "queue": 1e3 * (start - request.received),
                "features": features_ms,
                "retrieve": retrieve_ms,
                "rank": rank_ms,
                "total": total_ms,
            }
            for name, value in out["timings_ms"].items():
                self.timings[f"{name}_ms"].append(value)
            request.future.set_result(out)

    def _retrieve(self, version: Version, requests: list[Request], member_qw: np.ndarray):
        model = version.models["retrieval"]
        k = max(r.k for r in requests)
        fn, (qb, kb) = model.bucket(len(requests), k)
        padded = np.zeros((qb, member_qw.shape[1]), np.float32)
        padded[: len(requests)] = member_qw
        scores_qn = np.asarray(fn(model.weights, padded))
        found = []
        for j, request in enumerate(requests):  # the top K on the host (top_k_rows)
            scores, rows = top_k_rows(scores_qn[j : j + 1], request.k)
            found.append((scores[0], rows[0]))
        return found

    def _rank(self, version: Version, live, member_rows, rank_posts):
        ranker, post_cache = version.models["ranker"], version.post_cache
        order = list(rank_posts)
        out = {}
        for start in range(0, len(order), self.max_queries):
            chunk = order[start : start + self.max_queries]
            k = max(max(rank_posts[i] for i in chunk), 1)
            fn, (qb, kb) = ranker.bucket(len(chunk), k)
            member_qw = np.zeros((qb, member_rows.shape[1]), np.float32)
            member_q = np.zeros(qb, np.int32)
            post_qk = np.zeros((qb, kb), np.int32)
            for j, i in enumerate(chunk):
                member_qw[j] = member_rows[i]
                member_q[j] = live[i].member_row
                post_qk[j, : rank_posts[i]] = live[i].post_rows
            probs = np.asarray(fn(ranker.weights, post_cache, member_qw, member_q, post_qk))
            for j, i in enumerate(chunk):
                out[i] = probs[j, : rank_posts[i]]
        return out

    # ------------------------------------------------------------------ hot swap
    def swap(self, name: str | None = None) -> dict:
        """Loads version ``name`` (default: what CURRENT names) beside the serving one and
        switches to it; returns what happened. Concurrent calls wait for each other."""
        with self._swap_lock:
            name = name or read_current(self.root)
            if name == self.current.name:
                return {"version": name, "swapped": False}
            start = time.perf_counter()
            version = Version(self.root / "versions" / name, self.device, self.store)
            old, self.current = self.current.name, version
            record = {
                "version": name,
                "previous": old,
                "swapped": True,
                "load_seconds": time.perf_counter() - start,
                "compile_seconds": version.compile_seconds,
            }
            self.swaps.append(record)
            return record

    def refresh_features(self) -> bool:
        """Recomputes the serving version's post cache when the feature store changed (the
        server calls it every poll); returns whether it did."""
        with self._swap_lock:
            return self.current.refresh_post_cache(self.store)

    # ------------------------------------------------------------------- reports
    def metrics(self) -> dict:
        def pct(values, p):
            return float(np.percentile(values, p)) if values else None

        return {
            "version": self.current.name,
            "stages": self.current.stages(),
            "compiles_since_warm_up": self.current.compiles(),
            "batches": {str(size): n for size, n in sorted(self.batches.items())},
            "swaps": self.swaps,
            "latency_ms": {
                name: {"p50": pct(list(v), 50), "p99": pct(list(v), 99), "count": len(v)}
                for name, v in self.timings.items()
            },
        }

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)
        self.store.close()
