"""Members and items (posts) of the feed_logs world rendered as text, with planted affinities.

Built from ``lf_jax.feed_world.make_world`` (same ids: member ``m`` and post ``p``
here are member ``m`` and post ``p`` there, string ids "m<id>", "p<id>"), with words from
``data/post_texts/simulator.topic_vocabularies`` (the post encoder's topic vocabularies):

  member: interests (3 words of its primary topic, 2 of its secondary), hashtags (its 3
          closest hashtags by the latent truth), numeric [followers, activity, account_age_days]
  item:   text (a post of its topic), hashtags (its feed_logs hashtags), numeric
          [author_followers, prior_likes, age_hours, is_reshare]

Positive pairs: each member draws ``positives_per_member`` posts without replacement with
probability proportional to exp(beta * score), score = the simulator's member-actor,
member-root-actor and member-hashtag affinities + 0.3 * log1p(prior likes) (popularity), so
the pairs follow the same truth as the feed logs. The last ``test_per_member`` of each
member's draws are the held-out ``test`` pairs.

Example:
    >>> entities = make_entities(CONFIGS["tiny"])
    >>> entities["member_interests"][0], entities["train_pairs"].shape   # str, [M*20, 2]
"""

import dataclasses

import numpy as np

from lf_jax import feed_world
from lf_jax.data.post_texts import simulator as texts

SPLITS = ("train", "test", "members", "items")
MEMBER_NUMERIC = ("followers", "activity", "account_age_days")
ITEM_NUMERIC = ("author_followers", "prior_likes", "age_hours", "is_reshare")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemberItemsConfig:
    name: str
    feed_config: str  # the feed_logs world (simulator.CONFIGS key)
    words_per_topic: int = 24
    positives_per_member: int = 8
    test_per_member: int = 2
    beta: float = 1.5  # sharpness of the planted affinity
    seed: int = 0

    def metadata(self) -> dict:
        sim = feed_world.CONFIGS[self.feed_config]
        return {
            "config": self.name,
            "feed_config": self.feed_config,
            "num_members": sim.num_members,
            "num_items": sim.num_posts,
            "num_topics": sim.num_topics,
            "member_numeric": list(MEMBER_NUMERIC),
            "item_numeric": list(ITEM_NUMERIC),
            "positives_per_member": self.positives_per_member,
            "test_per_member": self.test_per_member,
            "seed": self.seed,
        }


CONFIGS = {
    "tiny": MemberItemsConfig(
        name="tiny", feed_config="tiny", positives_per_member=24, test_per_member=4
    ),
    "small": MemberItemsConfig(
        name="small", feed_config="small", positives_per_member=4, test_per_member=1
    ),
}


def affinity_scores(world, members: np.ndarray) -> np.ndarray:
    """[len(members), N] planted scores (see module docstring), without materialising
    member x post x hashtag arrays."""
    u_md = world.member_vecs[members]
    actor_mn = u_md @ world.member_vecs[world.post_actor].T
    root_mn = u_md @ world.member_vecs[world.post_root_actor].T
    tags_nt = world.post_hashtags
    valid_nt = tags_nt >= 0
    tag_mh = u_md @ world.hashtag_vecs.T
    tag_sum_mn = sum(
        np.where(valid_nt[:, t], tag_mh[:, np.maximum(tags_nt[:, t], 0)], 0.0)
        for t in range(tags_nt.shape[1])
    )
    tag_mn = tag_sum_mn / np.maximum(valid_nt.sum(1), 1)
    return 3.0 * (actor_mn + root_mn + tag_mn) + 0.3 * np.log1p(world.post_prior_likes)[None, :]


def make_entities(cfg: MemberItemsConfig) -> dict:
    """Entity texts, numeric features and train/test pairs (deterministic given cfg.seed)."""
    sim = feed_world.CONFIGS[cfg.feed_config]
    world = feed_world.make_world(sim)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(5,)))
    vocabs = texts.topic_vocabularies(sim.num_topics, cfg.words_per_topic, cfg.seed)
    hashtag_topic = np.argmax(world.hashtag_vecs @ world.topic_vecs.T, axis=1)
    hashtag_names = [
        texts.hashtag_name(vocabs[t][h % cfg.words_per_topic], str(h))
        for h, t in enumerate(hashtag_topic)
    ]
    M, N = sim.num_members, sim.num_posts
    closest_tags = np.argsort(-(world.member_vecs @ world.hashtag_vecs.T), axis=1)[:, :3]
    interests, member_tags = [], []
    for m in range(M):
        primary, secondary = world.member_topics[m]
        words = texts._pick(rng, vocabs[primary], 3) + texts._pick(rng, vocabs[secondary], 2)
        interests.append(" ".join(words))
        member_tags.append(" ".join(hashtag_names[h] for h in closest_tags[m]))
    member_numeric = np.stack(
        [world.followers, world.member_activity, rng.lognormal(6.0, 0.8, M)], axis=1
    ).astype(np.float32)
    item_text = [texts.render_post(rng, vocabs[world.post_topic[n]]) for n in range(N)]
    item_tags = [" ".join(hashtag_names[h] for h in row if h >= 0) for row in world.post_hashtags]
    item_numeric = np.stack(
        [
            world.followers[world.post_actor],
            world.post_prior_likes,
            rng.lognormal(2.5, 1.0, N),
            (world.post_actor != world.post_root_actor),
        ],
        axis=1,
    ).astype(np.float32)
    k, test = cfg.positives_per_member, cfg.test_per_member
    train_pairs, test_pairs = [], []
    for start in range(0, M, 256):
        members = np.arange(start, min(start + 256, M))
        keys_mn = cfg.beta * affinity_scores(world, members) + rng.gumbel(size=(len(members), N))
        drawn_mk = np.argsort(-keys_mn, axis=1)[:, :k]  # Gumbel top-k: sampling w/o replacement
        drawn_mk = rng.permuted(drawn_mk, axis=1)
        for row, m in enumerate(members):
            train_pairs += [(m, n) for n in drawn_mk[row, : k - test]]
            test_pairs += [(m, n) for n in drawn_mk[row, k - test :]]
    return {
        "member_interests": interests,
        "member_hashtags": member_tags,
        "member_numeric": member_numeric,
        "item_text": item_text,
        "item_hashtags": item_tags,
        "item_numeric": item_numeric,
        "train_pairs": np.asarray(train_pairs, np.int64),
        "test_pairs": np.asarray(test_pairs, np.int64),
    }


def _record(e: dict, member: int, item: int) -> dict:
    member_numeric = (
        e["member_numeric"][member] if member >= 0 else np.zeros(len(MEMBER_NUMERIC), np.float32)
    )
    item_numeric = e["item_numeric"][item] if item >= 0 else np.zeros(len(ITEM_NUMERIC), np.float32)
    return {
        "member_id": member,
        "item_id": item,
        "member_key": f"m{member}" if member >= 0 else "",
        "item_key": f"p{item}" if item >= 0 else "",
        "member_interests": e["member_interests"][member] if member >= 0 else "",
        "member_hashtags": e["member_hashtags"][member] if member >= 0 else "",
        "member_numeric": member_numeric,
        "item_text": e["item_text"][item] if item >= 0 else "",
        "item_hashtags": e["item_hashtags"][item] if item >= 0 else "",
        "item_numeric": item_numeric,
    }


def iter_examples(cfg: MemberItemsConfig, split: str, entities: dict | None = None):
    """(key, record): pairs (train, test) carry both sides; ``members`` / ``items`` carry
    one entity each (the other side's id is -1 and its fields empty)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    e = make_entities(cfg) if entities is None else entities
    if split in ("train", "test"):
        for key, (m, n) in enumerate(e[f"{split}_pairs"]):
            yield key, _record(e, int(m), int(n))
    elif split == "members":
        for m in range(len(e["member_interests"])):
            yield m, _record(e, m, -1)
    else:
        for n in range(len(e["item_text"])):
            yield n, _record(e, -1, n)
