"""Synthetic feed logs with a known truth: who saw which post where, and why they engaged.

Pure numpy, vectorised, deterministic given ``SimConfig.seed``. A *world* (members,
hashtags, posts and their latent vectors) is drawn once; sessions are then drawn in
chunks of ``chunk_sessions`` so that the large size streams without holding every
impression in memory. Chunk ``c`` of split ``s`` uses its own random stream
(SeedSequence(seed, spawn_key=(s, c))), so the output does not depend on how it is read.

The truth:
  * members, hashtags and topics have latent vectors (dim 16); actors and root actors
    are members (one id space), and a member's vector is also its vector as an author;
  * relevance (position-free) per task = sigmoid(task bias + member bias + weighted
    member.actor, member.root_actor and mean member.hashtag affinities + post quality +
    popularity - age), i.e. learnable from the ids and the dense features;
  * examination falls with position: e(pos) = (1 + pos) ** -position_bias_exponent;
    labels: examined ~ Bernoulli(e(pos)), label_k = examined * Bernoulli(relevance_k), so
    ``true_probs = e(pos) * relevance_probs``;
  * exposure bias: every session retrieves ``num_candidates`` posts (mostly from the
    member's topics); ranked sessions show the top ``session_length`` by an old model's
    score that favours popular actors and fresh posts, in score order; random sessions
    (a ``random_share`` of train sessions, all of holdout_random) show a uniform random
    subset of the candidates in random order.
  * logged features: the member's history is what they engaged with (actors and hashtags
    picked from their topics by affinity, see ``draw_history``); two dense features are the
    member-actor and member-hashtag affinities plus N(0, ``affinity_noise``) noise.

Example:
    >>> cfg = CONFIGS["tiny"]
    >>> chunk = next(simulate_chunks(cfg, "train"))
    >>> chunk["labels"].shape, chunk["history_actors"].shape   # [n, 4], [n, 50] (-1 padded)
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

TASKS = ("like", "comment", "share", "long_dwell")
SPLITS = ("train", "holdout_ranked", "holdout_random")
DENSE_FEATURES = (
    "log_actor_followers",
    "log_root_actor_followers",
    "log_post_age_hours",
    "log_member_activity",
    "member_actor_affinity_noisy",
    "member_hashtag_affinity_noisy",
    "log_post_prior_likes",
    "is_reshare",
)
LIST_FIELDS = ("post_hashtags", "history_actors", "history_hashtags")

# Relevance weights per task (rows follow TASKS): bias, actor, root actor, hashtag affinity,
# post quality, log root followers, log age.
_TASK_WEIGHTS = np.array(
    [
        [-7.6, 1.2, 1.0, 1.0, 0.6, 0.15, -0.20],  # like
        [-8.2, 1.8, 0.6, 0.6, 0.4, 0.05, -0.30],  # comment: mostly people you know
        [-9.0, 0.6, 1.2, 1.0, 0.9, 0.20, -0.40],  # share: good, fresh content
        [-5.2, 0.6, 0.8, 1.6, 0.5, 0.05, -0.10],  # long_dwell: topical interest
    ]
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Sizes and knobs of one simulated world; sessions per split give the impressions."""

    name: str
    num_members: int
    num_hashtags: int
    num_posts: int
    num_topics: int
    train_sessions: int
    holdout_ranked_sessions: int
    holdout_random_sessions: int
    chunk_sessions: int = 5000
    session_length: int = 20  # positions 0..P-1
    num_candidates: int = 60  # retrieved per session; ranked sessions show the top P
    random_share: float = 0.05  # share of train sessions shown in random order
    reshare_share: float = 0.2
    position_bias_exponent: float = 0.8
    affinity_noise: float = 0.3  # std of the noise on the logged affinity features
    unlogged_signal: float = 0.0  # std of a relevance term only the old ranker saw (0: none)
    latent_dim: int = 16
    max_post_hashtags: int = 5
    max_history: int = 50
    seed: int = 0

    def sessions(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, f"{split}_sessions")

    def num_impressions(self, split: str) -> int:
        return self.sessions(split) * self.session_length

    def metadata(self) -> dict:
        """Vocab sizes, max lengths and names a model needs (JSON-serialisable)."""
        return {
            "config": self.name,
            "num_members": self.num_members,
            "num_hashtags": self.num_hashtags,
            "num_posts": self.num_posts,
            "num_positions": self.session_length,
            "dense_dim": len(DENSE_FEATURES),
            "dense_features": list(DENSE_FEATURES),
            "tasks": list(TASKS),
            "max_lengths": {
                "post_hashtags": self.max_post_hashtags,
                "history_actors": self.max_history,
                "history_hashtags": self.max_history,
            },
            "random_share": self.random_share,
            "position_bias_exponent": self.position_bias_exponent,
            "affinity_noise": self.affinity_noise,
            "unlogged_signal": self.unlogged_signal,
            "num_examples": {split: self.num_impressions(split) for split in SPLITS},
            "seed": self.seed,
        }


_TINY = SimConfig(
    name="tiny",
    num_members=300,
    num_hashtags=100,
    num_posts=1_000,
    num_topics=8,
    train_sessions=20_000,
    holdout_ranked_sessions=300,
    holdout_random_sessions=5_000,
    chunk_sessions=2_000,
    random_share=0.1,
    num_candidates=40,
)
CONFIGS = {
    "tiny": _TINY,
    # tiny plus a relevance term the old ranker used and the logs lack: selection on an
    # unobservable, what position IPS exists to correct (README "Feed ranker", IPS).
    "tiny_unlogged": dataclasses.replace(_TINY, name="tiny_unlogged", unlogged_signal=1.0),
    "small": SimConfig(
        name="small",
        num_members=100_000,
        num_hashtags=5_000,
        num_posts=100_000,
        num_topics=32,
        train_sessions=45_000,
        holdout_ranked_sessions=4_000,
        holdout_random_sessions=2_500,
    ),
    "large": SimConfig(
        name="large",
        num_members=1_000_000,
        num_hashtags=50_000,
        num_posts=1_000_000,
        num_topics=64,
        train_sessions=450_000,
        holdout_ranked_sessions=40_000,
        holdout_random_sessions=25_000,
    ),
}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class _GroupedSampler:
    """Draws items within a group (topic) with probability proportional to a weight."""

    def __init__(self, groups: np.ndarray, weights: np.ndarray, num_groups: int):
        self.order = np.argsort(groups, kind="stable")
        self.cum = np.concatenate([[0.0], np.cumsum(weights[self.order], dtype=np.float64)])
        self.offsets = np.searchsorted(groups[self.order], np.arange(num_groups + 1))

    def sample(self, rng: np.random.Generator, group: np.ndarray | None, size=None) -> np.ndarray:
        """Item ids for each group in ``group`` (None: over all items)."""
        if group is None:
            lo, hi = self.cum[0], self.cum[-1]
            shape = size
        else:
            lo, hi = self.cum[self.offsets[group]], self.cum[self.offsets[group + 1]]
            shape = np.shape(group)
        u = lo + rng.random(shape) * (hi - lo)
        idx = np.searchsorted(self.cum, u, side="right") - 1
        return self.order[np.clip(idx, 0, len(self.order) - 1)]


@dataclasses.dataclass
class World:
    """Entities and their latent truth (arrays indexed by id)."""

    topic_vecs: np.ndarray  # [K, d]
    member_vecs: np.ndarray  # [M, d] unit, also the author vector of the member
    member_topics: np.ndarray  # [M, 2] primary, secondary
    member_activity: np.ndarray  # [M] sessions-per-day scale
    member_bias: np.ndarray  # [M] propensity to engage (logit)
    followers: np.ndarray  # [M] follower count as an author
    hashtag_vecs: np.ndarray  # [H, d] unit
    post_actor: np.ndarray  # [N]
    post_root_actor: np.ndarray  # [N] == post_actor when not a reshare
    post_topic: np.ndarray  # [N]
    post_hashtags: np.ndarray  # [N, 5] -1 padded, unique per post
    post_quality: np.ndarray  # [N] unobserved (dense 6 is a noisy trace of it)
    post_prior_likes: np.ndarray  # [N]
    actor_sampler: _GroupedSampler = dataclasses.field(repr=False)
    hashtag_sampler: _GroupedSampler = dataclasses.field(repr=False)
    post_sampler: _GroupedSampler = dataclasses.field(repr=False)
    session_sampler: _GroupedSampler = dataclasses.field(repr=False)


def make_world(cfg: SimConfig) -> World:
    """Draws the entities of ``cfg`` (deterministic given cfg.seed)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(99,)))
    K, d, M, H, N = cfg.num_topics, cfg.latent_dim, cfg.num_members, cfg.num_hashtags, cfg.num_posts
    topic_vecs = _unit(rng.standard_normal((K, d)))
    topic_weight = rng.dirichlet(np.full(K, 2.0))
    member_topics = np.stack([rng.choice(K, M, p=topic_weight), rng.integers(0, K, M)], axis=1)
    member_topics[:K, 0] = np.arange(K)  # every topic has members
    member_vecs = _unit(
        0.8 * topic_vecs[member_topics[:, 0]]
        + 0.35 * topic_vecs[member_topics[:, 1]]
        + 0.3 * rng.standard_normal((M, d)) / np.sqrt(d) * 2
    )
    member_activity = rng.lognormal(0.0, 0.7, M)
    member_bias = rng.normal(0.0, 0.5, M)
    followers = np.floor(rng.lognormal(3.0, 1.6, M)).astype(np.int64)

    hashtag_topic = rng.integers(0, K, H)
    hashtag_topic[:K] = np.arange(K)
    hashtag_vecs = _unit(
        topic_vecs[hashtag_topic] + 0.5 * rng.standard_normal((H, d)) / np.sqrt(d) * 2
    )
    hashtag_pop = rng.permutation(1.0 / np.arange(1, H + 1) ** 0.9)

    actor_sampler = _GroupedSampler(member_topics[:, 0], followers + 1.0, K)
    post_actor = actor_sampler.sample(rng, None, N)  # authors post ~ their followers
    reshare = rng.random(N) < cfg.reshare_share
    post_root = np.where(reshare, actor_sampler.sample(rng, None, N), post_actor)
    post_topic = np.where(rng.random(N) < 0.85, member_topics[post_root, 0], rng.integers(0, K, N))
    post_topic[:K] = np.arange(K)
    hashtag_sampler = _GroupedSampler(hashtag_topic, hashtag_pop, K)
    T = cfg.max_post_hashtags
    tags = np.where(
        rng.random((N, T)) < 0.75,
        hashtag_sampler.sample(rng, np.repeat(post_topic[:, None], T, axis=1)),
        hashtag_sampler.sample(rng, None, (N, T)),
    )
    count = 1 + rng.binomial(T - 1, 0.35, N)
    tags = np.where(np.arange(T) < count[:, None], tags, -1)
    tags = np.sort(tags, axis=1)
    tags[:, 1:][tags[:, 1:] == tags[:, :-1]] = -1  # drop duplicates
    tags = -np.sort(-tags, axis=1)  # ids first, -1 padding last
    quality = rng.normal(0.0, 1.0, N)
    prior_likes = rng.poisson(np.sqrt(followers[post_root] + 1.0) * np.exp(0.7 * quality))
    post_sampler = _GroupedSampler(post_topic, np.ones(N), K)
    return World(
        topic_vecs,
        member_vecs,
        member_topics,
        member_activity,
        member_bias,
        followers,
        hashtag_vecs,
        post_actor,
        post_root,
        post_topic,
        tags,
        quality,
        prior_likes,
        actor_sampler,
        hashtag_sampler,
        post_sampler,
        _GroupedSampler(np.zeros(M, np.int64), member_activity, 1),
    )


def affinities(world: World, member, actor, root_actor, hashtags) -> np.ndarray:
    """The latent interaction features [..., 3]: member.actor, member.root, mean member.tag.

    ``hashtags`` is [..., T] padded with -1. These (scaled by 3) drive relevance; a ranker
    recovers them from member/actor/hashtag embeddings.
    """
    u = world.member_vecs[member]
    aff_actor = np.einsum("...d,...d->...", u, world.member_vecs[actor])
    aff_root = np.einsum("...d,...d->...", u, world.member_vecs[root_actor])
    valid = hashtags >= 0
    tag_dots = np.einsum("...d,...td->...t", u, world.hashtag_vecs[np.maximum(hashtags, 0)])
    aff_tag = (tag_dots * valid).sum(-1) / np.maximum(valid.sum(-1), 1)
    return 3.0 * np.stack([aff_actor, aff_root, aff_tag], axis=-1)


def relevance_logits(world: World, member, post, aff, log_age) -> np.ndarray:
    """The truth: position-free engagement logits [..., T] of members seeing posts, from the
    affinities [..., 3] (see ``affinities``) and the impression's log post age [...]."""
    x = np.stack(
        [
            np.ones_like(log_age),
            aff[..., 0],
            aff[..., 1],
            aff[..., 2],
            world.post_quality[post],
            np.log1p(world.followers[world.post_root_actor[post]]),
            log_age,
        ],
        axis=-1,
    )
    return x @ _TASK_WEIGHTS.T + world.member_bias[member][..., None]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def draw_history(
    rng, world: "World", members: np.ndarray, length: np.ndarray, kind: str, max_len: int
) -> np.ndarray:
    """[S, max_len] ids (-1 padded) the members engaged with; ``kind``: "actors" | "hashtags".

    A pool of 3 * max_len items per member comes from the member's topics (60% primary, 25%
    secondary, 15% anywhere, popularity-weighted); the member engaged with the ``length``
    pool items of highest 3 * affinity + Gumbel noise, so a history carries the member's own
    taste, not only their topics.
    """
    if kind not in ("actors", "hashtags"):
        raise ValueError(f"kind must be 'actors' or 'hashtags', got {kind!r}")
    sampler, vecs = (
        (world.actor_sampler, world.member_vecs)
        if kind == "actors"
        else (world.hashtag_sampler, world.hashtag_vecs)
    )
    S, pool = len(members), 3 * max_len
    topics = world.member_topics[members]
    pick = rng.random((S, pool))
    topic = np.where(pick < 0.6, topics[:, :1], topics[:, 1:2])
    ids = np.where(pick < 0.85, sampler.sample(rng, topic), sampler.sample(rng, None, (S, pool)))
    score = 3.0 * np.einsum("sd,spd->sp", world.member_vecs[members], vecs[ids]) + rng.gumbel(
        size=(S, pool)
    )
    engaged = np.take_along_axis(ids, np.argsort(-score, axis=1)[:, :max_len], axis=1)
    return np.where(np.arange(max_len) < length[:, None], engaged, -1)


def draw_histories(rng, world: "World", members: np.ndarray, max_len: int):
    """([S, max_len] actor ids, [S, max_len] hashtag ids), -1 padded: a member's recent
    history, Poisson(12 * activity) actors and Poisson(10 * activity) hashtags (capped at
    ``max_len``), each drawn by ``draw_history``. Logs and serving both use this one draw."""
    activity = world.member_activity[members]
    actors = draw_history(
        rng, world, members, np.minimum(rng.poisson(12 * activity), max_len), "actors", max_len
    )
    hashtags = draw_history(
        rng, world, members, np.minimum(rng.poisson(10 * activity), max_len), "hashtags", max_len
    )
    return actors, hashtags


def simulate_sessions(
    cfg: SimConfig,
    world: World,
    split: str,
    first_session: int,
    count: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``count`` sessions of ``split`` as impression arrays (n = count * session_length)."""
    S, C, P = count, cfg.num_candidates, cfg.session_length
    session_member = world.session_sampler.sample(rng, None, S)  # active members log in more
    if split == "train":
        is_random = rng.random(S) < cfg.random_share
    else:
        is_random = np.full(S, split == "holdout_random")
    topics = world.member_topics[session_member]
    pick = rng.random((S, C))
    cand_topic = np.where(pick < 0.55, topics[:, :1], topics[:, 1:2])
    cands = np.where(
        pick < 0.75,
        world.post_sampler.sample(rng, cand_topic),
        rng.integers(0, cfg.num_posts, (S, C)),
    )
    # Everything the truth and the old model need, per candidate.
    member = np.repeat(session_member[:, None], C, axis=1)
    actor, root = world.post_actor[cands], world.post_root_actor[cands]
    tags = world.post_hashtags[cands]
    aff = affinities(world, member, actor, root, tags)  # [S, C, 3]
    log_age = np.log1p(rng.lognormal(2.5, 1.0, (S, C)))
    log_root_followers = np.log1p(world.followers[root])
    logits = relevance_logits(world, member, cands, aff, log_age)  # [S, C, 4]
    if cfg.unlogged_signal:  # drawn only when on, so worlds without it keep their streams
        unlogged = rng.normal(0.0, cfg.unlogged_signal, (S, C))
        logits = logits + unlogged[..., None]
    relevance = np.clip(_sigmoid(logits), 1e-6, 1 - 1e-6)
    noisy_actor_aff = aff[..., 0] + rng.normal(0.0, cfg.affinity_noise, (S, C))
    noisy_tag_aff = aff[..., 2] + rng.normal(0.0, cfg.affinity_noise, (S, C))
    log_prior_likes = np.log1p(world.post_prior_likes[cands])
    # Old model: popular actors first, true member-author and member-hashtag affinities (it
    # learned them from years of logs), freshness, noise: ranked sessions over-show relevance.
    old_score = (
        1.0 * np.log1p(world.followers[actor])
        + 0.6 * aff[..., 0]
        + 0.6 * aff[..., 2]
        + 0.3 * log_prior_likes
        - 0.4 * log_age
        + rng.gumbel(0.0, 0.7, (S, C))
    )
    if cfg.unlogged_signal:  # the old ranker saw it at serving time; the logs do not carry it
        old_score = old_score + 1.5 * unlogged
    order_key = np.where(is_random[:, None], rng.random((S, C)), -old_score)
    shown = np.argsort(order_key, axis=1)[:, :P]  # [S, P]

    def take(a):
        return np.take_along_axis(a, shown.reshape(S, P, *([1] * (a.ndim - 2))), axis=1).reshape(
            S * P, *a.shape[2:]
        )

    position = np.tile(np.arange(P), S)
    examine = (1.0 + position) ** -cfg.position_bias_exponent
    rel = take(relevance)
    true_probs = examine[:, None] * rel
    examined = rng.random(S * P) < examine
    labels = (examined[:, None] & (rng.random((S * P, 4)) < rel)).astype(np.int64)
    hist_actors, hist_tags = draw_histories(rng, world, session_member, cfg.max_history)
    member_imp = np.repeat(session_member, P)
    actor_imp, root_imp = take(actor), take(root)
    dense = np.stack(
        [
            np.log1p(world.followers[actor_imp]),
            take(log_root_followers),
            take(log_age),
            np.log1p(5.0 * world.member_activity[member_imp]),
            take(noisy_actor_aff),
            take(noisy_tag_aff),
            take(log_prior_likes),
            (actor_imp != root_imp).astype(np.float64),
        ],
        axis=1,
    )
    post_tags = take(tags)
    return {
        "session_id": np.repeat(first_session + np.arange(S), P).astype(np.int64),
        "position": position.astype(np.int64),
        "random_session": np.repeat(is_random, P),
        "member_id": member_imp.astype(np.int64),
        "actor_id": actor_imp.astype(np.int64),
        "root_actor_id": root_imp.astype(np.int64),
        "post_id": take(cands).astype(np.int64),
        "post_hashtags": post_tags.astype(np.int64),
        "history_actors": np.repeat(hist_actors, P, axis=0).astype(np.int64),
        "history_hashtags": np.repeat(hist_tags, P, axis=0).astype(np.int64),
        "dense": dense.astype(np.float32),
        "labels": labels,
        "true_probs": true_probs.astype(np.float32),
        "relevance_probs": rel.astype(np.float32),
    }


def _first_session(cfg: SimConfig, split: str) -> int:
    return sum(cfg.sessions(s) for s in SPLITS[: SPLITS.index(split)])


def simulate_chunks(
    cfg: SimConfig, split: str, world: World | None = None, show_progress: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the impressions of ``split`` chunk by chunk (see simulate_sessions).

    List fields are [n, max_len] padded with -1 (ids first); session ids are unique
    across splits (train first, then holdout_ranked, holdout_random).
    """
    world = make_world(cfg) if world is None else world
    total, start = cfg.sessions(split), _first_session(cfg, split)
    chunks = range(0, total, cfg.chunk_sessions)
    if show_progress:
        from lf_jax.console import progress

        chunks = progress(chunks, desc=f"feed_logs/{cfg.name} {split}", unit="chunk")
    for index, offset in enumerate(chunks):
        seed = np.random.SeedSequence(cfg.seed, spawn_key=(SPLITS.index(split), index))
        rng = np.random.default_rng(seed)
        yield simulate_sessions(
            cfg, world, split, start + offset, min(cfg.chunk_sessions, total - offset), rng
        )


def chunk_examples(cfg: SimConfig, chunk: dict[str, np.ndarray]) -> Iterator[tuple[int, dict]]:
    """(key, example) pairs of one chunk, list fields cut to their lengths (what tfds stores)."""
    n = len(chunk["session_id"])
    lengths = {name: (chunk[name] >= 0).sum(axis=1) for name in LIST_FIELDS}
    keys = chunk["session_id"] * cfg.session_length + chunk["position"]
    for i in range(n):
        example = {name: value[i] for name, value in chunk.items() if name not in LIST_FIELDS}
        for name in LIST_FIELDS:
            example[name] = chunk[name][i, : lengths[name][i]]
        yield int(keys[i]), example


def iter_examples(
    cfg: SimConfig, split: str, world: World | None = None, show_progress: bool = False
) -> Iterator[tuple[int, dict]]:
    """(key, example) pairs of ``split`` (see chunk_examples)."""
    for chunk in simulate_chunks(cfg, split, world, show_progress):
        yield from chunk_examples(cfg, chunk)


class SplitStatistics:
    """Running sums over a split's chunks: dense mean/std and per-position impressions and
    labels of random and ranked sessions (what IPS weights need), JSON-ready via ``result``."""

    def __init__(self, cfg: SimConfig):
        P, T, K = cfg.session_length, len(TASKS), len(DENSE_FEATURES)
        self.n, self.dense_sum, self.dense_sq = 0, np.zeros(K), np.zeros(K)
        self.count = {kind: np.zeros(P) for kind in ("random", "ranked")}
        self.clicks = {kind: np.zeros((P, T)) for kind in ("random", "ranked")}

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        dense = chunk["dense"].astype(np.float64)
        self.n += len(dense)
        self.dense_sum += dense.sum(0)
        self.dense_sq += (dense**2).sum(0)
        P = len(self.count["random"])
        for kind, mask in (
            ("random", chunk["random_session"]),
            ("ranked", ~chunk["random_session"]),
        ):
            self.count[kind] += np.bincount(chunk["position"][mask], minlength=P)
            for t in range(len(TASKS)):
                self.clicks[kind][:, t] += np.bincount(
                    chunk["position"][mask], weights=chunk["labels"][mask, t], minlength=P
                )

    def result(self) -> dict:
        mean = self.dense_sum / max(self.n, 1)
        std = np.sqrt(np.maximum(self.dense_sq / max(self.n, 1) - mean**2, 0.0))
        return {
            "num_examples": self.n,
            "dense_mean": mean.tolist(),
            "dense_std": std.tolist(),
            **{f"count_{kind}_p": self.count[kind].tolist() for kind in self.count},
            **{f"clicks_{kind}_pt": self.clicks[kind].tolist() for kind in self.clicks},
        }
