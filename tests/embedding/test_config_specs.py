import copy

import ml_collections
import pytest

from lf_jax.configuration import load_config
from lf_jax.embedding.config_specs import (
    EmbeddingConfigError,
    memory_budget_from_config,
    specs_from_config,
)
from lf_jax.embedding.sparse_optim import Adam, RowWiseAdagrad
from lf_jax.errors import UserInputError

BASE = {
    "tables": {
        "member": {
            "vocab_size": 1000,
            "dim": 16,
            "initializer": "normal",
            "optimizer": {"kind": "rowwise_adagrad", "learning_rate": 0.05},
        },
        "position": {
            "vocab_size": 10,
            "dim": 4,
            "optimizer": {"kind": "adam", "learning_rate": 0.01},
        },
    },
    "features": {
        "actor_id": {"table": "member", "max_ids": 1, "combiner": "sum", "weighted": False},
        "history_actors": {"table": "member", "max_ids": 50, "combiner": "mean"},
        "position": {"table": "position"},
    },
    "plan": {},
    "memory_budget_bytes": 1_000_000,
}


def section(**changes):
    """BASE with dotted-key changes; a value of None deletes the key."""
    config = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        node = config
        for part in path:
            node = node[part]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return config


def test_plain_dicts_become_specs():
    tables, features, hand = specs_from_config(section())
    assert [t.name for t in tables] == ["member", "position"]
    assert (
        isinstance(tables[0].optimizer, RowWiseAdagrad)
        and tables[0].optimizer.learning_rate == 0.05
    )
    assert isinstance(tables[1].optimizer, Adam)
    assert [(f.name, f.table, f.max_ids, f.combiner) for f in features] == [
        ("actor_id", "member", 1, "sum"),
        ("history_actors", "member", 50, "mean"),
        ("position", "position", 1, "sum"),
    ]
    assert hand == {}
    assert memory_budget_from_config(section()) == 1_000_000


def test_feed_ranker_config_shares_the_member_table(repo_root):
    config = load_config(f"{repo_root}/configs/feed_ranker.py:size=tiny")
    tables, features, hand = specs_from_config(config.embedding)
    by_feature = {f.name: f.table for f in features}
    assert by_feature["actor_id"] == by_feature["root_actor_id"] == "member"
    assert by_feature["history_actors"] == "member" and by_feature["history_hashtags"] == "hashtag"
    assert {t.name for t in tables} >= {"member", "hashtag", "position"}
    assert hand == {}


@pytest.mark.parametrize("size", ["tiny", "small", "large"])
def test_feed_ranker_sizes_match_the_dataset(repo_root, size):
    from lf_jax import feed_world

    config = load_config(f"{repo_root}/configs/feed_ranker.py:size={size}")
    tables, _, _ = specs_from_config(config.embedding)
    rows = {t.name: t.vocab_size for t in tables}
    world = feed_world.CONFIGS[config.data.config]
    # id tables hold one row per id plus a last OOV row (lf_jax/train/warm_start.py)
    assert rows["member"] == world.num_members + 1
    assert rows["hashtag"] == world.num_hashtags + 1
    assert rows["post"] == world.num_posts + 1
    assert rows["position"] == world.session_length


def test_hand_plan_from_a_config_dict():
    config = ml_collections.ConfigDict(
        section(
            plan={
                "member": {"strategy": "row_wise", "axes": ["data", "model"]},
                "position": "data_parallel",
            }
        )
    )
    _, _, hand = specs_from_config(config)
    assert hand == {
        "member": {"strategy": "row_wise", "axes": ("data", "model")},
        "position": {"strategy": "data_parallel"},
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tables": None}, "embedding.tables is missing"),
        ({"tables": {}}, "embedding.tables is empty"),
        ({"tables__member__vocab_size": None}, "embedding.tables.member.vocab_size is missing"),
        ({"tables__member__dim": 0}, "embedding.tables.member.dim must be a positive int, got 0"),
        (
            {"tables__member__vocab_size": 1e6},
            "embedding.tables.member.vocab_size must be a positive int, got 1000000.0",
        ),
        ({"tables__member__vocab": 5}, "embedding.tables.member.vocab is not a known key"),
        (
            {"tables__member__initializer": "ones"},
            "embedding.tables.member.initializer must be one of ('normal', 'uniform', 'zeros'), "
            "got 'ones'",
        ),
        (
            {"tables__member__optimizer": {"kind": "adamw", "learning_rate": 0.1}},
            "embedding.tables.member.optimizer: sparse optimizer 'adamw' is unknown",
        ),
        (
            {"tables__member__optimizer": {"kind": "sgd"}},
            "embedding.tables.member.optimizer.learning_rate is missing",
        ),
        (
            {"tables__member__optimizer": {"kind": "sgd", "learning_rate": -1.0}},
            "embedding.tables.member.optimizer: sparse optimizer: learning_rate must be > 0, got "
            "-1.0",
        ),
        (
            {"tables__member__optimizer": {"kind": "sgd", "learning_rate": 0.1, "beta": 2}},
            "embedding.tables.member.optimizer {",
        ),
        (
            {"features__actor_id__table": "members"},
            "embedding.features.actor_id.table 'members' is not a table (tables: ['member', "
            "'position'])",
        ),
        (
            {"features__actor_id__max_ids": 0},
            "embedding.features.actor_id.max_ids must be a positive int, got 0",
        ),
        (
            {"features__actor_id__combiner": "max"},
            "embedding.features.actor_id.combiner must be one of ('sum', 'mean', 'sqrtn', 'none'), "
            "got 'max'",
        ),
        ({"features__actor_id__table": None}, "embedding.features.actor_id.table is missing"),
        ({"features__actor_id": 3}, "embedding.features.actor_id must be a dict"),
        (
            {"plan": {"memberz": {"strategy": "row_wise"}}},
            "embedding.plan.memberz names no table (tables: ['member', 'position'])",
        ),
        (
            {"plan": {"member": {"strategy": "rows"}}},
            "embedding.plan.member.strategy must be one of ('data_parallel', 'table_wise', "
            "'row_wise', "
            "'column_wise', 'table_wise_row_wise'), got 'rows'",
        ),
    ],
)
def test_errors_name_the_key_and_value(changes, message):
    with pytest.raises(EmbeddingConfigError) as error:
        specs_from_config(section(**changes))
    assert message in str(error.value)
    assert isinstance(error.value, UserInputError)


@pytest.mark.parametrize("value", [None, 0, -5, "1GB", 1.5])
def test_memory_budget_errors(value):
    with pytest.raises(
        EmbeddingConfigError, match=r"embedding.memory_budget_bytes must be a positive int"
    ):
        memory_budget_from_config(
            section(memory_budget_bytes=value)
            if value is not None
            else section(memory_budget_bytes=None)
        )


def test_memory_budget_accepts_whole_floats():
    assert memory_budget_from_config(section(memory_budget_bytes=2e9)) == 2_000_000_000
