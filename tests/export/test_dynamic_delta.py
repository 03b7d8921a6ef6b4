"""Delta export of a dynamic table: a base export at step 3 plus the increment of steps
4-6 equals a full export of the step-6 state, in the KV store and the vector index."""

import jax
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import row_wise
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError
from lf_jax.export.delta import export_delta, table_delta
from lf_jax.export.kv_store import KVStore
from lf_jax.export.scann_index import VectorIndex

DIM, BATCH = 4, 16


def _dyn():
    policy = DynamicPolicy(eviction="lru", probe_limit=4)
    spec = TableSpec(
        name="post", vocab_size=64, dim=DIM, optimizer=rowwise_adagrad(0.3), dynamic=policy
    )
    features = [FeatureSpec(name="p", table="post", max_ids=3)]
    coll = EmbeddingCollection([spec], features, {"post": row_wise("data")}, make_mesh({"data": 8}))
    return DynamicTables(coll)


def _train(dyn, state, steps, seed):
    @jax.jit
    def step(state, keys, grads):
        state, batch = dyn.resolve(state, keys)
        state["embedding"] = dyn.collection.apply_gradients(state["embedding"], batch, grads)
        return state

    rng = np.random.default_rng(seed)
    for t in range(steps):  # a moving window of keys: new, repeated and vanishing ones
        pool = np.arange(12 * t, 12 * t + 60, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        raw = {"p": [[int(k) for k in rng.choice(pool, rng.integers(1, 4))] for _ in range(BATCH)]}
        grads = {"p": rng.standard_normal((BATCH, DIM)).astype(np.float32)}
        state = step(state, dyn.shard_batch(dyn.preprocess(raw)), grads)
    return state


def _index_scores(index, queries):
    ids, scores = index.search(queries, k=index.count)
    return [
        dict(zip(i.tolist(), s.tolist(), strict=True)) for i, s in zip(ids, scores, strict=True)
    ]


def test_base_export_plus_delta_equals_full_export(tmp_path):
    dyn = _dyn()
    state3 = _train(dyn, dyn.init(jax.random.key(0)), 3, seed=0)
    state6 = _train(dyn, state3, 3, seed=1)

    with KVStore(tmp_path / "inc", dims=DIM) as inc, KVStore(tmp_path / "full", dims=DIM) as full:
        base = export_delta(dyn, state3, "post", since_step=-1, store=inc)
        first = table_delta(dyn, state3, "post", -1)
        index = VectorIndex.build(
            first.upsert_rows, [str(k) for k in first.upsert_keys], tune=False
        )
        assert base.step == 3 and base.upserts == base.alive == first.upsert_keys.size > 20
        counts = export_delta(dyn, state6, "post", since_step=base.step, store=inc, index=index)
        export_delta(dyn, state6, "post", since_step=-1, store=full)
        want = table_delta(dyn, state6, "post", -1)
        reference = VectorIndex.build(
            want.upsert_rows, [str(k) for k in want.upsert_keys], tune=False
        )

        # an increment, not a re-export: some rows unchanged, some keys gone
        assert 0 < counts.upserts < counts.alive and counts.deletes > 0
        assert counts.step == 6 and counts.alive == want.upsert_keys.size
        ids = full.ids()
        assert inc.ids() == ids == sorted(str(k) for k in want.upsert_keys)
        np.testing.assert_array_equal(inc.get(ids), full.get(ids))
        raw = inc.get_raw(ids).versions
        assert {"step-3", "step-6"} == set(raw.tolist())  # unchanged rows keep the base version
    assert sorted(index.ids.tolist()) == sorted(reference.ids.tolist())
    queries = np.random.default_rng(2).standard_normal((3, DIM)).astype(np.float32)
    got, expected = _index_scores(index, queries), _index_scores(reference, queries)
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        np.testing.assert_allclose([g[k] for k in e], list(e.values()), rtol=1e-6)


def test_delta_errors_name_the_field(tmp_path):
    dyn = _dyn()
    state = dyn.init(jax.random.key(0))
    with pytest.raises(UserInputError, match="'user' is not a dynamic table"):
        table_delta(dyn, state, "user", -1)
    with pytest.raises(UserInputError, match="since_step=5 is after the state's step 0"):
        table_delta(dyn, state, "post", 5)
    with pytest.raises(UserInputError, match="give a KV store"):
        export_delta(dyn, state, "post", since_step=-1)
