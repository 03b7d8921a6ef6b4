"""``EmbeddingCollection(exchange="auto")``: a spread group is probed in the rows and the
bag exchange, then keeps the mode whose capacities move fewer bytes
(``CapacityChooser.mode``); every step equals the rows exchange's. Long bags of rarely
repeating ids pick bags, bags of a few hot ids pick rows."""

import jax
import numpy as np
import pytest

from lf_jax import embedding as P
from lf_jax.embedding import bag_exchange
from lf_jax.embedding.capacity import CapacityChooser, checked_capacities, exchange_counts
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError

BATCH, PROBE = 256, 2
TABLES = [  # different dims: two shard groups
    TableSpec(name="wide", vocab_size=100_000, dim=16, optimizer=rowwise_adagrad(0.5)),
    TableSpec(name="hot", vocab_size=4_000, dim=8, optimizer=rowwise_adagrad(0.5)),
]
FEATURES = [
    FeatureSpec(name="wide", table="wide", max_ids=20),
    FeatureSpec(name="hot", table="hot", max_ids=20),
]


def _collection(mesh, exchange):
    axes = tuple(mesh.axis_names)
    plan = {"wide": P.row_wise(axes), "hot": P.row_wise(axes)}
    return EmbeddingCollection(TABLES, FEATURES, plan, mesh, exchange=exchange)


def _batch(coll, seed):
    """wide: 20 ids from 100,000 rows (rarely repeating); hot: 20 ids from 4 rows."""
    rng = np.random.default_rng(seed)
    raw = {
        "wide": rng.integers(0, 100_000, (BATCH, 20)).tolist(),
        "hot": rng.integers(0, 4, (BATCH, 20)).tolist(),
    }
    return coll.shard_batch(coll.preprocess(raw))


def _step(coll):
    def step(state, batch, grads, capacities):
        routing = coll.routing(batch, capacities)
        acts = coll.lookup(state["tables"], batch, routing)
        state = coll.apply_gradients(state, batch, grads, routing=routing)
        return state, acts, exchange_counts(routing)

    return jax.jit(step, static_argnames="capacities")


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=5e-5)  # hot rows: 5,000-term sums


def test_auto_probes_both_modes_then_keeps_the_one_that_moves_fewer_bytes(mesh_of):
    mesh = mesh_of({"data": 8})
    auto, rows = _collection(mesh, "auto"), _collection(mesh, "rows")
    groups = {r.group.name: r for r in auto.routes}
    wide = next(g for g, r in groups.items() if r.group.dim == 16)
    hot = next(g for g, r in groups.items() if r.group.dim == 8)
    assert {r.modes for r in auto.routes} == {("rows", "bags")}
    chooser = CapacityChooser(auto, BATCH, probe_steps=PROBE)
    run_auto, run_rows = _step(auto), _step(rows)
    rng = np.random.default_rng(0)
    state_auto = state_rows = auto.init(jax.random.key(0))
    modes = []
    for seed in range(2 * PROBE + 2):
        batch = _batch(auto, seed)
        grads = {
            n: rng.standard_normal((BATCH, t.dim), np.float32)
            for n, t in zip(("wide", "hot"), TABLES, strict=True)
        }
        caps = chooser.capacities()
        modes.append({g: chooser.mode(g) for g in (wide, hot)})
        routing_names = {name.split("/")[0]: "/" in name for name, _ in caps}
        assert routing_names == {g: m == "bags" for g, m in modes[-1].items()}
        state_auto, got, counts = run_auto(state_auto, batch, grads, capacities=caps)
        state_rows, want, _ = run_rows(state_rows, batch, grads, capacities=None)
        chooser.observe(counts)
        _assert_close(jax.device_get(got), jax.device_get(want))
    _assert_close(jax.device_get(state_auto), jax.device_get(state_rows))

    probe = [{wide: "rows", hot: "rows"}] * PROBE + [{wide: "bags", hot: "bags"}] * PROBE
    assert modes == probe + [{wide: "bags", hot: "rows"}] * 2
    assert chooser.chosen == {wide: "bags", hot: "rows"}
    for group, (rows_b, bag_b) in chooser.probed.items():  # the rule, from the capacities
        dim = groups[group].group.dim
        assert rows_b == bag_exchange.rows_bytes(chooser.capacity(group), dim)
        entries, bags = (chooser.capacity(f"{group}/{p}") for p in ("entries", "bags"))
        assert bag_b == bag_exchange.bag_bytes(entries, bags, dim)
        assert (bag_b < rows_b) == (chooser.chosen[group] == "bags")


def test_decided_modes_skip_the_probe(mesh_of):
    mesh = mesh_of({"data": 8})
    auto = _collection(mesh, "auto")
    wide, hot = (r.group.name for r in auto.routes)
    chooser = CapacityChooser(auto, BATCH, modes={wide: "bags", hot: "rows", "nope": "bags"})
    assert chooser.chosen == {wide: "bags", hot: "rows"}
    names = [name for name, _ in chooser.capacities()]
    assert sorted(names) == sorted([f"{wide}/entries", f"{wide}/bags", hot])


def test_mode_options_and_their_errors(mesh_of):
    mesh = mesh_of({"data": 2, "model": 4})
    with pytest.raises(UserInputError, match="exchange must be one of"):
        _collection(mesh, "bag")
    axes = tuple(mesh.axis_names)
    xla = EmbeddingCollection(  # auto offers bags only where they run: the fused kernel
        TABLES,
        FEATURES,
        {t.name: P.row_wise(axes) for t in TABLES},
        mesh,
        kernel="xla",
        exchange="auto",
    )
    assert {r.modes for r in xla.routes} == {("rows",)}
    half = EmbeddingCollection(  # rows over "model" only: replicas over "data", rows only
        TABLES,
        FEATURES,
        {t.name: P.row_wise(("model",)) for t in TABLES},
        mesh,
        exchange="auto",
    )
    assert {r.modes for r in half.routes} == {("rows",)}
    auto = _collection(mesh, "auto")
    group = auto.routes[0].group.name
    with pytest.raises(UserInputError, match="both a rows capacity and a bag capacity"):
        checked_capacities(auto, {group: 64, f"{group}/entries": 64})
    with pytest.raises(UserInputError, match="probe_steps=0"):
        CapacityChooser(auto, BATCH, probe_steps=0)
