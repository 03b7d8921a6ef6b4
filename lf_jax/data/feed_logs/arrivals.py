"""Posts and members that arrive over time (feed_logs configs with ``SimConfig.timed``).

Without arrivals (every other config) a session has no time: its member and candidates are
drawn from the whole world and a post's age is drawn per impression. With arrivals:

  * a clock in hours: train session ``i`` happens at ``i * hours_per_session`` (the train
    split spans ``period_hours``, in session order); holdout_ranked sessions come after it
    (the next period: a time-based holdout); holdout_random sessions happen at uniform
    random times of the train period (a random holdout of the same period);
  * a ``new_post_share`` of posts is created at uniform times over the whole clock (train
    and holdout_ranked periods), the others before it starts (ages ~ Exp(period / 4));
    a ``new_member_share`` of members joins at uniform times; a member who authored or
    reshared a post has joined by the post's creation; the first ``num_topics`` posts and
    members exist from the start (every topic has both);
  * a session at time t draws its member among the members joined by t (by activity), its
    topical candidates (75%) as the topic's latest post created by t - Exp(age), the others
    as the latest post of any topic created by t - Exp(4 age) (old posts fade away); the
    logged post age is t - creation; history actors who join after t are dropped.

Creation and join times come from their own random stream; a config without arrivals
takes none of these paths, so its records are unchanged.

Example:
    >>> from lf_jax import feed_world
    >>> cfg = feed_world.CONFIGS["tiny_arrivals"]
    >>> arrivals = Arrivals(cfg, feed_world.make_world(cfg))
    >>> arrivals.post_created[:3]                       # hours; < 0: before the logs start
"""

import numpy as np

from lf_jax.feed_world import SimConfig, World


class Arrivals:
    """Creation times of posts, join times of members and the samplers over them."""

    def __init__(self, cfg: SimConfig, world: World):
        if not cfg.timed:
            raise ValueError(
                f"config {cfg.name!r} has no arrivals (new_post_share 0, new_member_share 0)"
            )
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(98,)))
        K, M, N = cfg.num_topics, cfg.num_members, cfg.num_posts
        self.cfg = cfg
        self.hours_per_session = cfg.period_hours / cfg.train_sessions
        self.end_hours = cfg.period_hours + cfg.holdout_ranked_sessions * self.hours_per_session
        new_post = rng.random(N) < cfg.new_post_share
        new_post[:K] = False
        created = np.where(
            new_post,
            rng.uniform(0.0, self.end_hours, N),
            -rng.exponential(cfg.period_hours / 4, N) - 1e-3,
        )
        new_member = rng.random(M) < cfg.new_member_share
        new_member[:K] = False
        joined = np.where(new_member, rng.uniform(0.0, self.end_hours, M), -1.0)
        np.minimum.at(joined, world.post_actor, created)  # authors join by their first post
        np.minimum.at(joined, world.post_root_actor, created)
        self.post_created, self.member_joined = created, joined
        # Posts by (topic, creation): the topic's latest post created by a time.
        self._by_topic = np.lexsort((created, world.post_topic))
        self._span = self.end_hours - created.min() + 1.0
        self._topic_keys = world.post_topic[self._by_topic] * self._span + (
            created[self._by_topic] - created.min()
        )
        self._topic_start = np.searchsorted(world.post_topic[self._by_topic], np.arange(K + 1))
        self._by_creation = np.argsort(created, kind="stable")
        self._created_sorted = created[self._by_creation]
        # Members by join time, with cumulative activity: a member among those joined by t.
        self._by_join = np.argsort(joined, kind="stable")
        self._joined_sorted = joined[self._by_join]
        self._activity_cum = np.concatenate(
            [[0.0], np.cumsum(world.member_activity[self._by_join], dtype=np.float64)]
        )

    def session_times(self, split: str, first_session: int, count: int, rng) -> np.ndarray:
        """Hours [count] of the sessions ``first_session ..`` of ``split`` (global session ids)."""
        cfg, hps = self.cfg, self.hours_per_session
        index = first_session + np.arange(count)
        if split == "train":
            return index * hps
        if split == "holdout_ranked":
            return cfg.period_hours + (index - cfg.train_sessions) * hps
        return rng.uniform(0.0, cfg.period_hours, count)

    def members(self, times: np.ndarray, rng) -> np.ndarray:
        """Session members [S]: by activity among the members joined by each time."""
        joined = np.searchsorted(self._joined_sorted, times, side="right")
        u = rng.random(len(times)) * self._activity_cum[joined]
        index = np.searchsorted(self._activity_cum, u, side="right") - 1
        return self._by_join[np.clip(index, 0, joined - 1)]

    def candidates(self, topic: np.ndarray, topical: np.ndarray, times: np.ndarray, rng):
        """Candidate posts [S, C]: where ``topical``, the topic's latest post created by
        t - Exp(retrieval_age_hours); elsewhere the latest post of any topic created by
        t - Exp(4 * retrieval_age_hours). Old posts fade out of the candidates."""
        t = times[:, None]
        target = t - rng.exponential(self.cfg.retrieval_age_hours, topic.shape)
        lowest = self.post_created.min()
        keys = topic * self._span + np.maximum(target - lowest, -0.5)
        index = np.searchsorted(self._topic_keys, keys, side="right") - 1
        index = np.maximum(index, self._topic_start[topic])  # none by then: the topic's first
        latest = self._by_topic[index]
        target = t - rng.exponential(4 * self.cfg.retrieval_age_hours, topic.shape)
        index = np.searchsorted(self._created_sorted, target, side="right") - 1
        anywhere = self._by_creation[np.maximum(index, 0)]  # the first post: before the logs
        return np.where(topical, latest, anywhere)

    def log_age(self, posts: np.ndarray, times: np.ndarray) -> np.ndarray:
        """log1p(post age in hours) [S, C] of candidate posts at their sessions' times."""
        return np.log1p(np.maximum(times[:, None] - self.post_created[posts], 0.0))

    def drop_unjoined(self, actors: np.ndarray, times: np.ndarray) -> np.ndarray:
        """History actors [S, L] (-1 padded) without those who join after the session's
        time, remaining ids first."""
        late = (actors >= 0) & (self.member_joined[np.maximum(actors, 0)] > times[:, None])
        kept = np.where(late, -1, actors)
        return np.take_along_axis(kept, np.argsort(kept < 0, axis=1, kind="stable"), axis=1)
