"""The feed-log simulator: determinism, shapes, and the biases it is meant to carry."""

import dataclasses

import numpy as np
import pytest

from lf_jax import feed_world
from lf_jax.data.feed_logs import simulator as sim
from lf_jax.data.feed_logs.arrivals import Arrivals


def _concat(chunks):
    chunks = list(chunks)
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


@pytest.fixture(scope="module")
def sample():
    """80k train impressions, half of the sessions random, in a 2k-member world."""
    cfg = dataclasses.replace(
        feed_world.CONFIGS["tiny"],
        num_members=2_000,
        num_hashtags=300,
        num_posts=4_000,
        train_sessions=4000,
        random_share=0.5,
        chunk_sessions=2000,
    )
    world = feed_world.make_world(cfg)
    return cfg, world, _concat(sim.simulate_chunks(cfg, "train", world))


def _auc(labels, scores):
    ranks = np.argsort(np.argsort(scores, kind="stable")) + 1.0
    pos = labels == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_deterministic_given_seed():
    cfg = feed_world.CONFIGS["tiny"]
    a = _concat(sim.simulate_chunks(cfg, "holdout_ranked"))
    b = _concat(sim.simulate_chunks(cfg, "holdout_ranked"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    c = _concat(sim.simulate_chunks(dataclasses.replace(cfg, seed=1), "holdout_ranked"))
    assert not np.array_equal(a["member_id"], c["member_id"])


def test_fields_shapes_and_ranges(sample):
    cfg, world, d = sample
    n = cfg.num_impressions("train")
    meta = cfg.metadata()
    assert d["labels"].shape == (n, 4) and d["dense"].shape == (n, 8)
    assert d["true_probs"].shape == d["relevance_probs"].shape == (n, 4)
    for name in ("member_id", "actor_id", "root_actor_id"):
        assert 0 <= d[name].min() and d[name].max() < meta["num_members"]
    tags = d["post_hashtags"]
    assert tags.shape == (n, 5) and tags.max() < meta["num_hashtags"]
    lengths = (tags >= 0).sum(1)
    assert lengths.min() >= 1 and lengths.max() <= 5
    assert ((tags >= 0) == (np.arange(5) < lengths[:, None])).all()
    valid_tags = np.where(tags >= 0, tags, -np.arange(1, 6))  # distinct pads
    assert all(len(set(row)) == 5 for row in valid_tags[:2000])  # no repeated hashtag
    for name, vocab in (
        ("history_actors", meta["num_members"]),
        ("history_hashtags", meta["num_hashtags"]),
    ):
        hist = d[name]
        assert hist.shape == (n, 50) and hist.max() < vocab
        length = (hist >= 0).sum(1)
        assert ((hist >= 0) == (np.arange(50) < length[:, None])).all()
        assert length.min() == 0 and length.max() == 50
    assert set(np.unique(d["position"])) == set(range(cfg.session_length))
    reshare = d["actor_id"] != d["root_actor_id"]
    np.testing.assert_array_equal(d["dense"][:, 7], reshare.astype(np.float32))
    assert 0.1 < reshare.mean() < 0.3
    sessions = d["session_id"].reshape(-1, cfg.session_length)
    assert (sessions == sessions[:, :1]).all()
    assert (d["random_session"].reshape(sessions.shape) == d["random_session"][::20, None]).all()


def test_true_probs_are_position_biased_relevance(sample):
    cfg, _, d = sample
    assert (d["true_probs"] > 0).all() and (d["true_probs"] < 1).all()
    assert (d["relevance_probs"] > 0).all() and (d["relevance_probs"] < 1).all()
    examine = (1.0 + d["position"]) ** -cfg.position_bias_exponent
    np.testing.assert_allclose(d["true_probs"], examine[:, None] * d["relevance_probs"], rtol=1e-5)
    rates = d["labels"].mean(0)
    assert (
        0.01 < rates[0] < 0.08 and rates[3] > rates[0] > rates[1] > 0
    )  # like < dwell, comment rarer


def test_position_bias_visible_in_random_sessions(sample):
    cfg, _, d = sample
    log_pos = np.log1p(np.arange(cfg.session_length))

    def slope(mask):
        ctr = np.array(
            [
                d["labels"][mask & (d["position"] == p)][:, [0, 3]].mean()
                for p in range(cfg.session_length)
            ]
        )
        return np.polyfit(log_pos, np.log(ctr), 1)[0]

    random_slope, ranked_slope = slope(d["random_session"]), slope(~d["random_session"])
    # Random order: CTR ~ (1 + pos)^-0.8 exactly in expectation; ranked adds the ranking.
    assert abs(random_slope + cfg.position_bias_exponent) < 0.12, random_slope
    assert ranked_slope < random_slope


def test_ranked_sessions_are_exposure_biased(sample):
    _, _, d = sample
    rnd = d["random_session"]
    log_followers = d["dense"][:, 0]
    assert log_followers[~rnd].mean() > log_followers[rnd].mean() + 0.5  # popular actors
    assert d["relevance_probs"][~rnd, 0].mean() > d["relevance_probs"][rnd, 0].mean()
    # The old model's order: followers fall with position in ranked sessions only.
    first, last = d["position"] < 5, d["position"] >= 15
    assert log_followers[~rnd & first].mean() > log_followers[~rnd & last].mean() + 0.5
    assert abs(log_followers[rnd & first].mean() - log_followers[rnd & last].mean()) < 0.2


def test_relevance_is_learnable_from_features(sample):
    """Logistic regression on latent interactions + dense features approaches the oracle AUC."""
    _, world, d = sample
    aff = feed_world.affinities(
        world, d["member_id"], d["actor_id"], d["root_actor_id"], d["post_hashtags"]
    )
    x = np.concatenate([aff, d["dense"], np.log1p(d["position"])[:, None]], axis=1)
    x = np.concatenate([(x - x.mean(0)) / x.std(0), np.ones((len(x), 1))], axis=1)
    half = len(x) // 2
    y = d["labels"][:, 0].astype(np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(8):  # Newton steps
        p = 1.0 / (1.0 + np.exp(-x[:half] @ w))
        hessian = (x[:half] * (p * (1 - p))[:, None]).T @ x[:half] + 1e-3 * np.eye(x.shape[1])
        w -= np.linalg.solve(hessian, x[:half].T @ (p - y[:half]))
    learned = _auc(y[half:], x[half:] @ w)
    oracle = _auc(y[half:], d["true_probs"][half:, 0])
    assert learned > 0.75 and learned > oracle - 0.05, (learned, oracle)


def test_metadata_and_split_sizes():
    for cfg in feed_world.CONFIGS.values():
        meta = cfg.metadata()
        assert meta["max_lengths"] == {
            "post_hashtags": 5,
            "history_actors": 50,
            "history_hashtags": 50,
        }
        assert meta["tasks"] == ["like", "comment", "share", "long_dwell"]
        assert len(meta["dense_features"]) == meta["dense_dim"] == 8
    tiny, large = feed_world.CONFIGS["tiny"], feed_world.CONFIGS["large"]
    assert 100_000 < sum(tiny.num_impressions(s) for s in feed_world.SPLITS) < 600_000
    assert large.num_members >= 1_000_000
    assert sum(large.num_impressions(s) for s in feed_world.SPLITS) >= 10_000_000
    with pytest.raises(ValueError, match="split"):
        tiny.sessions("test")


def test_session_ids_are_disjoint_across_splits():
    cfg = feed_world.CONFIGS["tiny"]
    world = feed_world.make_world(cfg)
    ids = {
        split: np.unique(_concat(sim.simulate_chunks(cfg, split, world))["session_id"])
        for split in ("holdout_ranked", "holdout_random")
    }
    assert not set(ids["holdout_ranked"]) & set(ids["holdout_random"])
    assert ids["holdout_ranked"].min() == cfg.train_sessions


def test_history_follows_the_members_own_affinities(sample):
    """Histories are what a member engaged with: their items score a clearly higher affinity
    with the member than items drawn from the member's topics alone (the pool they come from)."""
    _, world, d = sample
    first = np.unique(d["session_id"], return_index=True)[1]
    members = d["member_id"][first]
    rng = np.random.default_rng(0)
    for field, sampler, vecs in (
        ("history_actors", world.actor_sampler, world.member_vecs),
        ("history_hashtags", world.hashtag_sampler, world.hashtag_vecs),
    ):
        ids = d[field][first]
        valid = ids >= 0
        engaged = np.einsum("sd,sld->sl", world.member_vecs[members], vecs[np.maximum(ids, 0)])[
            valid
        ]
        topics, pick = world.member_topics[members], rng.random(ids.shape)  # the pool's mixture
        topic = np.where(pick < 0.6, topics[:, :1], topics[:, 1:2])
        pool = np.where(
            pick < 0.85, sampler.sample(rng, topic), sampler.sample(rng, None, ids.shape)
        )
        drawn = np.einsum("sd,sld->sl", world.member_vecs[members], vecs[pool])
        assert engaged.mean() > drawn.mean() + 0.06, (field, engaged.mean(), drawn.mean())


def test_draw_history_rejects_an_unknown_kind(sample):
    cfg, world, _ = sample
    with pytest.raises(ValueError, match="kind must be"):
        feed_world.draw_history(
            np.random.default_rng(0), world, np.array([0]), np.array([3]), "posts", 5
        )


def test_unlogged_signal_is_selection_on_an_unobservable():
    """tiny_unlogged: relevance has a term the logs do not carry (the stored relevance minus
    the truth recomputed from logged fields), and the old ranker put high values of it on
    top; random sessions show no such trend, and tiny (signal off) has no such term."""

    def residual(name):
        cfg = dataclasses.replace(feed_world.CONFIGS[name], train_sessions=2000, random_share=0.5)
        world = feed_world.make_world(cfg)
        d = _concat(sim.simulate_chunks(cfg, "train", world))
        aff = feed_world.affinities(
            world, d["member_id"], d["actor_id"], d["root_actor_id"], d["post_hashtags"]
        )
        logged = feed_world.relevance_logits(
            world, d["member_id"], d["post_id"], aff, d["dense"][:, 2]
        )[:, 0]
        rel = d["relevance_probs"][:, 0].astype(np.float64)
        kept = rel > 1e-5  # not clipped at 1e-6
        return (
            (np.log(rel / (1 - rel)) - logged)[kept],
            d["position"][kept],
            d["random_session"][kept],
        )

    off, _, _ = residual("tiny")
    assert np.abs(off).max() < 1e-3
    term, position, random = residual("tiny_unlogged")
    assert 0.8 < term.std() < 1.2
    top, bottom = position < 5, position >= 15
    assert term[~random & top].mean() > term[~random & bottom].mean() + 0.5
    assert abs(term[random & top].mean() - term[random & bottom].mean()) < 0.15


def test_arrivals_ids_appear_after_they_exist_in_time_order():
    """tiny_arrivals (shrunk): train sessions are in time order; every impression's member,
    actor, root actor and history actors joined and its post was created by the session's
    time (the logged age is its true age); late posts first appear late; holdout_ranked is
    the next period and shows posts train never did; a config without arrivals has no
    arrival metadata."""
    cfg = dataclasses.replace(
        feed_world.CONFIGS["tiny_arrivals"],
        train_sessions=4000,
        holdout_ranked_sessions=400,
        chunk_sessions=1000,
    )
    world = feed_world.make_world(cfg)
    arrivals = Arrivals(cfg, world)
    d = _concat(sim.simulate_chunks(cfg, "train", world))
    hours = d["session_id"] * cfg.period_hours / cfg.train_sessions
    assert (np.diff(d["session_id"]) >= 0).all()
    joined = arrivals.member_joined
    for name in ("member_id", "actor_id", "root_actor_id"):
        assert (joined[d[name]] <= hours).all(), name
    hist = d["history_actors"]
    assert (np.where(hist >= 0, joined[np.maximum(hist, 0)], -1.0) <= hours[:, None]).all()
    assert ((hist >= 0) == (np.arange(50) < (hist >= 0).sum(1)[:, None])).all()  # ids first
    age = hours - arrivals.post_created[d["post_id"]]
    np.testing.assert_allclose(d["dense"][:, 2], np.log1p(age), rtol=1e-5, atol=1e-5)
    assert age.min() >= 0
    posts, first = np.unique(d["post_id"], return_index=True)
    late = arrivals.post_created[posts] > cfg.period_hours / 2
    assert late.mean() > 0.2 and (first[late] > len(hours) // 2).all()
    assert 0.2 < (joined > 0).mean() < 0.5  # a share of members joins during the logs
    ranked = _concat(sim.simulate_chunks(cfg, "holdout_ranked", world))
    assert np.isin(ranked["post_id"], posts, invert=True).mean() > 0.2
    assert cfg.metadata()["arrivals"]["new_post_share"] == 0.7
    assert "arrivals" not in feed_world.CONFIGS["tiny"].metadata()
    with pytest.raises(ValueError, match="no arrivals"):
        Arrivals(feed_world.CONFIGS["tiny"], world)
