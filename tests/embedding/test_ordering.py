"""What multi-process runs do differently (lf_jax.embedding.ordering) changes no value: a
step with ``ordered()`` forced on (one process, 8 devices: the phases chained, the fused
sums as one [S, C, D] result) equals the step without it, bit for bit, and its compiled
program reads every later group's inputs through the chain."""

import jax
import numpy as np
import pytest

from lf_jax import embedding as P
from lf_jax.embedding import ordering
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing.embedding_oracle import random_batch

BATCH = 32


def _collection(mesh, kernel):
    """Three groups: rows spread over the mesh (Adagrad), a replicated table (Adam), and
    rows over the 'model' axis only (replicas over 'data')."""
    tables = [
        TableSpec(name="spread", vocab_size=61, dim=8, optimizer=rowwise_adagrad(0.3)),
        TableSpec(name="copies", vocab_size=11, dim=4, optimizer=adam(0.1)),
        TableSpec(name="model_rows", vocab_size=29, dim=16, optimizer=rowwise_adagrad(0.2)),
    ]
    features = [
        FeatureSpec(name="a", table="spread", max_ids=5, combiner="sum"),
        FeatureSpec(name="b", table="copies", max_ids=3, combiner="mean"),
        FeatureSpec(name="c", table="model_rows", max_ids=4, combiner="sum"),
    ]
    plan = {
        "spread": P.row_wise(("data", "model")),
        "copies": P.data_parallel(),
        "model_rows": P.row_wise(("model",)),
    }
    return EmbeddingCollection(tables, features, plan, mesh, kernel=kernel), features, tables


def _step(coll):
    def step(state, batch):
        routing = coll.routing(batch)
        acts = coll.lookup(state["tables"], batch, routing)
        grads = jax.tree.map(lambda a: 0.5 * a + 1.0, acts)
        return coll.apply_gradients(state, batch, grads, routing=routing), acts

    return jax.jit(step)


@pytest.mark.parametrize("kernel", ["xla", "fused"])
def test_chained_phases_change_no_value(kernel, monkeypatch, mesh_2x4):
    coll, features, tables = _collection(mesh_2x4, kernel)
    batches = [
        coll.shard_batch(coll.preprocess(*random_batch(features, tables, BATCH, seed=seed)))
        for seed in (3, 4)
    ]

    def run(chained: bool):
        monkeypatch.setattr(ordering, "ordered", lambda: chained)
        step = _step(coll)
        state = coll.init(jax.random.key(0))
        for batch in batches:
            state, acts = step(state, batch)
        text = step.lower(state, batches[0]).as_text()
        return jax.device_get((state, acts)), text

    (plain, plain_acts), plain_text = run(False)
    (chained, chained_acts), chained_text = run(True)
    for name in plain["tables"]:
        np.testing.assert_array_equal(chained["tables"][name], plain["tables"][name])
        for slot in plain["slots"][name]:
            np.testing.assert_array_equal(chained["slots"][name][slot], plain["slots"][name][slot])
    for name in plain_acts:
        np.testing.assert_array_equal(chained_acts[name], plain_acts[name])
    # the chain's reads: isfinite of one element of the previous phase's outputs, per
    # later group of the forward (after the routing) and of the update
    assert plain_text.count("is_finite") == 0
    assert chained_text.count("is_finite") >= 2 * (len(coll.routes) - 1)
