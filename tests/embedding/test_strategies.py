"""Every sharding strategy against the numpy oracle, on meshes (8,), (4, 2) and (2, 4).

Each case builds one collection whose four tables use sgd, row-wise Adagrad (two tables
stacked in one group) and Adam, read by nine features covering every combiner, per-id
weights, padding, empty bags and duplicate ids. Over three steps with fresh batches it
checks the forward activations against ``oracle_lookup`` (first on row-id-coded tables,
then on the updated ones) and the logical tables and slots against ``oracle_step`` after
steps 1 and 3. Untouched rows must be bit-identical.
"""

import jax
import numpy as np
import pytest

from lf_jax import embedding as P
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing import embedding_oracle as oracle

BATCH = 16
STEPS = 3
MESHES = {"d8": {"data": 8}, "d4m2": {"data": 4, "model": 2}, "d2m4": {"data": 2, "model": 4}}
STRATEGIES = [
    "data_parallel",
    "table_wise",
    "row_wise",
    "row_wise_all",
    "column_wise2",
    "column_wise4",
    "table_wise_row_wise",
]
OPTIMIZERS = {"sgd": sgd(0.5), "adagrad": rowwise_adagrad(0.5), "adam": adam(0.1)}
VOCABS = (13, 19, 11, 7, 17, 5, 23)
POOLED = ("sum", "mean", "sqrtn")


def _specs():
    """One table per (strategy, optimizer), each read by a pooled and a sequence feature.

    Column-wise tables are 16 / 32 wide so their 8-wide pieces share stored groups with
    the other all-axes tables (fewer groups, faster compiles); the pooled combiner
    rotates so every optimizer sees every combiner.
    """
    tables, features = [], []
    for s, strategy_name in enumerate(STRATEGIES):
        for o, (opt_name, optimizer) in enumerate(OPTIMIZERS.items()):
            i = s * len(OPTIMIZERS) + o
            name = f"{strategy_name}_{opt_name}"
            dim = {"column_wise2": 16, "column_wise4": 32}.get(strategy_name, 8)
            tables.append(
                TableSpec(
                    name=name, vocab_size=VOCABS[i % len(VOCABS)], dim=dim, optimizer=optimizer
                )
            )
            features.append(
                FeatureSpec(
                    name=f"{name}_pool",
                    table=name,
                    max_ids=1 + i % 4,
                    combiner=POOLED[(s + o) % 3],
                    weighted=i % 2 == 0,
                )
            )
            features.append(
                FeatureSpec(
                    name=f"{name}_seq", table=name, max_ids=2, combiner="none", weighted=i % 2 == 1
                )
            )
    return tables, features


TABLES, FEATURES = _specs()


def strategy(name: str, mesh) -> dict:
    """One strategy dict per name, adapted to the mesh (row_wise 'model' -> 'data' on (8,))."""
    two_axes = "model" in mesh.shape
    if name == "data_parallel":
        return P.data_parallel()
    if name == "table_wise":
        return P.table_wise()
    if name == "row_wise":
        return P.row_wise(("model",) if two_axes else ("data",))
    if name == "row_wise_all":
        return P.row_wise(tuple(mesh.axis_names))
    if name.startswith("column_wise"):
        return P.column_wise(int(name[len("column_wise") :]))
    if name == "table_wise_row_wise":
        # (8,): all devices; (4, 2): rows over 'data' in model group 1 (devices 1,3,5,7);
        # (2, 4): rows over 'model' in data group 1 (devices 4..7).
        if not two_axes:
            return P.table_wise_row_wise(0, "data")
        if mesh.shape["model"] == 2:
            return P.table_wise_row_wise(1, "data")
        return P.table_wise_row_wise(1, "model")
    raise AssertionError(name)


def _grads_like(acts, coll, rng):
    return {
        k: jax.device_put(rng.standard_normal(v.shape).astype(np.float32), coll.batch_sharding())
        for k, v in acts.items()
    }


def assert_matches_oracle(
    coll,
    tables,
    features,
    steps=STEPS,
    seed=0,
    check_steps=(1, STEPS),
    batch_fn=None,
    shared_routing=False,
    capacities=None,
):
    """Runs ``steps`` lookups + updates on coll and the oracle and compares them.

    ``batch_fn(step) -> (raw ids, raw weights)`` replaces the random batches. With
    ``shared_routing`` the lookup and the update share ``coll.routing(batch,
    capacities)``. Returns the final engine state (for further checks).
    """
    plan = coll.plan
    logical = oracle.row_id_coded_tables(tables)
    state = coll.state_from_logical(logical)
    to_logical = jax.jit(coll.to_logical)  # one compile, unlike coll.logical_tables per call
    for name, value in jax.device_get(to_logical(state)["tables"]).items():
        np.testing.assert_array_equal(value, logical[name], err_msg=f"placement of {name}")
    lookup = jax.jit(coll.lookup)
    update = jax.jit(coll.apply_gradients, donate_argnums=0)
    routing = jax.jit(lambda batch: coll.routing(batch, capacities))
    o_tables = {k: v.astype(np.float64) for k, v in logical.items()}
    o_slots = oracle.init_slots(tables, plan)
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        raw = (
            batch_fn(step)
            if batch_fn
            else oracle.random_batch(features, tables, BATCH, seed=seed * 100 + step)
        )
        host = coll.preprocess(*raw)
        batch = coll.shard_batch(host)
        shared = routing(batch) if shared_routing else None
        acts = lookup(state["tables"], batch, shared)
        expected = oracle.oracle_lookup(features, o_tables, host)
        for f in features:
            np.testing.assert_allclose(
                np.asarray(acts[f.name]),
                expected[f.name],
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"step {step} forward {f.name} ({f.combiner}) via {plan[f.table]}",
            )
        grads = _grads_like(acts, coll, rng)
        touched = {
            k: t
            for k, (t, _) in oracle.row_gradients(
                features, tables, host, {k: np.asarray(v) for k, v in grads.items()}
            ).items()
        }
        previous = jax.device_get(to_logical(state)["tables"]) if step in check_steps else None
        state = update(state, batch, grads, routing=shared)
        o_tables, o_slots = oracle.oracle_step(
            o_tables,
            o_slots,
            features,
            tables,
            host,
            {k: np.asarray(v) for k, v in grads.items()},
            step=step,
            plan=plan,
        )
        if step not in check_steps:
            continue
        assert int(state["step"]) == step
        got = jax.device_get(to_logical(state))
        got_tables, got_slots = got["tables"], got["slots"]
        for name, value in got_tables.items():
            where = f"step {step} table {name} via {plan[name]}"
            np.testing.assert_allclose(value, o_tables[name], rtol=1e-5, atol=1e-5, err_msg=where)
            np.testing.assert_array_equal(
                value[~touched[name]],
                previous[name][~touched[name]],
                err_msg=f"{where}: untouched rows changed",
            )
        want_slots = oracle.logical_slots(o_slots, {t.name: t.dim for t in tables})
        assert set(got_slots) == set(want_slots)
        for name, slots in want_slots.items():
            for slot, value in slots.items():
                np.testing.assert_allclose(
                    got_slots[name][slot],
                    value,
                    rtol=1e-4,
                    atol=1e-7,
                    err_msg=f"step {step} slot {name}/{slot} via {plan[name]}",
                )
    return state


def plan_for(mesh) -> dict:
    """Each table gets the strategy its name starts with."""
    plan = {}
    for table in TABLES:
        strategy_name = next(
            s for s in sorted(STRATEGIES, key=len, reverse=True) if table.name.startswith(s + "_")
        )
        plan[table.name] = strategy(strategy_name, mesh)
    return plan


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_every_strategy_matches_oracle(mesh_name, mesh_of):
    """All strategies x all optimizers in one collection (one compile per mesh)."""
    mesh = mesh_of(MESHES[mesh_name])
    coll = EmbeddingCollection(TABLES, FEATURES, plan_for(mesh), mesh)
    strategies_seen = {coll.plan[t.name]["strategy"] for t in TABLES}
    assert strategies_seen == {
        "data_parallel",
        "table_wise",
        "row_wise",
        "column_wise",
        "table_wise_row_wise",
    }
    # Several tables (and strategies) are stacked into one stored group.
    assert any(len({p.table for p in g.pieces}) > 1 for g in coll.groups)
    assert_matches_oracle(coll, TABLES, FEATURES)


# A smaller collection for the 1-device comparison: one strategy per table, every
# optimizer, features sharing tables.
SMALL_TABLES = [
    TableSpec(name="rw", vocab_size=13, dim=8, optimizer=rowwise_adagrad(0.5)),
    TableSpec(name="tw", vocab_size=11, dim=8, optimizer=adam(0.1)),
    TableSpec(name="twrw", vocab_size=19, dim=8, optimizer=rowwise_adagrad(0.5)),
    TableSpec(name="dp", vocab_size=5, dim=4, optimizer=sgd(0.5)),
    TableSpec(name="cw", vocab_size=7, dim=8, optimizer=adam(0.1)),
]
SMALL_FEATURES = [
    FeatureSpec(name="actor", table="rw", max_ids=1),
    FeatureSpec(name="root_actor", table="rw", max_ids=1),
    FeatureSpec(name="history", table="rw", max_ids=4, combiner="mean", weighted=True),
    FeatureSpec(name="tags", table="tw", max_ids=3, combiner="sqrtn"),
    FeatureSpec(name="tag_seq", table="tw", max_ids=2, combiner="none", weighted=True),
    FeatureSpec(name="item", table="twrw", max_ids=2, combiner="sum", weighted=True),
    FeatureSpec(name="position", table="dp", max_ids=1),
    FeatureSpec(name="words", table="cw", max_ids=3, combiner="none"),
]


def small_plan(mesh) -> dict:
    axis = "model" if "model" in mesh.shape else "data"
    return {
        "rw": P.row_wise((axis,)),
        "tw": P.table_wise(),
        "twrw": P.table_wise_row_wise(0, axis),
        "dp": P.data_parallel(),
        "cw": P.column_wise(1),
    }


@pytest.mark.parametrize(
    "mesh_name,single", [("d8", {"data": 1}), ("d2m4", {"data": 1, "model": 1})]
)
def test_sharded_equals_unsharded(mesh_name, single, mesh_of):
    """The same specs and plan on 8 devices and on 1 device give the same state.

    column_wise(1) only: a 1-device mesh cannot hold more column pieces (PlanError).
    """
    one = make_mesh(single, devices=jax.devices()[:1])
    results = []
    for mesh in (mesh_of(MESHES[mesh_name]), one):
        coll = EmbeddingCollection(SMALL_TABLES, SMALL_FEATURES, small_plan(mesh), mesh)
        state = coll.init(jax.random.key(3))
        lookup = jax.jit(coll.lookup)
        update = jax.jit(coll.apply_gradients, donate_argnums=0)
        rng = np.random.default_rng(5)
        acts_seen = []
        for step in range(2):
            batch = coll.shard_batch(
                coll.preprocess(
                    *oracle.random_batch(SMALL_FEATURES, SMALL_TABLES, BATCH, seed=40 + step)
                )
            )
            acts = lookup(state["tables"], batch)
            acts_seen.append({k: np.asarray(v) for k, v in acts.items()})
            state = update(state, batch, _grads_like(acts, coll, rng))
        logical = jax.device_get(jax.jit(coll.to_logical)(state))
        results.append((acts_seen, logical["tables"], logical["slots"]))
    (acts_a, tables_a, slots_a), (acts_b, tables_b, slots_b) = results
    for step, (a, b) in enumerate(zip(acts_a, acts_b, strict=False)):
        for name in a:
            np.testing.assert_allclose(
                a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=f"step {step} feature {name}"
            )
    for name in tables_a:
        np.testing.assert_allclose(
            tables_a[name], tables_b[name], rtol=1e-5, atol=1e-6, err_msg=f"table {name}"
        )
        for slot in slots_a.get(name, {}):
            np.testing.assert_allclose(
                slots_a[name][slot],
                slots_b[name][slot],
                rtol=1e-5,
                atol=1e-7,
                err_msg=f"slot {name}/{slot}",
            )
