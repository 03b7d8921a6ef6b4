"""The synthetic feed world with a known truth: members, hashtags, posts, their latent
vectors, and how a member engages with a post. Shared by the feed_logs dataset builder
(data/feed_logs/, which draws logged sessions from it) and serving (lf_jax/export/two_stage.py,
which reads catalog features and true relevance from it), so the installed package never
imports data/ by path.

The truth:
  * members, hashtags and topics have latent vectors (dim 16); actors and root actors
    are members (one id space), and a member's vector is also its vector as an author;
  * relevance (position-free) per task = sigmoid(task bias + member bias + weighted
    member.actor, member.root_actor and mean member.hashtag affinities + post quality +
    popularity - age), i.e. learnable from the ids and the dense features;
  * a member's history is what they engaged with (actors and hashtags picked from their
    topics by affinity, see ``draw_history``).

Pure numpy, deterministic given ``SimConfig.seed``.

Example:
    >>> cfg = CONFIGS["tiny"]
    >>> world = make_world(cfg)
    >>> relevance_logits(world, member, post, affinities(world, member, actor, root, tags), age)
"""

import dataclasses

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
    # Arrivals (lf_jax/data/feed_logs/arrivals.py; both 0: sessions have no time): shares of
    # posts and members that appear during the logs, the train period's length, the mean age
    # of a topical candidate at retrieval.
    new_post_share: float = 0.0
    new_member_share: float = 0.0
    period_hours: float = 720.0
    retrieval_age_hours: float = 24.0

    @property
    def timed(self) -> bool:
        """Whether posts and members arrive over time (records stored in time order)."""
        return self.new_post_share > 0 or self.new_member_share > 0

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
        } | (
            {
                "arrivals": {
                    "new_post_share": self.new_post_share,
                    "new_member_share": self.new_member_share,
                    "period_hours": self.period_hours,
                    "retrieval_age_hours": self.retrieval_age_hours,
                }
            }
            if self.timed
            else {}
        )


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
    # tiny whose posts (69%) and members (33%: 60% drawn, less the authors of older posts)
    # arrive over 30 days of train sessions, stored in time order; holdout_ranked is the
    # next 3 days (data/feed_logs/arrivals.py).
    "tiny_arrivals": dataclasses.replace(
        _TINY,
        name="tiny_arrivals",
        new_post_share=0.7,
        new_member_share=0.6,
        holdout_ranked_sessions=2_000,
    ),
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
