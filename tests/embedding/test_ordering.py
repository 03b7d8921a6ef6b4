"""What multi-process runs do differently (lf_jax.embedding.ordering) changes no value: a
step with ``ordered()`` forced on (one process, 8 devices: the phases chained, the fused
sums as one [S, C, D] result; the dynamic tables' resolves chained) equals the step
without it, bit for bit, and its compiled program reads every later phase's inputs
through the chain."""

import jax
import numpy as np
import pytest

from lf_jax import embedding as P
from lf_jax.embedding import ordering
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.tables import DynamicTables
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


def _dynamic_collection(mesh, kernel):
    """Two dynamic tables in different groups (dims 4 and 8) and a static table."""
    policy = DynamicPolicy(eviction="lru", probe_limit=4)
    tables = [
        TableSpec(
            name="post", vocab_size=64, dim=4, optimizer=rowwise_adagrad(0.3), dynamic=policy
        ),
        TableSpec(name="member", vocab_size=32, dim=8, optimizer=adam(0.1), dynamic=policy),
        TableSpec(name="tag", vocab_size=13, dim=4, optimizer=rowwise_adagrad(0.2)),
    ]
    features = [
        FeatureSpec(name="p", table="post", max_ids=3),
        FeatureSpec(name="m", table="member", max_ids=2, combiner="mean"),
        FeatureSpec(name="t", table="tag", max_ids=2),
    ]
    axes = tuple(mesh.axis_names)
    plan = {"post": P.row_wise(axes), "member": P.row_wise(axes), "tag": P.row_wise(axes)}
    return DynamicTables(EmbeddingCollection(tables, features, plan, mesh, kernel=kernel))


@pytest.mark.parametrize("kernel", ["xla", "fused"])
def test_chained_resolves_change_no_value(kernel, monkeypatch, mesh_2x4):
    dyn = _dynamic_collection(mesh_2x4, kernel)
    coll = dyn.collection
    rng = np.random.default_rng(5)
    raws = [
        {
            "p": [[int(k) for k in rng.integers(0, 2**40, rng.integers(0, 4))] for _ in range(16)],
            "m": [[int(k) for k in rng.integers(0, 50, rng.integers(0, 3))] for _ in range(16)],
            "t": rng.integers(0, 13, (16, 2)),
        }
        for _ in range(3)
    ]

    def run(chained: bool):
        monkeypatch.setattr(ordering, "ordered", lambda: chained)

        def step(state, keys):  # a new function per run: jit's trace cache is per function
            state, batch = dyn.resolve(state, keys)
            acts = coll.lookup(state["embedding"]["tables"], batch)
            grads = jax.tree.map(lambda a: 0.5 * a + 1.0, acts)
            state["embedding"] = coll.apply_gradients(state["embedding"], batch, grads)
            return state, acts

        jitted = jax.jit(step)
        state = dyn.init(jax.random.key(0))
        for raw in raws:
            keys = dyn.shard_batch(dyn.preprocess(raw))
            state, acts = jitted(state, keys)
        return jax.device_get((state, acts)), jitted.lower(state, keys).as_text()

    (plain, plain_acts), plain_text = run(False)
    (chained, chained_acts), chained_text = run(True)
    for got, want in zip(jax.tree.leaves(chained), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(got, want)
    for name in plain_acts:
        np.testing.assert_array_equal(chained_acts[name], plain_acts[name])
    # the member resolve after the post resolve; every feature's ids after both
    assert plain_text.count("is_finite") == 0
    assert chained_text.count("is_finite") >= 1 + len(coll.features)
