import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lf_jax import embedding as emb
from lf_jax.distributed.mesh import make_mesh


@pytest.fixture(scope="module")
def collection():
    mesh = make_mesh({"data": 2, "model": 4})
    tables = [
        emb.TableSpec(name="member", vocab_size=100, dim=8, optimizer=emb.rowwise_adagrad(0.2))
    ]
    features = [
        emb.FeatureSpec(name="actor", table="member", max_ids=1),
        emb.FeatureSpec(name="history", table="member", max_ids=4, combiner="mean"),
    ]
    return emb.EmbeddingCollection(tables, features, {"member": emb.row_wise()}, mesh)


class Model(nnx.Module):
    def __init__(self, collection, rngs):
        self.embedding = emb.Embedding(collection, key=jax.random.key(0))
        self.head = nnx.Linear(16, 1, rngs=rngs)


def _loss(model, acts, labels):
    features = jnp.concatenate([acts["actor"], acts["history"]], axis=-1)
    return jnp.mean((model.head(features)[:, 0] - labels) ** 2)


@nnx.jit
def _train_step(model, optimizer, batch, labels):
    acts = model.embedding(batch)
    loss, (g_model, g_acts) = nnx.value_and_grad(_loss, argnums=(0, 1))(model, acts, labels)
    optimizer.update(model, g_model)
    model.embedding.apply_gradients(batch, g_acts)
    return loss


def _batch(collection, rng, size=32):
    actor = rng.integers(0, 100, size)
    raw = {"actor": actor, "history": rng.integers(0, 100, (size, 4))}
    return collection.shard_batch(collection.preprocess(raw)), actor


def test_layer_lookup_matches_collection(collection):
    layer = emb.Embedding(collection, key=jax.random.key(0))
    batch, _ = _batch(collection, np.random.default_rng(0))
    direct = collection.lookup(collection.init(jax.random.key(0))["tables"], batch)
    for name, value in layer(batch).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(direct[name]))


def test_nnx_grad_never_touches_tables(collection):
    model = Model(collection, nnx.Rngs(0))
    batch, actor = _batch(collection, np.random.default_rng(1))
    acts = model.embedding(batch)
    g_model = nnx.grad(_loss)(model, acts, jnp.zeros(32))
    leaves = jax.tree.leaves(nnx.state(g_model, emb.EmbeddingState))
    assert leaves == []
    assert jax.tree.leaves(nnx.state(g_model, nnx.Param))


def test_training_through_the_layer_learns_and_updates_only_touched_rows(collection):
    model = Model(collection, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(2)
    target = rng.normal(size=100).astype(np.float32)
    before = model.embedding.logical_tables()["member"]
    batch, actor = _batch(collection, rng)
    history = np.asarray(batch.ids["history"])
    first = float(_train_step(model, optimizer, batch, jnp.asarray(target[actor])))
    after_one = model.embedding.logical_tables()["member"]
    touched = np.zeros(100, bool)
    touched[actor] = True
    touched[history[history >= 0]] = True
    changed = np.any(after_one != before, axis=1)
    np.testing.assert_array_equal(changed, touched)
    losses = [first]
    for _ in range(40):
        batch, actor = _batch(collection, rng)
        losses.append(float(_train_step(model, optimizer, batch, jnp.asarray(target[actor]))))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert int(model.embedding.state.get_value()["step"]) == 41


def test_layer_needs_key_or_state(collection):
    with pytest.raises(ValueError, match="exactly one"):
        emb.Embedding(collection)
