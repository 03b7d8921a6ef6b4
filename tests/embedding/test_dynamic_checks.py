"""Dynamic tables: bad policies, keys and plans fail on the host with one clear error."""

import jax
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import row_wise, table_wise, table_wise_row_wise
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.keys import (
    InvalidKeysError,
    initial_rows,
    join_keys,
    parse_keys,
)
from lf_jax.embedding.dynamic.policy import DynamicPolicy, DynamicPolicyError
from lf_jax.embedding.dynamic.report import explain
from lf_jax.embedding.dynamic.resolve import reset_inserted
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.sharding.piece import PlanError
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, SpecError, TableSpec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"probe_limit": 0}, "DynamicPolicy.probe_limit must be a positive int, got 0"),
        ({"admit_after": 1.5}, "DynamicPolicy.admit_after"),
        ({"eviction": "fifo"}, "DynamicPolicy.eviction must be one of .* got 'fifo'"),
        ({"ttl_steps": -3}, "DynamicPolicy.ttl_steps .* got -3"),
        ({"seed": 2**32}, "DynamicPolicy.seed must be < 2\\*\\*32"),
    ],
)
def test_bad_policy_fields_are_named(kwargs, message):
    with pytest.raises(DynamicPolicyError, match=message):
        DynamicPolicy(**kwargs)


def test_tablespec_refuses_a_non_policy():
    with pytest.raises(SpecError, match="table 'post': dynamic must be a DynamicPolicy"):
        TableSpec(name="post", vocab_size=8, dim=4, dynamic={"eviction": "lru"})


def test_keys_parse_ints_strings_and_padding():
    hi, lo, valid = parse_keys("p", [[3, 2**64 - 1], [], ["urn:li:post:1"]], max_ids=3)
    assert valid.tolist() == [[True, True, False], [False] * 3, [True, False, False]]
    assert join_keys(hi, lo)[0, :2].tolist() == [3, 2**64 - 1]
    hi, lo, valid = parse_keys("p", np.array([[5, -1], [-1, -1]]), max_ids=2)
    assert valid.tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            [[2**64]],
            "feature 'p': keys must be ints in \\[0, 2\\*\\*64\\), got 18446744073709551616",
        ),
        ([[-2]], "feature 'p': keys must be ints in \\[0, 2\\*\\*64\\), got -2"),
        ([[1.5]], "feature 'p': keys must be integers or strings, got dtype float64"),
        ({"a": 1}, "feature 'p': expected a list of bags or an array of keys, got dict"),
    ],
)
def test_bad_keys_are_named(raw, message):
    with pytest.raises(InvalidKeysError, match=message):
        parse_keys("p", raw, max_ids=2)


def _dyn(plan_entry, vocab=64, weighted=False):
    mesh = make_mesh({"data": 8}, devices=jax.devices()[:8])
    spec = TableSpec(name="post", vocab_size=vocab, dim=4, dynamic=DynamicPolicy())
    feature = FeatureSpec(name="p", table="post", max_ids=2, weighted=weighted)
    return DynamicTables(EmbeddingCollection([spec], [feature], {"post": plan_entry}, mesh))


def test_plans_and_capacities_that_do_not_fit_are_refused():
    with pytest.raises(PlanError, match="dynamic table 'post': plan it row_wise over every"):
        _dyn(table_wise())
    with pytest.raises(SpecError, match="vocab_size 60 .* must divide over its 8 shards"):
        _dyn(row_wise("data"), vocab=60)
    with pytest.raises(SpecError, match=r"vocab_size 60 .* 8 shards \(table_wise_row_wise\)"):
        _dyn(table_wise_row_wise(0, "data"), vocab=60)
    with pytest.raises(SpecError, match="feature 'p' reads dynamic table 'post' and is weighted"):
        _dyn(row_wise("data"), weighted=True)


def test_explain_gives_capacity_and_bytes_per_shard():
    (row,) = explain(_dyn(row_wise("data")))
    assert row["slots_per_shard"] == 8 and row["shards"] == 8 and row["probe_limit"] == 8
    assert row["bytes_per_shard"] == 8 * 4 * 4 + 8 * 16  # float32 rows (sgd: no slots) + index
    assert "64 rows over 8 shards" in row["reason"] and "evicts by lru" in row["reason"]


def test_counters_carry_into_a_second_word_and_never_overflow():
    import jax.numpy as jnp

    from lf_jax.embedding.dynamic.hash_table import (
        COUNTERS,
        WORD,
        add_counts,
        counter_totals,
        split_totals,
    )

    start = [WORD - 3, 5, 0, 0, 0, 0, 3 * WORD + 7, 4]  # probe_sum past 2**32 already
    counters = jnp.asarray(split_totals(start))
    step = jnp.asarray([10, 1, 0, 0, 0, 0, WORD - 1, 0], jnp.int32)
    for _ in range(3):
        counters = add_counts(counters, step)
    totals = counter_totals(np.asarray(counters)[None])
    assert totals[0] == WORD - 3 + 30 and totals[1] == 8
    assert totals[COUNTERS.index("probe_sum")] == 3 * WORD + 7 + 3 * (WORD - 1)
    two_shards = np.stack([np.asarray(counters), split_totals([1] * 7 + [9])])
    assert counter_totals(two_shards)[0] == WORD - 3 + 31 and counter_totals(two_shards)[-1] == 9


def test_step_scalars_read_counters_past_2_to_the_31():
    """The train step's scalars (float32) of two-word counters: no overflow under jit."""
    import types

    import jax.numpy as jnp

    from lf_jax.embedding.dynamic.hash_table import WORD, init_shard, split_totals
    from lf_jax.train.dynamic_step import dynamic_scalars

    policy = DynamicPolicy()
    shard = init_shard(4, policy)
    shard["counters"] = jnp.asarray(split_totals([3 * WORD + 5, 0, 0, 7, 0, 0, WORD, 2]))
    index = {"post": jax.tree.map(lambda x: jnp.stack([x, x]), shard)}  # two shards
    layout = types.SimpleNamespace(devices=(0, 1))
    dyn = types.SimpleNamespace(policies={"post": policy}, layouts={"post": layout})
    values = jax.jit(lambda i: dynamic_scalars(dyn, i, jnp.int32(1)))(index)
    assert float(values["dynamic/post/hits"]) == pytest.approx(2 * (3 * WORD + 5), rel=1e-6)
    assert (
        float(values["dynamic/post/inserts"]) == 14 and float(values["dynamic/post/probe_max"]) == 2
    )
    assert float(values["dynamic/post/probe_mean"]) == pytest.approx(
        2 * WORD / (2 * (3 * WORD + 12))
    )


@pytest.mark.parametrize("count", [0, 3, 4, 5, 32])
def test_reset_inserted_writes_exactly_the_new_keys(count):
    """32 keys, new ones packed 32 // 8 = 4 per round (none: no round; 4: one, the
    boundary; 5: two; 32: eight): the new keys' rows are their initial rows, their
    optimizer slots the initial value, every other row untouched."""
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    spec = TableSpec(
        name="post",
        vocab_size=64,
        dim=4,
        optimizer=rowwise_adagrad(0.1),
        dynamic=DynamicPolicy(),
    )
    feature = FeatureSpec(name="p", table="post", max_ids=2)
    layout = DynamicTables(
        EmbeddingCollection([spec], [feature], {"post": row_wise("data")}, mesh)
    ).layouts["post"]
    n, rows = 32, layout.group.rows
    hi = np.arange(n, dtype=np.uint32) * 7919
    lo = np.arange(n, dtype=np.uint32) + 2**31
    slot_n = (np.arange(n, dtype=np.int32) * 2) % rows
    new_n = np.zeros(n, bool)
    new_n[np.random.default_rng(count).choice(n, count, replace=False)] = True
    init = {"accumulator": layout.group.optimizer.slot_init("accumulator")}
    stored, slots = jax.jit(
        lambda t, s, new, slot, h, lo_: reset_inserted(layout, t, s, init, new, slot, h, lo_)
    )(
        np.full((1, rows, 4), 7.0, np.float32),
        {"accumulator": np.full((1, rows), 5.0, np.float32)},
        new_n,
        slot_n,
        hi,
        lo,
    )
    want_rows = np.full((rows, 4), 7.0, np.float32)
    want_rows[slot_n[new_n]] = np.asarray(initial_rows(spec, hi[new_n], lo[new_n]))
    np.testing.assert_array_equal(np.asarray(stored)[0], want_rows)
    want_slots = np.full(rows, 5.0, np.float32)
    want_slots[slot_n[new_n]] = init["accumulator"]
    np.testing.assert_array_equal(np.asarray(slots["accumulator"])[0], want_slots)
