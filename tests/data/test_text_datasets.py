"""post_texts and member_items: deterministic, structured, held-out, tied to feed_logs ids."""

import numpy as np
import pytest

from lf_jax import feed_world
from lf_jax.data.member_items import simulator as member_items
from lf_jax.data.post_texts import simulator as texts
from lf_jax.input import build_dataset


def test_post_texts_deterministic_and_topical():
    cfg = texts.TextConfig(name="t", train_pairs_per_task=50, test_triplets_per_task=20)
    first = list(texts.iter_examples(cfg, "test"))
    assert first == list(texts.iter_examples(cfg, "test"))
    vocabs = texts.topic_vocabularies(cfg.num_topics, cfg.words_per_topic, cfg.seed)
    assert len({w for v in vocabs for w in v}) == cfg.num_topics * cfg.words_per_topic  # disjoint
    tasks = {row["task"] for _, row in first}
    assert tasks == set(texts.TASKS) | set(texts.ZERO_SHOT_TASKS)
    for _, row in first:
        words = set(row["post"].replace("#", " ").replace("_", " ").split())
        assert words & set(vocabs[row["topic"]])
        assert not set(row["negative_post"].replace("#", " ").replace("_", " ").split()) & set(
            vocabs[row["topic"]]
        )
    train = [row for _, row in texts.iter_examples(cfg, "train")]
    assert {row["task"] for row in train} == set(texts.TASKS)  # intent never trained on
    assert 0.3 < np.mean([row["label"] for row in train]) < 0.7


def test_member_items_ids_follow_feed_logs_world():
    cfg = member_items.CONFIGS["tiny"]
    e1, e2 = member_items.make_entities(cfg), member_items.make_entities(cfg)
    np.testing.assert_array_equal(e1["train_pairs"], e2["train_pairs"])
    assert e1["item_text"] == e2["item_text"]
    world = feed_world.make_world(feed_world.CONFIGS["tiny"])
    assert len(e1["member_interests"]) == len(world.member_vecs)
    assert len(e1["item_text"]) == len(world.post_topic)
    np.testing.assert_array_equal(e1["item_numeric"][:, 0], world.followers[world.post_actor])
    # held out: no (member, item) pair in both splits; every member has test pairs
    train = set(map(tuple, e1["train_pairs"]))
    assert not train & set(map(tuple, e1["test_pairs"]))
    assert len(np.unique(e1["test_pairs"][:, 0])) == len(world.member_vecs)
    # planted affinity: positives share the member's topics far above chance
    topics = world.member_topics[e1["train_pairs"][:, 0]]
    post_topic = world.post_topic[e1["train_pairs"][:, 1]]
    assert np.mean((topics == post_topic[:, None]).any(1)) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["post_texts", "member_items"])
def test_builders_build_offline(name, tmp_path):
    builder = build_dataset(name, "tiny", data_dir=tmp_path)
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    if name == "post_texts":
        assert sizes == {"train": 16_000, "test": 1_500}
    else:
        assert sizes == {"train": 6_000, "test": 1_200, "members": 300, "items": 1_000}
        row = builder.as_data_source("items")[0]
        assert row["item_key"].decode() == f"p{row['item_id']}" and row["member_id"] == -1
