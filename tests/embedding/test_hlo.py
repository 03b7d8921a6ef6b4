"""Which collectives each strategy's lookup and sparse update compile to (CPU, 2 x 4 mesh).

Found on jax 0.10.2 CPU (per stored group; B = local batch, E = entries per example):

    strategy                   lookup                                  update
    data_parallel              none                                    all-gather x4 (8 devices)
    row_wise(("model",))       all-gather x3 + reduce-scatter (4 dev)  all-gather x4 (8 devices)
    row_wise(all axes)         all-gather x3 + reduce-scatter (8 dev)  all-gather x4 (8 devices)
    table_wise                 same as row_wise(all axes)              same
    column_wise(n)             same as row_wise(all axes)              same
    table_wise_row_wise        same as row_wise(all axes)              same

The lookup gathers (slot, local row, coef) per entry over the group's axes and
reduce-scatters the partial bags back; the update gathers entries and activation
gradients from every device. No strategy emits all-reduce, all-to-all or
collective-permute: there is no dense table gradient anywhere, and the update's
collectives do not depend on vocab_size.
"""

import jax
import numpy as np
import pytest

from lf_jax.embedding import plan as P
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing import hlo
from lf_jax.testing.embedding_oracle import random_batch

BATCH = 16
NONE = ("all-reduce", "all-to-all", "collective-permute")


def abstract_state(coll):
    """ShapeDtypeStructs (with shardings) of the collection's state: compile, never run."""
    shardings = coll.state_shardings()
    state = {
        "tables": {},
        "slots": {},
        "step": jax.ShapeDtypeStruct((), np.int32, sharding=shardings["step"]),
    }
    for group in coll.groups:
        state["tables"][group.name] = jax.ShapeDtypeStruct(
            group.shape, np.float32, sharding=shardings["tables"][group.name]
        )
        state["slots"][group.name] = {
            name: jax.ShapeDtypeStruct(
                (group.num_slots, group.rows, *shape),
                np.float32,
                sharding=shardings["slots"][group.name][name],
            )
            for name, shape in group.optimizer.slot_shapes(group.dim).items()
        }
    return state


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
    # Every replica applies the same sparse update: entries and activation grads are
    # all-gathered from all 8 devices, nothing else.
    counts = kinds(update_ops)
    assert counts["all-gather"] >= 1
    assert all(counts[k] == 0 for k in ("reduce-scatter",) + NONE), counts
    assert {op.group_size for op in update_ops} == {8}


@pytest.mark.parametrize(
    "strategy,group_size",
    [
        (P.row_wise(("model",)), 4),
        (P.row_wise(("data", "model")), 8),
        (P.table_wise(), 8),
        (P.column_wise(2), 8),
        (P.table_wise_row_wise(1, "model"), 8),
    ],
    ids=["row_wise_model", "row_wise_all", "table_wise", "column_wise2", "table_wise_row_wise"],
)
def test_sharded_lookup_gathers_and_reduce_scatters(strategy, group_size, mesh_2x4):
    coll, lookup_ops, update_ops = compiled_collectives(mesh_2x4, strategy)
    counts = kinds(lookup_ops)
    # Route: ids (slot, local row, coef) all-gathered over the group's axes;
    # combine: one reduce-scatter of the partial bags per stored group.
    assert counts["all-gather"] >= 1, counts
    assert counts["reduce-scatter"] == len(coll.groups), counts
    assert all(counts[k] == 0 for k in NONE), counts
    assert {op.group_size for op in lookup_ops} == {group_size}
    update_counts = kinds(update_ops)
    assert update_counts["all-gather"] >= 1
    assert all(update_counts[k] == 0 for k in ("reduce-scatter",) + NONE), update_counts
    assert {op.group_size for op in update_ops} == {8}


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


def test_parser_handles_async_and_tuple_forms():
    text = "\n".join(
        [
            "%all-gather-start = (f32[2]{0}, f32[16]{0}) all-gather-start(f32[2]{0} %p), "
            "replica_groups=[2,4]<=[8], dimensions={0}",
            "%all-gather-done = f32[16]{0} all-gather-done((f32[2]{0}, f32[16]{0}) "
            "%all-gather-start)",
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
