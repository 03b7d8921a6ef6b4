"""A jitted lookup + loss + sparse update step compiles once and updates tables in place."""

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax import embedding as P
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing.compilation import count_compilations
from lf_jax.testing.embedding_oracle import random_batch

BATCH = 16
TABLES = [
    TableSpec(name="members", vocab_size=29, dim=8, optimizer=rowwise_adagrad(0.1)),
    TableSpec(name="tags", vocab_size=11, dim=8, optimizer=adam(0.01)),
    TableSpec(name="pos", vocab_size=5, dim=4, optimizer=sgd(0.1)),
]
FEATURES = [
    FeatureSpec(name="actor", table="members", max_ids=1),
    FeatureSpec(name="history", table="members", max_ids=4, combiner="mean", weighted=True),
    FeatureSpec(name="tags", table="tags", max_ids=3, combiner="none"),
    FeatureSpec(name="pos", table="pos", max_ids=1),
]
PLAN = {"members": P.row_wise(), "tags": P.table_wise(), "pos": P.data_parallel()}


def _buffer_pointers(array):
    return sorted(shard.data.unsafe_buffer_pointer() for shard in array.addressable_shards)


def test_train_step_compiles_once_and_donates_tables():
    mesh = make_mesh({"data": 2, "model": 4})
    coll = EmbeddingCollection(TABLES, FEATURES, PLAN, mesh)

    def train_step(state, batch, targets):
        def loss_fn(acts):
            return sum(jnp.mean((acts[k] - targets[k]) ** 2) for k in acts)

        acts = coll.lookup(state["tables"], batch)
        loss, grads = jax.value_and_grad(loss_fn)(acts)
        return coll.apply_gradients(state, batch, grads), loss

    step = jax.jit(train_step, donate_argnums=0)
    state = coll.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(4):  # host work first: only the step may compile inside the counter
        batch = coll.shard_batch(coll.preprocess(*random_batch(FEATURES, TABLES, BATCH, seed=i)))
        shapes = {
            f.name: (BATCH, f.max_ids, coll.tables[f.table].dim)
            if f.combiner == "none"
            else (BATCH, coll.tables[f.table].dim)
            for f in FEATURES
        }
        targets = {
            name: jax.device_put(
                rng.standard_normal(shape).astype(np.float32), coll.batch_sharding()
            )
            for name, shape in shapes.items()
        }
        inputs.append((batch, targets))

    losses = []
    with count_compilations() as counter:
        for batch, targets in inputs:
            old_tables = dict(state["tables"])
            old_slots = jax.tree.leaves(state["slots"])
            pointers = {name: _buffer_pointers(t) for name, t in old_tables.items()}
            state, loss = step(state, batch, targets)
            losses.append(float(loss))
            # Donated: the old table and slot buffers are gone, and the new tables live in
            # the very same device buffers (updated in place, no copy of the table).
            assert all(t.is_deleted() for t in old_tables.values())
            assert all(s.is_deleted() for s in old_slots)
            for name, table in state["tables"].items():
                assert _buffer_pointers(table) == pointers[name], name
    assert counter.count == 1, f"{counter.count} compilations for 4 steps"
    assert int(state["step"]) == 4
    assert np.all(np.isfinite(losses))

    # One more step after warm-up compiles nothing.
    with count_compilations() as counter:
        state, _ = step(state, *inputs[0])
    assert counter.count == 0
