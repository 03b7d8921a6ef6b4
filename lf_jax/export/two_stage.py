"""Two-stage serving: dual encoder + ScaNN retrieve candidates, the feed ranker ranks them.

For each member: the dual encoder embeds the member prompt (``query_encoder``), the ScaNN
index of item vectors returns the top K candidates (K up to 2000), the feed ranker scores
every (member, candidate) pair with the member's features on the mesh, and the top N
come back with the ranker's per-task probabilities and the retrieval score.

Features for the ranker come from ``FeedWorldFeatures``: the synthetic feed_logs world is
the feature store. Catalog features of a post (author, reshared author, hashtags, author
followers, prior likes) and of a member (activity) are read from the world; a request
draws the member's recent history and the per-impression features (post age, the noisy
affinity features) exactly as the simulator draws them for a logged session, at position
0 (serving ranks as if every candidate were shown first: no position bias). Because the
world knows the truth, ``true_relevance`` gives each served post's true engagement
probability, which the demo uses to show what each stage buys.

Shapes: Q queries, K candidates, N results, T tasks.

Example:
    >>> service = TwoStageService(query_encoder, item_index, RankerScorer(ranker_source),
    ...                           FeedWorldFeatures("tiny"), num_candidates=2000, top_n=10)
    >>> results = service.serve(["m3", "m17"])       # one ServedFeed per member
    >>> results[0].post_ids[:3], results[0].task_probs["like"][:3]
"""

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lf_jax import feed_world
from lf_jax.errors import UserInputError


class ServingError(UserInputError):
    """Bad serving input: unknown ids, bad K or N, mismatched components."""


def parse_ids(ids: Sequence[str], prefix: str, count: int, field: str) -> np.ndarray:
    """["m3", "m17"] -> [3, 17]; an id without the prefix or out of [0, count) is an error."""
    out = np.empty(len(ids), np.int64)
    for i, key in enumerate(ids):
        body = key[len(prefix) :] if isinstance(key, str) and key.startswith(prefix) else ""
        if not body.isdigit() or int(body) >= count:
            raise ServingError(
                f"{field}[{i}]={key!r} is not a known id ('{prefix}0' .. '{prefix}{count - 1}')"
            )
        out[i] = int(body)
    return out


class FeedWorldFeatures:
    """Ranker features of (member, post) pairs from the feed_logs world (see module docstring)."""

    def __init__(self, size: str = "tiny", seed: int = 0):
        if size not in feed_world.CONFIGS:
            raise ServingError(
                f"feed_logs size {size!r} is not one of {sorted(feed_world.CONFIGS)}"
            )
        self.config = feed_world.CONFIGS[size]
        self.world = feed_world.make_world(self.config)
        self.seed = int(seed)

    @property
    def num_members(self) -> int:
        return self.config.num_members

    @property
    def num_posts(self) -> int:
        return self.config.num_posts

    def batch(self, members_q: np.ndarray, posts_qk: np.ndarray) -> dict[str, np.ndarray]:
        """The host batch of feed_pipeline's fields for Q members x K posts, flattened to Q*K rows.

        A member's history and the per-impression draws come from a stream seeded by
        (seed, member): the same request gives the same features, alone or batched.
        """
        w, cfg = self.world, self.config
        q, k = posts_qk.shape
        hist_actors = np.empty((q, cfg.max_history), np.int64)
        hist_tags = np.empty((q, cfg.max_history), np.int64)
        log_age, noise = np.empty((q, k)), np.empty((q, k, 2))
        for row, member in enumerate(members_q):  # one stream per member: a request is reproducible
            rng = np.random.default_rng([self.seed, int(member)])
            actors, tags = feed_world.draw_histories(rng, w, np.array([member]), cfg.max_history)
            hist_actors[row], hist_tags[row] = actors[0], tags[0]
            log_age[row] = np.log1p(rng.lognormal(2.5, 1.0, k))
            noise[row] = rng.normal(0.0, cfg.affinity_noise, (k, 2))
        member_qk = np.repeat(members_q[:, None], k, axis=1)
        actor, root = w.post_actor[posts_qk], w.post_root_actor[posts_qk]
        tags = w.post_hashtags[posts_qk]
        aff = feed_world.affinities(w, member_qk, actor, root, tags)
        dense = np.stack(
            [
                np.log1p(w.followers[actor]),
                np.log1p(w.followers[root]),
                log_age,
                np.log1p(5.0 * w.member_activity[member_qk]),
                aff[..., 0] + noise[..., 0],
                aff[..., 2] + noise[..., 1],
                np.log1p(w.post_prior_likes[posts_qk]),
                (actor != root).astype(np.float64),
            ],
            axis=-1,
        )

        def flat(a):
            return a.reshape(q * k, *a.shape[2:])

        return {
            "member_id": flat(member_qk),
            "actor_id": flat(actor),
            "root_actor_id": flat(root),
            "post_id": flat(posts_qk),
            "position": np.zeros(q * k, np.int64),
            "post_hashtags": flat(tags),
            "history_actors": np.repeat(hist_actors, k, axis=0),
            "history_hashtags": np.repeat(hist_tags, k, axis=0),
            "dense": flat(dense).astype(np.float32),
            "log_age": flat(log_age),
        }

    def true_relevance(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """The world's true position-free engagement probabilities [B, T] of a ``batch`` (oracle;
        evaluation only, never an input to serving)."""
        w = self.world
        member, post = batch["member_id"], batch["post_id"]
        aff = feed_world.affinities(
            w, member, batch["actor_id"], batch["root_actor_id"], batch["post_hashtags"]
        )
        logits = feed_world.relevance_logits(w, member, post, aff, batch["log_age"])
        return 1.0 / (1.0 + np.exp(-logits))


class RankerScorer:
    """The feed ranker's per-task probabilities [B, T] for host batches, on the mesh.

    ``source`` is a restored ``corpus_sources.RankerCorpus`` (model + state). Batches are
    padded to a multiple of the devices, rounded up to a power of two, so repeated
    requests of one size compile once. With dynamic tables the keys are found as in
    evaluation (``resolve(insert=False)``: an absent key reads nothing, as padding).
    """

    def __init__(self, source):
        import jax

        from lf_jax.train.step import make_eval_step

        self.model, self.state = source.model, source.state
        self.tasks = tuple(self.model.tasks)
        self.collection = self.model.collection
        self._step = make_eval_step(
            self.model.graphdef,
            self.collection,
            lambda model, acts, batch: jax.nn.sigmoid(model(acts, batch["dense"])),
        )
        self._find = None
        if self.model.dynamic is not None:
            from lf_jax.train.dynamic_step import make_dynamic_resolve

            self._find = make_dynamic_resolve(self.model.dynamic)

    def score(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        rows = len(batch["member_id"])
        devices = self.collection.num_devices
        padded = max(devices, 1 << (rows - 1).bit_length())
        padded = -(-padded // devices) * devices
        raw = {}
        for name in self.collection.features:
            ids = np.asarray(batch[name]).reshape(rows, -1)
            raw[name] = np.pad(ids, ((0, padded - rows), (0, 0)), constant_values=-1)
        dense = np.pad(self.model.normalize_dense(batch["dense"]), ((0, padded - rows), (0, 0)))
        sharding = NamedSharding(self.collection.mesh, PartitionSpec(self.collection.batch_axes))
        inputs = {"sparse": self.model.preprocess(raw), "dense": dense}
        inputs = jax.tree.map(lambda x: jax.device_put(x, sharding), inputs)
        if self._find is not None:  # keys -> rows of the keys the tables hold
            inputs["sparse"] = self._find(self.state, inputs["sparse"])
        probs = self._step(self.state["params"], self.state["embedding"]["tables"], inputs)
        return np.asarray(probs)[:rows]


def dual_encoder_queries(source) -> Callable[[list[str]], np.ndarray]:
    """The dual encoder's member tower as a query encoder: ids ["m3", ...] -> unit vectors [Q, D].

    ``source`` is a restored ``corpus_sources.DualEncoderCorpus``; each call renders the
    members' prompts and embeds them on the mesh.
    """
    ids, records = source.corpus("members")
    row = {key: i for i, key in enumerate(ids)}

    def encode(member_ids: list[str]) -> np.ndarray:
        unknown = [key for key in member_ids if key not in row]
        if unknown:
            raise ServingError(f"member id {unknown[0]!r} is not in the dual encoder's corpus")
        return source.embed("members", [records[row[key]] for key in member_ids])

    return encode


@dataclasses.dataclass
class ServedFeed:
    """One member's result: top-N post ids, their ranking score, retrieval score and
    per-task probabilities ({task: [N]}), their rows among the K candidates (in retrieval
    order, i.e. rows of ``TwoStageService.last_batch`` for this member), and the number of
    candidates ranked."""

    member_id: str
    post_ids: list[str]
    score: np.ndarray
    retrieval_score: np.ndarray
    task_probs: dict[str, np.ndarray]
    rows: np.ndarray
    num_candidates: int


class TwoStageService:
    """Retrieve (dual encoder + ScaNN) then rank (feed ranker); see the module docstring.

    query_encoder: member ids [Q] -> query vectors [Q, D] (the dual encoder's member tower).
    index: a VectorIndex over item vectors keyed "p<id>". task_weights: the ranking score
    is sum_t weight_t * p_t (default: 1 for every task). After ``serve``: ``timings``
    (ms per stage) and ``last_batch`` (the ranker's input rows, Q*K, for evaluation).
    """

    def __init__(
        self,
        query_encoder: Callable[[list[str]], np.ndarray],
        index,
        scorer: RankerScorer,
        features: FeedWorldFeatures,
        *,
        num_candidates: int = 2000,
        top_n: int = 10,
        task_weights: Mapping[str, float] | None = None,
    ):
        self.query_encoder, self.index, self.scorer, self.features = (
            query_encoder,
            index,
            scorer,
            features,
        )
        self.num_candidates = self._check_k("num_candidates", num_candidates)
        self.top_n = self._check_n(top_n, self.num_candidates)
        weights = dict(task_weights or {name: 1.0 for name in scorer.tasks})
        unknown = sorted(set(weights) - set(scorer.tasks))
        if unknown:
            raise ServingError(
                f"task_weights names unknown task(s) {unknown} (tasks: {list(scorer.tasks)})"
            )
        self.weights_t = np.array([weights.get(name, 0.0) for name in scorer.tasks], np.float32)
        self.timings: dict[str, float] = {}
        self.last_batch: dict[str, np.ndarray] = {}

    def _check_k(self, field: str, k) -> int:
        if (
            not isinstance(k, (int, np.integer))
            or isinstance(k, bool)
            or not 1 <= k <= self.index.count
        ):
            raise ServingError(
                f"{field} must be an int in [1, {self.index.count}] (the index size), got {k!r}"
            )
        return int(k)

    @staticmethod
    def _check_n(n, k: int) -> int:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= k:
            raise ServingError(f"top_n must be an int in [1, num_candidates={k}], got {n!r}")
        return int(n)

    def leaves_for(self, k: int) -> int | None:
        """Tree leaves to search for K candidates: the tuned setting, raised so the searched
        leaves hold about 2K items (the tuned one is for top-10 recall); None for brute force."""
        params = self.index.params
        if params.mode == "brute_force":
            return None
        per_leaf = self.index.count / params.num_leaves
        return int(min(params.num_leaves, max(params.leaves_to_search, np.ceil(2 * k / per_leaf))))

    def retrieve(self, member_ids: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate post ids [Q, K] (str) and retrieval scores [Q, K] for the members."""
        start = time.perf_counter()
        queries = np.asarray(self.query_encoder(list(member_ids)), np.float32)
        self.timings["embed_query_ms"] = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        found, scores = self.index.search(queries, k=k, leaves_to_search=self.leaves_for(k))
        self.timings["retrieve_ms"] = 1e3 * (time.perf_counter() - start)
        return found, scores

    def serve(
        self,
        member_ids: Sequence[str],
        *,
        num_candidates: int | None = None,
        top_n: int | None = None,
    ) -> list[ServedFeed]:
        """Top-N feeds for ``member_ids`` ("m<id>"); timings of each stage in ``self.timings``
        (ms)."""
        if isinstance(member_ids, str) or len(member_ids) == 0:
            raise ServingError(
                f"member_ids must be a non-empty list of ids like 'm3', got {member_ids!r}"
            )
        k = (
            self.num_candidates
            if num_candidates is None
            else self._check_k("num_candidates", num_candidates)
        )
        n = self.top_n if top_n is None else self._check_n(top_n, k)
        members_q = parse_ids(member_ids, "m", self.features.num_members, "member_ids")
        total = time.perf_counter()
        found_qk, retrieval_qk = self.retrieve(member_ids, k)
        start = time.perf_counter()
        filled = found_qk != ""
        posts_qk = np.zeros(found_qk.shape, np.int64)
        posts_qk[filled] = parse_ids(
            found_qk[filled].tolist(), "p", self.features.num_posts, "index ids"
        )
        batch = self.features.batch(members_q, posts_qk)
        self.timings["features_ms"] = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        probs_bt = self.scorer.score(batch).reshape(len(members_q), k, -1)
        self.timings["rank_ms"] = 1e3 * (time.perf_counter() - start)
        score_qk = np.where(filled, probs_bt @ self.weights_t, -np.inf)
        order_qn = np.argsort(-score_qk, axis=1, kind="stable")[:, :n]
        self.timings["total_ms"] = 1e3 * (time.perf_counter() - total)
        self.last_batch = batch
        results = []
        for q, member in enumerate(member_ids):
            top = order_qn[q][np.isfinite(score_qk[q, order_qn[q]])]
            results.append(
                ServedFeed(
                    member_id=member,
                    post_ids=found_qk[q, top].tolist(),
                    score=score_qk[q, top],
                    retrieval_score=retrieval_qk[q, top],
                    task_probs={
                        name: probs_bt[q, top, t] for t, name in enumerate(self.scorer.tasks)
                    },
                    rows=top,
                    num_candidates=int(filled[q].sum()),
                )
            )
        return results
