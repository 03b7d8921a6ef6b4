"""Dynamic tables: checkpoint on 8 devices -> restore on 4 -> continue equals continuing
on 8 (also from a table_wise_row_wise table onto row_wise ones, through the host
checkpoint and the trainer's logical form); k micro-batches resolve and update as one
batch; a restore that does not fit fails naming the table."""

import jax
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import row_wise, table_wise_row_wise
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.checkpoint import from_checkpoint, rehash_logical, to_checkpoint
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.preprocess import SparseBatch
from lf_jax.embedding.sparse_optim import rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError

DIM, BATCH = 4, 16
FEATURES = [
    FeatureSpec(name="p", table="post", max_ids=3),
    FeatureSpec(name="u", table="user", max_ids=1),
]


def tables(rows: int, ttl=2):
    return [
        TableSpec(
            name="post",
            vocab_size=rows,
            dim=DIM,
            optimizer=rowwise_adagrad(0.3),
            dynamic=DynamicPolicy(eviction="lru", ttl_steps=ttl, probe_limit=8),
        ),
        TableSpec(name="user", vocab_size=24, dim=DIM, optimizer=sgd(0.5)),
    ]


def make(devices: int, rows: int = 512):
    mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
    plan = {"post": row_wise("data"), "user": row_wise("data")}
    return DynamicTables(EmbeddingCollection(tables(rows), FEATURES, plan, mesh))


def batches(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for t in range(steps):
        pool = np.arange(10 * t, 10 * t + 40, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        p = [[int(k) for k in rng.choice(pool, rng.integers(0, 4))] for _ in range(BATCH)]
        u = rng.integers(0, 24, BATCH)
        grads = {f: rng.standard_normal((BATCH, DIM)).astype(np.float32) for f in ("p", "u")}
        yield {"p": p, "u": u}, grads


def stepper(dyn):
    coll = dyn.collection

    def step(state, keys, grads):
        state, batch = dyn.resolve(state, keys)
        state["embedding"] = coll.apply_gradients(state["embedding"], batch, grads)
        return state

    return jax.jit(step)


def run(dyn, state, stream):
    step = stepper(dyn)
    for raw, grads in stream:
        state = step(state, dyn.shard_batch(dyn.preprocess(raw)), grads)
    return state


def assert_same(dyn_a, state_a, dyn_b, state_b):
    a, b = dyn_a.snapshot(state_a)["post"], dyn_b.snapshot(state_b)["post"]
    assert a["keys"].tolist() == b["keys"].tolist()
    np.testing.assert_allclose(a["rows"], b["rows"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a["slots"]["accumulator"], b["slots"]["accumulator"], rtol=1e-6)
    assert a["last"].tolist() == b["last"].tolist() and a["freq"].tolist() == b["freq"].tolist()
    user_a = dyn_a.collection.logical_tables(state_a["embedding"])["user"]
    user_b = dyn_b.collection.logical_tables(state_b["embedding"])["user"]
    # the static table's owners sum a row's gradients in the order senders' rows arrive
    np.testing.assert_allclose(user_a, user_b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_restore_on_four_devices_continues_like_eight():
    stream = list(batches(6))
    dyn8, dyn4 = make(8), make(4)
    state8 = run(dyn8, dyn8.init(jax.random.key(0)), stream[:3])
    state4 = from_checkpoint(dyn4, to_checkpoint(dyn8, state8))
    assert_same(dyn8, state8, dyn4, state4)
    state8, state4 = run(dyn8, state8, stream[3:]), run(dyn4, state4, stream[3:])
    assert_same(dyn8, state8, dyn4, state4)
    counts8, counts4 = dyn8.counters(state8)["post"], dyn4.counters(state4)["post"]
    assert counts8["evictions"] == counts4["evictions"] == 0  # room on both meshes
    assert counts8["refused"] == counts4["refused"] == 0
    assert counts8["inserts"] == counts4["inserts"] > 40  # TTL forgot and re-inserted keys
    assert 0 < counts4["occupancy"] < 0.5


def test_table_wise_row_wise_restores_onto_row_wise_and_continues_alike():
    """post on devices 4..7 of a (2, 4) mesh (table_wise_row_wise group 1 of "model") ->
    row_wise on 4 devices (to_checkpoint / from_checkpoint) and on 8 (the trainer's
    logical form through rehash_logical): same content, and the same after 3 more steps."""
    stream = list(batches(6))
    mesh = make_mesh({"data": 2, "model": 4})
    plan = {"post": table_wise_row_wise(1, "model"), "user": row_wise(("data", "model"))}
    group = DynamicTables(EmbeddingCollection(tables(512), FEATURES, plan, mesh))
    dyn4, dyn8 = make(4), make(8)
    state_g = run(group, group.init(jax.random.key(0)), stream[:3])
    state4 = from_checkpoint(dyn4, to_checkpoint(group, state_g))
    logical = jax.device_get(jax.jit(group.collection.to_logical)(state_g["embedding"]))
    logical8, index8 = rehash_logical(dyn8, logical, jax.device_get(state_g["index"]))
    state8 = {"embedding": jax.jit(dyn8.collection.from_logical)(logical8), "index": index8}
    for dyn, state in ((dyn4, state4), (dyn8, state8)):
        assert_same(group, state_g, dyn, state)
    state_g = run(group, state_g, stream[3:])
    for dyn, state in ((dyn4, state4), (dyn8, state8)):
        state = run(dyn, state, stream[3:])
        assert_same(group, state_g, dyn, state)
        assert dyn.counters(state)["post"]["inserts"] == group.counters(state_g)["post"]["inserts"]
    assert group.counters(state_g)["post"]["evictions"] == 0


def test_restore_that_does_not_fit_names_the_table():
    dyn8, small = make(8), make(2, rows=8)
    state8 = run(dyn8, dyn8.init(jax.random.key(0)), list(batches(2)))
    with pytest.raises(UserInputError, match="dynamic table 'post'.*no free slot"):
        from_checkpoint(small, to_checkpoint(dyn8, state8))


def test_microbatches_resolve_and_update_as_one_batch():
    (raw, grads), k = next(batches(1)), 2
    dyn = make(8)
    one = stepper(dyn)(dyn.init(jax.random.key(0)), dyn.shard_batch(dyn.preprocess(raw)), grads)
    keys = dyn.preprocess(raw)
    stacked = jax.tree.map(lambda x: x.reshape(k, BATCH // k, *x.shape[1:]), keys)
    coll = dyn.collection

    def micro_step(state, keys, grads):
        state, batch = dyn.resolve(state, keys)
        state["embedding"] = coll.apply_gradients(
            state["embedding"], batch, grads, microbatched=True
        )
        return state

    grads_k = {n: g.reshape(k, BATCH // k, DIM) for n, g in grads.items()}
    micro = jax.jit(micro_step)(
        dyn.init(jax.random.key(0)), dyn.shard_batch(stacked, leading_dims=1), grads_k
    )
    assert isinstance(keys.static, SparseBatch)
    assert_same(dyn, one, dyn, micro)


def test_find_only_reads_present_keys_and_changes_nothing():
    dyn = make(8)
    stream = list(batches(4))
    state = run(dyn, dyn.init(jax.random.key(0)), stream[:3])
    before, counts = dyn.snapshot(state)["post"], dyn.counters(state)["post"]
    keys = dyn.shard_batch(dyn.preprocess(stream[3][0]))
    after, found = jax.jit(lambda s, k: dyn.resolve(s, k, insert=False))(state, keys)
    snap = dyn.snapshot(after)["post"]
    assert snap["keys"].tolist() == before["keys"].tolist()
    assert snap["last"].tolist() == before["last"].tolist()
    assert dyn.counters(after)["post"] == counts
    _, trained = jax.jit(dyn.resolve)(after, keys)
    found_ids, trained_ids = np.asarray(found.ids["p"]), np.asarray(trained.ids["p"])
    hit = found_ids >= 0
    assert hit.any() and (found_ids == -1).any()
    np.testing.assert_array_equal(found_ids[hit], trained_ids[hit])
    # alive at the next step (4): seen within the last ttl_steps = 2 steps
    present = {
        k for k, last in zip(before["keys"].tolist(), before["last"], strict=True) if last >= 2
    }
    raw = stream[3][0]["p"]
    for b, bag in enumerate(raw):
        for i, key in enumerate(bag):
            assert (found_ids[b, i] >= 0) == (key in present)
