"""Exact gradient accumulation in the sparse update.

Semantics of ``apply_gradients(state, batch, grads, microbatched=True)``: ``batch`` ids /
weights are [k, B, L] and every activation gradient carries the same leading k axis
(k micro-batches of B examples, each split over the devices: ``shard_batch(batch,
leading_dims=1)``). The row gradients of all k micro-batches are summed per row and the
optimizer is applied ONCE, with the step counter advancing by one. This equals one call
on the concatenated [k*B] batch (for every optimizer, including row-wise Adagrad's
accumulator and Adam's moments and bias correction), and differs from k sequential
calls, which would apply k optimizer steps.
"""

import jax
import numpy as np

from lf_jax import embedding as P
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.preprocess import SparseBatch
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing import embedding_oracle as oracle

K, MICRO = 3, 8

TABLES = [
    TableSpec(name="users", vocab_size=13, dim=8, optimizer=sgd(0.5)),
    TableSpec(name="items", vocab_size=17, dim=8, optimizer=rowwise_adagrad(0.5)),
    TableSpec(name="tags", vocab_size=11, dim=8, optimizer=adam(0.1)),
    TableSpec(name="pos", vocab_size=5, dim=8, optimizer=rowwise_adagrad(0.5)),
]
FEATURES = [
    FeatureSpec(name="user", table="users", max_ids=1),
    FeatureSpec(name="friends", table="users", max_ids=3, combiner="mean", weighted=True),
    FeatureSpec(name="item_seq", table="items", max_ids=2, combiner="none"),
    FeatureSpec(name="items", table="items", max_ids=3, combiner="sqrtn", weighted=True),
    FeatureSpec(name="tags", table="tags", max_ids=3, combiner="sum"),
    FeatureSpec(name="tag_seq", table="tags", max_ids=2, combiner="none", weighted=True),
    FeatureSpec(name="pos", table="pos", max_ids=1, combiner="sum"),
]
PLAN = {
    "users": P.row_wise(),
    "items": P.column_wise(2),
    "tags": P.table_wise_row_wise(1),
    "pos": P.data_parallel(),
}


def _out_shape(feature, batch):
    return (batch, feature.max_ids, 8) if feature.combiner == "none" else (batch, 8)


def test_microbatched_update_equals_one_big_batch():
    mesh = make_mesh({"data": 2, "model": 4})
    coll = EmbeddingCollection(TABLES, FEATURES, PLAN, mesh)
    rng = np.random.default_rng(0)
    micro = [
        coll.preprocess(*oracle.random_batch(FEATURES, TABLES, MICRO, seed=10 + i))
        for i in range(K)
    ]
    grads_k = {
        f.name: rng.standard_normal((K, *_out_shape(f, MICRO))).astype(np.float32) for f in FEATURES
    }
    stacked = SparseBatch(
        {n: np.stack([m.ids[n] for m in micro]) for n in coll.features},
        {n: np.stack([m.weights[n] for m in micro]) for n in coll.features},
    )
    flat = SparseBatch(
        {n: v.reshape(K * MICRO, -1) for n, v in stacked.ids.items()},
        {n: v.reshape(K * MICRO, -1) for n, v in stacked.weights.items()},
    )
    grads_flat = {n: g.reshape(K * MICRO, *g.shape[2:]) for n, g in grads_k.items()}

    logical = oracle.row_id_coded_tables(TABLES)
    # Start from used slots (Adagrad accumulators and Adam moments away from their
    # initial values, step 4) so the comparison exercises the slot arithmetic.
    engine_slots = {
        "items": {"accumulator": rng.uniform(0.1, 1.0, 17)},
        "pos": {"accumulator": rng.uniform(0.1, 1.0, 5)},
        "tags": {"mu": rng.standard_normal((11, 8)) * 0.1, "nu": rng.uniform(0.0, 0.1, (11, 8))},
    }
    slots = {"users": {}, **{k: dict(v) for k, v in engine_slots.items()}}
    # The engine places a logical column_wise accumulator [V] into every column piece.
    slots["items"]["accumulator"] = np.repeat(engine_slots["items"]["accumulator"][:, None], 2, 1)
    state = coll.state_from_logical(logical, engine_slots, step=4)

    batch_sharding = coll.batch_sharding(leading_dims=1)
    accumulated = jax.jit(coll.apply_gradients, static_argnames="microbatched")(
        state,
        coll.shard_batch(stacked, leading_dims=1),
        {n: jax.device_put(g, batch_sharding) for n, g in grads_k.items()},
        microbatched=True,
    )
    one_batch = jax.jit(coll.apply_gradients)(
        state,
        coll.shard_batch(flat),
        {n: jax.device_put(g, coll.batch_sharding()) for n, g in grads_flat.items()},
    )
    assert int(accumulated["step"]) == int(one_batch["step"]) == 5

    to_logical = jax.jit(coll.to_logical)
    got_acc = jax.device_get(to_logical(accumulated))
    got_one = jax.device_get(to_logical(one_batch))
    want_tables, want_slots = oracle.oracle_step(
        logical, slots, FEATURES, TABLES, flat, grads_flat, step=5, plan=PLAN
    )
    want_slots = oracle.logical_slots(want_slots, {t.name: t.dim for t in TABLES})
    for name in logical:
        np.testing.assert_allclose(
            got_acc["tables"][name],
            got_one["tables"][name],
            rtol=1e-6,
            atol=1e-6,
            err_msg=f"accumulated vs one batch: {name}",
        )
        np.testing.assert_allclose(
            got_acc["tables"][name],
            want_tables[name],
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"accumulated vs oracle: {name}",
        )
    for name, table_slots in want_slots.items():
        for slot, value in table_slots.items():
            np.testing.assert_allclose(
                got_acc["slots"][name][slot],
                got_one["slots"][name][slot],
                rtol=1e-6,
                atol=1e-8,
                err_msg=f"{name}/{slot}",
            )
            np.testing.assert_allclose(
                got_acc["slots"][name][slot],
                value,
                rtol=1e-4,
                atol=1e-7,
                err_msg=f"oracle {name}/{slot}",
            )

    # k sequential single-batch updates are a different thing (k optimizer steps):
    sequential = state
    update = jax.jit(coll.apply_gradients)
    for i in range(K):
        sequential = update(
            sequential,
            coll.shard_batch(micro[i]),
            {n: jax.device_put(g[i], coll.batch_sharding()) for n, g in grads_k.items()},
        )
    assert int(sequential["step"]) == 4 + K
    got_seq = jax.device_get(to_logical(sequential))
    assert not np.allclose(got_seq["tables"]["tags"], got_acc["tables"]["tags"], atol=1e-4)
