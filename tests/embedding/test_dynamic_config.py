"""Dynamic tables from a config: the ``dynamic`` section, the feed ranker switch, the
planner's placement and reason, and the plan's expected occupancy (host only)."""

import pytest

from lf_jax.cli import main
from lf_jax.configuration import ConfigError, load_config
from lf_jax.embedding.config_specs import (
    EmbeddingConfigError,
    dynamic_expected_keys,
    specs_from_config,
)
from lf_jax.embedding.dynamic.layout import table_shards
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.report import explain_tables, format_rows, window_fill
from lf_jax.planner import plan_tables


def _embedding(dynamic):
    table = {"vocab_size": 64, "dim": 4, "dynamic": dynamic}
    return {
        "tables": {"post": table, "tag": {"vocab_size": 10, "dim": 4}},
        "features": {"post_id": {"table": "post"}, "tag": {"table": "tag"}},
        "memory_budget_bytes": 10**9,
    }


def test_dynamic_section_becomes_a_policy():
    section = {"eviction": "lfu", "probe_limit": 4, "admit_after": 2, "ttl_steps": 0}
    tables, _, _ = specs_from_config(_embedding({**section, "expected_keys": 500}))
    post = {t.name: t for t in tables}["post"]
    assert post.dynamic == DynamicPolicy(eviction="lfu", probe_limit=4, admit_after=2)
    assert post.dynamic.ttl_steps is None  # 0: keys stay until evicted
    assert {t.name: t for t in tables}["tag"].dynamic is None
    assert dynamic_expected_keys(_embedding({**section, "expected_keys": 500})) == {"post": 500}
    tables, _, _ = specs_from_config(_embedding({"ttl_steps": 7}))
    assert tables[0].dynamic == DynamicPolicy(ttl_steps=7)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"eviction": "fifo"}, r"embedding.tables.post.dynamic: DynamicPolicy.eviction must be"),
        ({"probe_limit": 0}, r"embedding.tables.post.dynamic: DynamicPolicy.probe_limit must"),
        ({"evict": "lru"}, r"embedding.tables.post.dynamic.evict is not a known key"),
        ({"expected_keys": -1}, r"embedding.tables.post.dynamic.expected_keys must be an int"),
        ("lru", r"embedding.tables.post.dynamic must be a dict"),
    ],
)
def test_bad_dynamic_section_names_the_key(section, message):
    with pytest.raises(EmbeddingConfigError, match=message):
        specs_from_config(_embedding(section))


def test_feed_ranker_switch_makes_member_and_post_dynamic():
    config = load_config("feed_ranker:size=tiny,dynamic=0.5")
    tables, _, _ = specs_from_config(config.embedding)
    by_name = {t.name: t for t in tables}
    assert (by_name["member"].vocab_size, by_name["post"].vocab_size) == (144, 496)
    assert by_name["member"].dynamic == DynamicPolicy(eviction="lru")
    assert by_name["hashtag"].dynamic is None and by_name["hashtag"].vocab_size == 101
    assert dynamic_expected_keys(config.embedding) == {"member": 300, "post": 1000}
    static = load_config("feed_ranker:size=tiny")
    assert static.embedding.tables.post.vocab_size == 1001
    assert "dynamic" not in static.embedding.tables.post
    with pytest.raises(ConfigError, match=r"'dynamic' must be a fraction in \[0, 1\]"):
        load_config("feed_ranker:size=tiny,dynamic=1.5")


def test_planner_places_dynamic_tables_row_wise_over_every_axis():
    tables, features, _ = specs_from_config(_embedding({"eviction": "lru"}))
    result = plan_tables(tables, features, {"data": 2, "model": 4}, 64, 10**9)
    assert result.plan["post"] == {"strategy": "row_wise", "axes": ("data", "model")}
    assert result.plan["tag"]["strategy"] == "data_parallel"
    why = {row.table: row.why for row in result.rows}
    assert why["post"] == "dynamic table: keys hashed over every device"
    # a hand plan still wins; DynamicTables rejects it when it is not row_wise everywhere
    hand = {"post": {"strategy": "table_wise"}}
    result = plan_tables(tables, features, {"data": 8}, 64, 10**9, hand)
    assert result.plan["post"]["strategy"] == "table_wise"


def test_expected_occupancy_from_the_traffic():
    tables, _, _ = specs_from_config(_embedding({"eviction": "none"}))
    specs = {t.name: t for t in tables}
    (row,) = explain_tables(specs, {"post": 8}, expected_keys={"post": 32})
    assert row["slots_per_shard"] == 8 and row["expected_occupancy"] == 0.5
    # 4 keys a shard on average, 3 sd = 3 * sqrt(4 * 7/8) = 5.61: fullest shard 9.61 > 8 slots
    assert row["expected_occupancy_max"] == 1.0
    assert row["expected_note"] == "32 slots to spare"
    (row,) = explain_tables(specs, {"post": 2}, expected_keys={"post": 100})
    assert row["expected_occupancy"] == 1.0 and row["expected_note"].startswith("36 keys more")
    assert "refused" in row["expected_note"]
    (row,) = explain_tables(specs, {"post": 8})
    assert "expected_keys" not in row  # no traffic given: no estimate
    assert format_rows([row]).startswith("dynamic post: 8 shards x 8 slots")


def test_probe_windows_lower_the_expected_occupancy():
    """300 keys for 304 slots (8 shards x 38, windows of 8): the plain estimate says 0.99,
    the windows fill first. The simulation agrees with the real placement rule (the real
    key hashes, as a restore places keys: fitting_keys) within sampling noise."""
    import jax
    import numpy as np

    from lf_jax.distributed.mesh import make_mesh
    from lf_jax.embedding import EmbeddingCollection, FeatureSpec, TableSpec, row_wise
    from lf_jax.embedding.dynamic.checkpoint import fitting_keys
    from lf_jax.embedding.dynamic.tables import DynamicTables

    occupancy, refused = window_fill(300, shards=8, capacity=38, probes=8)
    assert 0.8 < occupancy < 0.95 and 15 < refused < 60
    assert window_fill(32, shards=8, capacity=8, probes=8) == (0.5, 0)  # room everywhere
    spec = TableSpec(name="post", vocab_size=304, dim=4, dynamic=DynamicPolicy(probe_limit=8))
    coll = EmbeddingCollection(
        [spec],
        [FeatureSpec(name="p", table="post")],
        {"post": row_wise("data")},
        make_mesh({"data": 8}),
    )
    fit = fitting_keys(DynamicTables(coll), "post", np.arange(300, dtype=np.uint64))
    assert abs(fit.sum() / 304 - occupancy) < 0.06 and jax.device_count() == 8
    tables, _, _ = specs_from_config(_embedding({"probe_limit": 2}))
    (row,) = explain_tables({t.name: t for t in tables}, {"post": 8}, expected_keys={"post": 64})
    assert row["window_occupancy"] < row["expected_occupancy"] == 1.0
    assert "probe windows of 2 (keys placed without eviction): occupancy" in format_rows([row])


def test_lf_jax_plan_explains_dynamic_tables(capsys):
    assert main(["plan", "--config", "feed_ranker:size=tiny,dynamic=0.5"]) == 0
    out = capsys.readouterr().out
    assert "dynamic table: keys hashed over every device" in out
    assert "dynamic member: 8 shards x 18 slots" in out
    assert "expected: 1,000 keys -> occupancy 1.00" in out
    assert "504 keys more than slots: evicted (lru) as they come" in out


def test_plan_reports_each_dynamic_table_on_its_own_shards():
    """table_wise_row_wise over "model" of a 2 x 4 mesh: 4 shards of 16 slots; row_wise
    over every axis: 8 of 8; static tables are not listed."""
    from lf_jax.embedding import row_wise, table_wise_row_wise
    from lf_jax.embedding.plan import validate_plan
    from lf_jax.embedding.spec import TableSpec

    specs = {
        "post": TableSpec(name="post", vocab_size=64, dim=4, dynamic=DynamicPolicy()),
        "member": TableSpec(name="member", vocab_size=64, dim=4, dynamic=DynamicPolicy()),
        "tag": TableSpec(name="tag", vocab_size=10, dim=4),
    }
    mesh = {"data": 2, "model": 4}
    plan = {
        "post": table_wise_row_wise(1, "model"),
        "member": row_wise(("data", "model")),
        "tag": row_wise("model"),
    }
    shards = table_shards(specs, validate_plan(plan, specs, mesh), mesh)
    assert shards == {"post": 4, "member": 8}
    rows = {row["table"]: row for row in explain_tables(specs, shards)}
    assert rows["post"]["slots_per_shard"] == 16 and rows["member"]["slots_per_shard"] == 8
    assert format_rows([rows["post"]]).startswith("dynamic post: 4 shards x 16 slots")
