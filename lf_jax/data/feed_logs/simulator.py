"""Synthetic feed logs with a known truth: who saw which post where, and why they engaged.

Pure numpy, vectorised, deterministic given ``SimConfig.seed``. A *world* (members,
hashtags, posts and their latent vectors: lf_jax/feed_world.py, shared with serving) is
drawn once; sessions are then drawn in
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

from collections.abc import Iterator

import numpy as np

from lf_jax.data.feed_logs.arrivals import Arrivals
from lf_jax.feed_world import (
    DENSE_FEATURES,
    LIST_FIELDS,
    SPLITS,
    TASKS,
    SimConfig,
    World,
    affinities,
    draw_histories,
    make_world,
    relevance_logits,
)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def simulate_sessions(
    cfg: SimConfig,
    world: World,
    split: str,
    first_session: int,
    count: int,
    rng: np.random.Generator,
    arrivals: Arrivals | None = None,
) -> dict[str, np.ndarray]:
    """``count`` sessions of ``split`` as impression arrays (n = count * session_length);
    ``arrivals`` (configs with ``cfg.timed``): sessions at times, see arrivals.py."""
    S, C, P = count, cfg.num_candidates, cfg.session_length
    if arrivals is None:
        session_member = world.session_sampler.sample(rng, None, S)  # active members log in more
    else:
        times = arrivals.session_times(split, first_session, S, rng)
        session_member = arrivals.members(times, rng)
    if split == "train":
        is_random = rng.random(S) < cfg.random_share
    else:
        is_random = np.full(S, split == "holdout_random")
    topics = world.member_topics[session_member]
    pick = rng.random((S, C))
    cand_topic = np.where(pick < 0.55, topics[:, :1], topics[:, 1:2])
    if arrivals is None:
        cands = np.where(
            pick < 0.75,
            world.post_sampler.sample(rng, cand_topic),
            rng.integers(0, cfg.num_posts, (S, C)),
        )
    else:
        cands = arrivals.candidates(cand_topic, pick < 0.75, times, rng)
    # Everything the truth and the old model need, per candidate.
    member = np.repeat(session_member[:, None], C, axis=1)
    actor, root = world.post_actor[cands], world.post_root_actor[cands]
    tags = world.post_hashtags[cands]
    aff = affinities(world, member, actor, root, tags)  # [S, C, 3]
    if arrivals is None:
        log_age = np.log1p(rng.lognormal(2.5, 1.0, (S, C)))
    else:
        log_age = arrivals.log_age(cands, times)
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
    if arrivals is not None:
        hist_actors = arrivals.drop_unjoined(hist_actors, times)
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
    across splits (train first, then holdout_ranked, holdout_random). A config with
    arrivals (``cfg.timed``) gives its sessions times (arrivals.py).
    """
    world = make_world(cfg) if world is None else world
    arrivals = Arrivals(cfg, world) if cfg.timed else None
    total, start = cfg.sessions(split), _first_session(cfg, split)
    chunks = range(0, total, cfg.chunk_sessions)
    if show_progress:
        from lf_jax.console import progress

        chunks = progress(chunks, desc=f"feed_logs/{cfg.name} {split}", unit="chunk")
    for index, offset in enumerate(chunks):
        seed = np.random.SeedSequence(cfg.seed, spawn_key=(SPLITS.index(split), index))
        rng = np.random.default_rng(seed)
        count = min(cfg.chunk_sessions, total - offset)
        yield simulate_sessions(cfg, world, split, start + offset, count, rng, arrivals)


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
