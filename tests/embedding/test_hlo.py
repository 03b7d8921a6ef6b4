"""Which collectives each strategy's lookup and sparse update compile to (CPU, 2 x 4 mesh).

Found on jax 0.10.2 CPU (per stored group):

    strategy                   lookup                          update
    data_parallel              none                            all-gather (8 devices)
    row_wise(("model",))       all-to-all (4)                  all-to-all (4) + all-gather (2)
    row_wise(all axes)         all-to-all (8)                  all-to-all (8)
    table_wise, column_wise,   same as row_wise(all axes)      same
    table_wise_row_wise

Each device sends its deduplicated ids only to their owners (all-to-all over the group's
axes) and gets the rows back (a second all-to-all); the update pushes each unique row's
gradient to its owner. Here the capacity covers every key a device can send (one round,
known while tracing). With a smaller capacity both the one-round exchange and the
sorted rounds are compiled (two all-to-alls each; one of them runs), plus all-reduces
of scalars and [S] vectors: whether one round fits, the round bounds and the "any
device still has keys" flag of the exchange loop. Replicated groups gather
the owners' received gradients over their replica axes. No strategy emits a
reduce-scatter or a collective-permute, and no collective carries a dense table
gradient: shapes do not depend on vocab_size. Per-device bytes, temporaries and flops
stay flat when the devices grow with the batch (the last test; bench/scaling.py for
8 ... 256 devices).
"""

import re

import jax
import numpy as np
import pytest

from lf_jax import embedding as P
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import lookup
from lf_jax.embedding.collection import EmbeddingCollection, SparseBatch
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing import hlo
from lf_jax.testing.abstract import abstract_state
from lf_jax.testing.embedding_oracle import random_batch

BATCH = 16
NONE = ("all-reduce", "all-to-all", "collective-permute")


def compiled_collectives(mesh, strategy, vocab_size=37):
    """(lookup ops, update ops) of a one-table collection with a pooled + a sequence feature."""
    tables = [TableSpec(name="t", vocab_size=vocab_size, dim=8, optimizer=rowwise_adagrad(0.1))]
    features = [
        FeatureSpec(name="bag", table="t", max_ids=3, combiner="mean"),
        FeatureSpec(name="seq", table="t", max_ids=2, combiner="none"),
    ]
    coll = EmbeddingCollection(tables, features, {"t": strategy}, mesh)
    state = abstract_state(coll)
    batch = coll.shard_batch(coll.preprocess(*random_batch(features, tables, BATCH)))
    grads = {
        "bag": jax.ShapeDtypeStruct((BATCH, 8), np.float32, sharding=coll.batch_sharding()),
        "seq": jax.ShapeDtypeStruct((BATCH, 2, 8), np.float32, sharding=coll.batch_sharding()),
    }
    lookup_ops = hlo.collective_ops(jax.jit(coll.lookup), state["tables"], batch)
    update_ops = hlo.collective_ops(
        jax.jit(coll.apply_gradients, donate_argnums=0), state, batch, grads
    )
    return coll, lookup_ops, update_ops


def kinds(ops):
    counts = dict.fromkeys(hlo.COLLECTIVES, 0)
    for op in ops:
        counts[op.kind] += 1
    return counts


def test_data_parallel_lookup_has_no_collectives(mesh_2x4):
    coll, lookup_ops, update_ops = compiled_collectives(mesh_2x4, P.data_parallel())
    assert [g.axes for g in coll.groups] == [()]
    assert lookup_ops == []
    # Every replica applies the same sparse update: each device's deduplicated row
    # gradients are all-gathered from all 8 devices, nothing else.
    counts = kinds(update_ops)
    assert counts["all-gather"] >= 1
    assert all(counts[k] == 0 for k in ("reduce-scatter",) + NONE), counts
    assert {op.group_size for op in update_ops} == {8}


def test_row_wise_over_some_axes_exchanges_within_them_and_syncs_replicas(mesh_2x4):
    coll, lookup_ops, update_ops = compiled_collectives(mesh_2x4, P.row_wise(("model",)))
    assert [g.axes for g in coll.groups] == [("model",)]
    sizes = lambda ops, kind: {op.group_size for op in ops if op.kind == kind}  # noqa: E731
    assert kinds(lookup_ops)["all-to-all"] == 2  # ids out, rows back
    assert sizes(lookup_ops, "all-to-all") == {4}
    assert kinds(lookup_ops)["all-reduce"] == 0  # one round, known while tracing
    assert kinds(update_ops)["all-to-all"] == 2  # rows and their gradients out
    assert sizes(update_ops, "all-to-all") == {4}
    assert sizes(update_ops, "all-gather") == {2}  # the group's replicas over "data"
    for ops in (lookup_ops, update_ops):
        assert kinds(ops)["reduce-scatter"] == kinds(ops)["collective-permute"] == 0


def test_small_capacity_compiles_one_round_and_sorted_rounds(monkeypatch, mesh_2x4):
    """Capacity 2 < the keys a device may send: both exchanges compile (one runs), with
    all-reduces over all devices for the fit flag, round bounds and loop flag."""
    monkeypatch.setattr(lookup, "capacity_for", lambda entries, share, rows: min(entries, 2))
    _, lookup_ops, update_ops = compiled_collectives(mesh_2x4, P.row_wise(("model",)))
    sizes = lambda ops, kind: {op.group_size for op in ops if op.kind == kind}  # noqa: E731
    assert kinds(lookup_ops)["all-to-all"] == 4  # two per exchange
    # the layout's asks (shared with a one-round loop) or the sorted rounds' asks, and the
    # gradients, in one loop
    assert kinds(update_ops)["all-to-all"] == 3
    for ops in (lookup_ops, update_ops):
        assert sizes(ops, "all-to-all") == {4}
        assert sizes(ops, "all-reduce") == {8}


def test_all_to_all_operands_are_not_recounted_per_peer(monkeypatch, mesh_2x4):
    """No fusion feeding an all-to-all computes on the whole [S, C(, D)] operand to output
    one peer's slice (both exchanges compiled: capacity 2). Such a fusion computes only
    its slice, but XLA's cost_analysis counts the whole producer once per peer: the
    compile-only flops of the step grew 2.5x from 8 to 64 devices (bench/scaling.py)."""
    monkeypatch.setattr(lookup, "capacity_for", lambda entries, share, rows: min(entries, 2))
    coll, _, _ = compiled_collectives(mesh_2x4, P.row_wise(("data", "model")))
    state = abstract_state(coll)
    batch = coll.shard_batch(
        coll.preprocess(
            *random_batch(list(coll.features.values()), list(coll.tables.values()), BATCH)
        )
    )

    def step(state, batch):
        acts = coll.lookup(state["tables"], batch)
        grads = jax.grad(lambda a: sum(jax.numpy.sum(v * v) for v in a.values()))(acts)
        return coll.apply_gradients(state, batch, grads)

    text = hlo.compiled_text(jax.jit(step, donate_argnums=0), state, batch)
    # lookup: the layout's asks, its rows back, the sorted rounds' asks and rows; update:
    # the layout's asks (the step shares no routing), the sorted rounds' asks, gradients
    assert hlo.count_collectives(text)["all-to-all"] == 7
    assert hlo.all_to_all_overcounted_producers(text) == []


@pytest.mark.parametrize(
    "strategy",
    [
        P.row_wise(("data", "model")),
        P.table_wise(),
        P.column_wise(2),
        P.table_wise_row_wise(1, "model"),
    ],
    ids=["row_wise_all", "table_wise", "column_wise2", "table_wise_row_wise"],
)
def test_all_axes_groups_exchange_ids_with_owners_only(strategy, mesh_2x4):
    coll, lookup_ops, update_ops = compiled_collectives(mesh_2x4, strategy)
    assert all(g.axes == ("data", "model") for g in coll.groups)
    for ops, all_to_all in ((lookup_ops, 2), (update_ops, 2)):
        counts = kinds(ops)
        assert counts["all-to-all"] == all_to_all * len(coll.groups), counts
        assert counts["all-gather"] == counts["reduce-scatter"] == 0, counts
        assert counts["collective-permute"] == 0, counts
        assert {op.group_size for op in ops} == {8}


@pytest.mark.parametrize(
    "strategy", [P.data_parallel(), P.row_wise(("model",))], ids=["data_parallel", "row_wise_model"]
)
def test_update_collectives_do_not_grow_with_vocab(strategy, mesh_2x4):
    """No dense table gradient: the same collectives, of the same shapes, at 37 and 40k rows."""

    def shapes(ops):
        return [(op.kind, op.line.split("=", 1)[1].split("(")[0]) for op in ops]

    _, small_lookup, small_update = compiled_collectives(mesh_2x4, strategy, vocab_size=37)
    _, big_lookup, big_update = compiled_collectives(mesh_2x4, strategy, vocab_size=40_000)
    assert shapes(small_update) == shapes(big_update)
    assert shapes(small_lookup) == shapes(big_lookup)


def _step_figures(num_devices: int, strategy, id_fill: float = 1.0) -> tuple[float, int, int]:
    """(flops, temp bytes, collective bytes received) per device of lookup + update with
    256 examples per device, compiled for the first ``num_devices`` devices."""
    mesh = make_mesh({"data": num_devices}, devices=jax.devices()[:num_devices])
    tables = [
        TableSpec(name=f"t{i}", vocab_size=4096, dim=16, optimizer=rowwise_adagrad(0.1))
        for i in range(4)
    ]
    features = [
        FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=10, combiner="sum") for i in range(4)
    ]
    plan = {t.name: strategy for t in tables}
    coll = EmbeddingCollection(tables, features, plan, mesh, id_fill=id_fill)
    size = 256 * num_devices
    ids = jax.ShapeDtypeStruct((size, 10), np.int32, sharding=coll.batch_sharding())
    weights = jax.ShapeDtypeStruct((size, 10), np.float32, sharding=coll.batch_sharding())
    batch = SparseBatch({f.name: ids for f in features}, {f.name: weights for f in features})

    def step(state, batch):
        acts = coll.lookup(state["tables"], batch)
        grads = jax.grad(lambda a: sum(jax.numpy.sum(v * v) for v in a.values()))(acts)
        return coll.apply_gradients(state, batch, grads)

    compiled = jax.jit(step, donate_argnums=0).lower(abstract_state(coll), batch).compile()
    cost = compiled.cost_analysis()
    received = hlo.collective_bytes(compiled.as_text())
    return cost["flops"], compiled.memory_analysis().temp_size_in_bytes, sum(received.values())


def test_per_device_cost_is_flat_in_the_device_count():
    """Same per-device batch on 2 and 8 devices, rows split over all of them: per-device
    flops, temporaries and received bytes grow by at most 1.3x (they grew ~4x when every
    device saw every id). Table-wise and replicated tables keep their inherent costs
    (an owner serves its table's ids of the whole batch), so they are not in this test.
    """
    strategy, small = P.row_wise(("data",)), 2
    flops_s, temp_s, comm_s = _step_figures(small, strategy)
    flops_8, temp_8, comm_8 = _step_figures(8, strategy)
    assert flops_8 <= 1.3 * flops_s, (flops_s, flops_8)
    assert temp_8 <= 1.3 * temp_s, (temp_s, temp_8)
    assert comm_8 <= 1.3 * comm_s * (8 - 1) / 8 / ((small - 1) / small), (comm_s, comm_8)


def test_exchange_buffers_follow_the_real_ids():
    """Capacities sized to half-full bags (id_fill 0.5) shrink the 8-device step's
    temporaries and received bytes (the [S, C] buffers) to under 0.8x those sized to the
    padded entries, so they cannot silently grow back to the padding."""
    strategy = P.row_wise(("data",))
    _, temp_full, comm_full = _step_figures(8, strategy)
    _, temp_half, comm_half = _step_figures(8, strategy, id_fill=0.5)
    assert temp_half < 0.8 * temp_full, (temp_half, temp_full)
    assert comm_half < 0.8 * comm_full, (comm_half, comm_full)


def test_parser_handles_async_and_tuple_forms():
    text = "\n".join(
        [
            "%all-gather-start = (f32[2]{0}, f32[16]{0}) all-gather-start(f32[2]{0} %p), "
            "replica_groups=[2,4]<=[8], dimensions={0}",
            "%all-gather-done = f32[16]{0} "
            "all-gather-done((f32[2]{0}, f32[16]{0}) %all-gather-start)",
            "%all-to-all = (f32[2,4]{1,0}, f32[2,4]{1,0}) all-to-all(%a, %b), "
            "replica_groups={{0,1},{2,3}}",
            "%gte = f32[2,4]{1,0} get-tuple-element(%all-to-all), index=0",
            "%rs = f32[1,4]{1,0} reduce-scatter(%x), replica_groups={{0,1,2,3,4,5,6,7}}, "
            'metadata={op_name="jit(f)/all-reduce("}',
            "%cp = f32[4]{0} collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}",
            "%ar = f32[4]{0} all-reduce(%x), replica_groups={}, to_apply=%add",
        ]
    )
    ops = hlo.parse_collectives(text)
    assert [op.kind for op in ops] == [
        "all-gather",
        "all-to-all",
        "reduce-scatter",
        "collective-permute",
        "all-reduce",
    ]
    assert [op.group_size for op in ops][:3] == [4, 2, 8]
    assert hlo.count_collectives(text) == {
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-reduce": 1,
        "all-to-all": 1,
        "collective-permute": 1,
    }


def test_collective_counts_of_plain_function(mesh_2x4):
    from jax.sharding import PartitionSpec

    def f(x):
        return jax.lax.psum(x, "model")

    fn = jax.shard_map(
        f,
        mesh=mesh_2x4,
        in_specs=PartitionSpec(("data", "model")),
        out_specs=PartitionSpec(("data", "model")),
    )
    counts = hlo.collective_counts(fn, np.ones((8, 4), np.float32))
    assert counts == {
        "all-gather": 0,
        "reduce-scatter": 0,
        "all-reduce": 1,
        "all-to-all": 0,
        "collective-permute": 0,
    }


@pytest.mark.parametrize(
    "strategy", [P.row_wise(axes=("data", "model")), P.row_wise(axes=("model",))], ids=str
)
def test_placing_and_reading_tables_never_gathers_a_table(strategy, mesh_2x4):
    """Rows are dealt round-robin over a group's slots: init, from_logical and to_logical
    must move them all-to-all, not gather whole tables on each device (which ran out of
    memory for 8 x 1e6 x 64 rows on 8 devices: 4 copies of all tables per device). Compile
    only; per-device temporaries stay within 4.5 times a device's share of the tables
    (found: init 4 shares, from_logical and to_logical about one)."""
    tables = [
        TableSpec(name=f"t{i}", vocab_size=64_000, dim=64, optimizer=rowwise_adagrad(0.1))
        for i in range(4)
    ]
    features = [FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=2) for i in range(4)]
    coll = EmbeddingCollection(tables, features, {t.name: strategy for t in tables}, mesh_2x4)
    (group,) = coll.groups
    share_bytes = sum(t.vocab_size * t.dim * 4 for t in tables) / group.num_slots
    state = abstract_state(coll)
    logical = jax.eval_shape(coll.to_logical, state)
    compiled = {
        "init": jax.jit(coll.init).lower(jax.random.key(0)).compile(),
        "from_logical": jax.jit(
            coll.from_logical,
            in_shardings=(coll.logical_shardings(),),
            out_shardings=coll.state_shardings(),
        )
        .lower(logical)
        .compile(),
        "to_logical": jax.jit(coll.to_logical, out_shardings=coll.logical_shardings())
        .lower(state)
        .compile(),
    }
    for name, exe in compiled.items():
        temp = exe.memory_analysis().temp_size_in_bytes
        assert temp < 4.5 * share_bytes, (name, temp, share_bytes)


@pytest.mark.parametrize("kernel", ["xla", "fused"])
def test_shared_routing_builds_the_layout_once_per_step(kernel, monkeypatch, mesh_2x4):
    """A step of lookup + update: each builds its own one-round layout (one sort of packed
    keys each, outside the fallback's conds; under the fused kernel one ``lf_jax_route``
    call each), or shares ``coll.routing(batch)`` (one)."""
    monkeypatch.setattr(lookup, "capacity_for", lambda entries, share, rows: min(entries, 2))
    tables = [TableSpec(name="t", vocab_size=37, dim=8, optimizer=rowwise_adagrad(0.1))]
    features = [FeatureSpec(name="bag", table="t", max_ids=3, combiner="sum")]
    coll = EmbeddingCollection(
        tables, features, {"t": P.row_wise(("data", "model"))}, mesh_2x4, kernel=kernel
    )
    layout_op = (
        r"sort\(.*/shard_map/jit\(sort\)/sort"
        if kernel == "xla"
        else r"custom_call_target=\"lf_jax_route\""
    )
    state = abstract_state(coll)
    batch = coll.shard_batch(coll.preprocess(*random_batch(features, tables, BATCH)))

    def layout_sorts(shared: bool) -> int:
        def step(state, batch):
            routing = coll.routing(batch) if shared else None
            acts = coll.lookup(state["tables"], batch, routing)
            grads = jax.tree.map(lambda a: 2 * a, acts)
            return coll.apply_gradients(state, batch, grads, routing=routing)

        text = jax.jit(step).lower(state, batch).compile().as_text()
        return len(re.findall(layout_op, text))

    assert layout_sorts(shared=False) == 2
    assert layout_sorts(shared=True) == 1
