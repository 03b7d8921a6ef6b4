"""Bag mode (``EmbeddingCollection(..., exchange="bags")``: owners pool partial bags)
against the rows exchange and the numpy oracle, on the fused kernels and the XLA path
(lf_jax.embedding.bag_xla): forward and 3 update steps on (8,), (2, 4) and (4, 2)
meshes, every id of the batch on one owner (the bag capacities overflow: the rows
exchange's sorted rounds take the step), micro-batched updates and capacities from the
traffic."""

import jax
import numpy as np
import pytest

from lf_jax import embedding as P
from lf_jax.embedding import bag_exchange
from lf_jax.embedding.capacity import CapacityChooser, exchange_counts
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.preprocess import SparseBatch
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing import embedding_oracle as oracle

BATCH = 32
TABLES = [
    TableSpec(name="users", vocab_size=53, dim=8, optimizer=rowwise_adagrad(0.5)),
    TableSpec(name="items", vocab_size=61, dim=8, optimizer=adam(0.1)),
    TableSpec(name="tags", vocab_size=29, dim=4, optimizer=sgd(0.3)),
    TableSpec(name="pos", vocab_size=5, dim=8, optimizer=rowwise_adagrad(0.5)),
]
FEATURES = [
    FeatureSpec(name="user", table="users", max_ids=1),
    FeatureSpec(name="friends", table="users", max_ids=6, combiner="mean", weighted=True),
    FeatureSpec(name="item_seq", table="items", max_ids=3, combiner="none"),
    FeatureSpec(name="items", table="items", max_ids=9, combiner="sqrtn", weighted=True),
    FeatureSpec(name="tags", table="tags", max_ids=7, combiner="sum"),
    FeatureSpec(name="pos", table="pos", max_ids=2, combiner="sum"),
]


def _plan(mesh):
    axes = tuple(mesh.axis_names)
    return {
        "users": P.row_wise(axes),
        "items": P.row_wise(axes),
        "tags": P.row_wise(axes),
        "pos": P.data_parallel(),
    }


def _grads(rng, batch):
    return {
        f.name: rng.standard_normal(
            (batch, f.max_ids, 8 if f.table != "tags" else 4)
            if f.combiner == "none"
            else (batch, 8 if f.table != "tags" else 4)
        ).astype(np.float32)
        for f in FEATURES
    }


def _train(coll, batches, grads, shared=False):
    """(activations of every step, final logical state) of lookup + update steps;
    ``shared``: one ``coll.routing(batch)`` for both."""

    def step(state, batch, grads):
        routing = coll.routing(batch) if shared else None
        acts = coll.lookup(state["tables"], batch, routing)
        return coll.apply_gradients(state, batch, grads, routing=routing), acts

    run = jax.jit(step)
    state = coll.init(jax.random.key(0))
    outs = []
    for batch, g in zip(batches, grads, strict=True):
        state, acts = run(state, coll.shard_batch(batch), g)
        outs.append(jax.device_get(acts))
    return outs, jax.device_get(jax.jit(coll.to_logical)(state))


def _fits(coll, batch) -> bool:
    """Whether every device's entries and bags per owner fit the bag capacities (host count)."""
    n_dev = coll.num_devices
    for route in coll.routes:
        if route.modes != ("bags",):
            continue
        coefs = {f: np.ones_like(v, np.float32) for f, v in batch.ids.items()}
        slot_be, _, _ = jax.device_get(route.entries(batch.ids, coefs))
        per, width = slot_be.shape[0] // n_dev, slot_be.shape[1]
        ce, cb = bag_exchange.capacities(route, per, width)
        for d in range(n_dev):
            slot = slot_be[d * per : (d + 1) * per]
            n, e = np.nonzero(slot >= 0)
            for s in range(route.group.num_slots):
                at = slot[n, e] == s
                bags = set(zip(n[at], route.out_col_e[e[at]], strict=True))
                if at.sum() > ce or len(bags) > cb:
                    return False
    return True


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "shape, kernel",
    [
        ({"data": 8}, "fused"),
        ({"data": 2, "model": 4}, "fused"),
        ({"data": 4, "model": 2}, "fused"),
        ({"data": 2, "model": 4}, "xla"),  # lf_jax.embedding.bag_xla
    ],
)
def test_bag_mode_equals_rows_exchange_and_oracle(shape, kernel, mesh_of):
    mesh = mesh_of(shape)
    bags = EmbeddingCollection(TABLES, FEATURES, _plan(mesh), mesh, kernel=kernel, exchange="bags")
    rows = EmbeddingCollection(TABLES, FEATURES, _plan(mesh), mesh, kernel=kernel)
    assert [r.modes for r in bags.routes if r.group.num_slots > 1] == [("bags",)] * 3
    rng = np.random.default_rng(0)
    batches = [
        bags.preprocess(*oracle.random_batch(FEATURES, TABLES, BATCH, seed=s)) for s in range(3)
    ]
    grads = [_grads(rng, BATCH) for _ in batches]
    assert all(_fits(bags, b) for b in batches)  # the bag exchange takes these steps
    got_acts, got_state = _train(bags, batches, grads)
    want_acts, want_state = _train(rows, batches, grads)
    _assert_close(got_acts, want_acts)
    _assert_close(got_state, want_state)
    _assert_close(_train(bags, batches, grads, shared=True), (got_acts, got_state))

    logical = jax.device_get(jax.jit(bags.to_logical)(bags.init(jax.random.key(0))))
    slots = {  # the oracle's row-wise accumulator: one value per row
        t: {k: v[:, 0] if k == "accumulator" else v for k, v in sl.items()}
        for t, sl in logical["slots"].items()
    }
    want_tables, _ = oracle.oracle_step(
        logical["tables"],
        slots,
        FEATURES,
        TABLES,
        batches[0],
        grads[0],
        step=1,
        plan=_plan(mesh),
    )
    _, one_step = _train(bags, batches[:1], grads[:1])
    for name in want_tables:
        np.testing.assert_allclose(
            one_step["tables"][name], want_tables[name], rtol=2e-5, atol=2e-6
        )


@pytest.mark.parametrize("kernel", ["fused", "xla"])
def test_every_id_on_one_owner_takes_the_rows_rounds_and_stays_exact(kernel, mesh_of):
    mesh = mesh_of({"data": 8})
    bags = EmbeddingCollection(TABLES, FEATURES, _plan(mesh), mesh, kernel=kernel, exchange="bags")
    rows = EmbeddingCollection(TABLES, FEATURES, _plan(mesh), mesh, kernel=kernel)
    raw_ids, raw_weights = oracle.random_batch(FEATURES, TABLES, BATCH, seed=7)
    spec = {t.name: t.vocab_size for t in TABLES}
    for f in FEATURES:  # every id a multiple of 8: rows dealt r % 8 -> all on owner 0
        if f.table != "pos":
            raw_ids[f.name] = [
                [(i * 8) % spec[f.table] // 8 * 8 for i in bag] for bag in raw_ids[f.name]
            ]
    batch = bags.preprocess(raw_ids, raw_weights)
    assert not _fits(bags, batch)  # the rows exchange's sorted rounds take it
    grads = [_grads(np.random.default_rng(1), BATCH)]
    want = _train(rows, [batch], grads)
    _assert_close(_train(bags, [batch], grads), want)
    _assert_close(_train(bags, [batch], grads, shared=True), want)


@pytest.mark.parametrize("kernel", ["fused", "xla"])
def test_micro_batched_bag_update_equals_one_big_batch(kernel, mesh_2x4):
    coll = EmbeddingCollection(
        TABLES, FEATURES, _plan(mesh_2x4), mesh_2x4, kernel=kernel, exchange="bags"
    )
    micro = [
        coll.preprocess(*oracle.random_batch(FEATURES, TABLES, 16, seed=20 + i)) for i in range(3)
    ]
    rng = np.random.default_rng(3)
    grads_k = {
        n: np.stack([g[n] for g in [_grads(rng, 16) for _ in range(3)]]) for n in coll.features
    }
    stacked = SparseBatch(
        {n: np.stack([m.ids[n] for m in micro]) for n in coll.features},
        {n: np.stack([m.weights[n] for m in micro]) for n in coll.features},
    )
    flat = SparseBatch(
        {n: v.reshape(48, -1) for n, v in stacked.ids.items()},
        {n: v.reshape(48, -1) for n, v in stacked.weights.items()},
    )
    state = coll.init(jax.random.key(0))
    sharding = coll.batch_sharding(leading_dims=1)
    accumulated = jax.jit(coll.apply_gradients, static_argnames="microbatched")(
        state,
        coll.shard_batch(stacked, leading_dims=1),
        {n: jax.device_put(g, sharding) for n, g in grads_k.items()},
        microbatched=True,
    )
    one = jax.jit(coll.apply_gradients)(
        coll.init(jax.random.key(0)),
        coll.shard_batch(flat),
        {
            n: jax.device_put(g.reshape(48, *g.shape[2:]), coll.batch_sharding())
            for n, g in grads_k.items()
        },
    )
    to_logical = jax.jit(coll.to_logical)
    _assert_close(jax.device_get(to_logical(accumulated)), jax.device_get(to_logical(one)))


def test_capacities_from_the_traffic_equal_the_static_ones(mesh_of):
    mesh = mesh_of({"data": 8})
    coll = EmbeddingCollection(TABLES, FEATURES, _plan(mesh), mesh, exchange="bags")
    chooser = CapacityChooser(coll, BATCH)
    names = [name for name, _ in chooser.capacities()]
    assert {n.rsplit("/", 1)[-1] for n in names} == {"entries", "bags"}

    def step(state, batch, grads, capacities):
        routing = coll.routing(batch, capacities)
        acts = coll.lookup(state["tables"], batch, routing)
        state = coll.apply_gradients(state, batch, grads, routing=routing)
        return state, acts, exchange_counts(routing)

    run = jax.jit(step, static_argnames="capacities")
    rng = np.random.default_rng(4)
    batches = [
        coll.shard_batch(coll.preprocess(*oracle.random_batch(FEATURES, TABLES, BATCH, seed=s)))
        for s in range(4)
    ]
    grads = [_grads(rng, BATCH) for _ in batches]
    static = adaptive = coll.init(jax.random.key(0))
    used = []
    for batch, g in zip(batches, grads, strict=True):
        static, want, _ = run(static, batch, g, capacities=None)
        caps = chooser.capacities()
        used.append(caps)
        adaptive, got, counts = run(adaptive, batch, g, capacities=caps)
        chooser.observe(counts)
        _assert_close(jax.device_get(got), jax.device_get(want))
    _assert_close(jax.device_get(adaptive), jax.device_get(static))
    assert any(c < chooser.static[name] for name, c in used[-1])  # the traffic's are smaller
