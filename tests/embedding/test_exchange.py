"""The owner-routed exchange is exact under any skew and any number of rounds.

Skewed batches (every id owned by one device; zipf ids) and a capacity of 2 keys per
owner and round (so every step runs many all_to_all rounds, and the update's rounds
cover disjoint row ranges) must still equal the numpy oracle, forward and after
updates, for every strategy.
"""

import jax
import numpy as np
import pytest
from test_strategies import (
    MESHES,
    SMALL_FEATURES,
    SMALL_TABLES,
    assert_matches_oracle,
    small_plan,
)

from lf_jax import embedding as P
from lf_jax.embedding import lookup
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.exchange import Requests, capacity_for, fetch_rows
from lf_jax.embedding.preprocess import SparseBatch, id_fill
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError

VOCAB = 800  # 100 rows per device when split over 8

SKEW_TABLES = [
    TableSpec(name="member", vocab_size=VOCAB, dim=8, optimizer=rowwise_adagrad(0.5)),
    TableSpec(name="post", vocab_size=VOCAB, dim=8, optimizer=adam(0.1)),
]
SKEW_FEATURES = [
    FeatureSpec(name="actor", table="member", max_ids=1),
    FeatureSpec(name="history", table="member", max_ids=6, combiner="mean", weighted=True),
    FeatureSpec(name="posts", table="post", max_ids=4, combiner="sum"),
    FeatureSpec(name="post_seq", table="post", max_ids=3, combiner="none"),
]
BATCH = 64


def skewed_batch(kind: str, step: int):
    """Raw ids: 'one_owner' draws multiples of 8 (rows are dealt round-robin, so all of
    them live on slot 0 of a split over 8, 4 or 2 devices);
    'zipf' draws ranks ~ zipf(1.1) clipped to the vocab."""
    rng = np.random.default_rng(step)
    ids, weights = {}, {}
    for f in SKEW_FEATURES:
        if kind == "one_owner":
            bag = 8 * rng.integers(0, VOCAB // 8, size=(BATCH, f.max_ids))
        else:
            bag = np.minimum(rng.zipf(1.1, size=(BATCH, f.max_ids)), VOCAB) - 1
        ids[f.name] = bag.tolist()
        if f.weighted:
            weights[f.name] = rng.uniform(0.5, 2.0, size=bag.shape).tolist()
    return ids, weights


@pytest.mark.parametrize(
    "kind,mesh_name,strategy",
    [
        ("one_owner", "d2m4", P.row_wise(("data", "model"))),
        ("one_owner", "d4m2", P.table_wise_row_wise(1, "data")),
        ("zipf", "d8", P.row_wise(("data",))),
        ("zipf", "d2m4", P.row_wise(("model",))),
    ],
    ids=["one_owner_rw_all_d2m4", "one_owner_twrw_d4m2", "zipf_rw_d8", "zipf_rw_model_d2m4"],
)
def test_skewed_ids_match_oracle(kind, mesh_name, strategy, mesh_of):
    coll = EmbeddingCollection(
        SKEW_TABLES,
        SKEW_FEATURES,
        {t.name: strategy for t in SKEW_TABLES},
        mesh_of(MESHES[mesh_name]),
    )
    assert_skewed_steps_match_oracle(coll, kind)


def assert_skewed_steps_match_oracle(coll, kind, shared_routing=False, capacities=None):
    """Two steps of ``skewed_batch(kind, step)`` against the numpy oracle (``capacities``:
    as ``coll.routing`` takes them, with ``shared_routing``)."""
    assert_matches_oracle(
        coll,
        SKEW_TABLES,
        SKEW_FEATURES,
        steps=2,
        check_steps=(1, 2),
        batch_fn=lambda step: skewed_batch(kind, step),
        shared_routing=shared_routing,
        capacities=capacities,
    )


@pytest.mark.parametrize(
    "kind,mesh_name,strategy",
    [
        ("one_owner", "d2m4", P.row_wise(("data", "model"))),
        ("zipf", "d2m4", P.row_wise(("model",))),
    ],
    ids=["one_owner_rw_all_d2m4", "zipf_rw_model_d2m4"],
)
def test_routing_shared_by_lookup_and_update_matches_oracle(kind, mesh_name, strategy, mesh_of):
    """coll.routing(batch) given to both lookup and apply_gradients: the same results,
    also when the one-round layout overflows (every id on one owner) and the step falls
    back to sorted rounds, and with replicated groups (row_wise over "model" only)."""
    coll = EmbeddingCollection(
        SKEW_TABLES,
        SKEW_FEATURES,
        {t.name: strategy for t in SKEW_TABLES},
        mesh_of(MESHES[mesh_name]),
    )
    assert_skewed_steps_match_oracle(coll, kind, shared_routing=True)


def test_routing_without_the_group_or_with_micro_batches_is_one_clear_error(mesh_of):
    mesh = mesh_of(MESHES["d8"])
    coll = EmbeddingCollection(
        SKEW_TABLES, SKEW_FEATURES, {t.name: P.row_wise(("data",)) for t in SKEW_TABLES}, mesh
    )
    batch = coll.shard_batch(coll.preprocess(*skewed_batch("zipf", 1)))
    routing = jax.eval_shape(coll.routing, batch)
    assert sorted(routing) == sorted(route.group.name for route in coll.routes)
    tables = jax.eval_shape(lambda: coll.init(jax.random.key(0)))["tables"]
    with pytest.raises(UserInputError, match="routing has no layout for shard group"):
        jax.eval_shape(lambda t, r: coll.lookup(t, batch, r), tables, {"elsewhere": routing})
    with pytest.raises(UserInputError, match=r"microbatched=True\) .*pass routing=None"):
        coll.apply_gradients({}, batch, {}, microbatched=True, routing=routing)


@pytest.mark.parametrize("id_fill", [0.125, 0.625])
def test_capacity_sized_to_real_ids_stays_exact(id_fill, mesh_of):
    """Exchange capacities sized to a fraction of the padded slots: batches with more
    real ids than ``id_fill`` take more rounds and still equal the oracle."""
    mesh = mesh_of(MESHES["d8"])
    strategy = P.row_wise(("data",))
    coll = EmbeddingCollection(
        SKEW_TABLES, SKEW_FEATURES, {t.name: strategy for t in SKEW_TABLES}, mesh, id_fill=id_fill
    )
    route = coll.routes[0]
    assert route.capacity(160) < capacity_for(160, route.owner_share, route.group.rows)
    assert_skewed_steps_match_oracle(coll, "zipf")


@pytest.mark.parametrize("bad", [0, 1.5, True, "half"])
def test_id_fill_out_of_range_is_one_clear_error(bad, mesh_of):
    mesh = mesh_of(MESHES["d8"])
    with pytest.raises(UserInputError, match=f"id_fill must be .*got {bad!r}"):
        EmbeddingCollection(SKEW_TABLES, SKEW_FEATURES, {}, mesh, id_fill=bad)


def test_id_fill_of_batches_is_the_fullest_device_rounded_up():
    lengths = np.array([20] * 4 + [1] * 4)  # device 0 full, device 1 at 1/20
    ids = np.where(np.arange(20)[None, :] < lengths[:, None], 3, -1)
    batch = SparseBatch({"f": ids}, {})
    assert id_fill([batch], num_devices=2) == 1.0
    assert id_fill([batch._replace(ids={"f": ids[4:]})], num_devices=1) == 0.125
    with pytest.raises(UserInputError, match="divisible by 3 devices"):
        id_fill([batch], num_devices=3)


def test_every_strategy_matches_oracle_with_many_rounds(monkeypatch, mesh_2x4):
    """Capacity 2: each step needs many exchange rounds on every sharded group (one
    table per strategy, every optimizer, features sharing tables)."""
    monkeypatch.setattr(lookup, "capacity_for", lambda entries, share, rows: min(entries, 2))
    coll = EmbeddingCollection(SMALL_TABLES, SMALL_FEATURES, small_plan(mesh_2x4), mesh_2x4)
    assert_matches_oracle(coll, SMALL_TABLES, SMALL_FEATURES, steps=2, check_steps=(1, 2))


def test_fetch_rows_takes_as_many_rounds_as_skew_needs(mesh_of):
    """Every device asks owner 0 for 12 distinct rows with capacity 3: four rounds."""
    mesh = mesh_of({"data": 8})
    rows, dim = 16, 2
    table_srd = np.arange(8 * rows * dim, dtype=np.float32).reshape(8, rows, dim)
    local_m = np.tile(np.arange(12, dtype=np.int32)[::-1], 8)  # 12 per device, reversed
    slot_m = np.zeros_like(local_m)
    slot_m[::5] = -1  # some padding

    def shard(table_1rd, slot_m, local_m):
        requests = Requests.build(slot_m, local_m, num_slots=8, rows=rows)
        rows_ud = fetch_rows(requests, table_1rd[0], ("data",), 3, ("data",))
        return rows_ud[requests.inverse_m]

    spec = jax.sharding.PartitionSpec("data")
    got = jax.jit(
        jax.shard_map(
            shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
        )
    )(table_srd, slot_m, local_m)
    want = np.where((slot_m >= 0)[:, None], table_srd[0][local_m], 0)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_capacity_is_the_expected_share_plus_five_sigma():
    assert capacity_for(81920, 1 / 8, 125_000) == 10240 + 506 + 1
    assert capacity_for(100, 1.0, 1000) == 100  # never more than the entries
    assert capacity_for(100, 1.0, 20) == 20  # nor than the rows an owner holds
    assert capacity_for(81920, 1 / 256, 4000) == 320 + 90 + 1
