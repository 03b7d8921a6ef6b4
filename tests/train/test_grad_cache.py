"""GradCache: k chunks give the gradient (and update) of the whole contrastive batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.distributed.mesh import make_mesh
from lf_jax.losses import matryoshka_info_nce
from lf_jax.train.grad_cache import grad_cache_value_and_grad, make_grad_cache_step
from lf_jax.train.step import init_train_state

DIMS = (4, 8, 16)


class TwoTower(nnx.Module):
    def __init__(self, rngs):
        self.member = nnx.Sequential(
            nnx.Linear(12, 32, rngs=rngs), nnx.tanh, nnx.Linear(32, 16, rngs=rngs)
        )
        self.item = nnx.Sequential(
            nnx.Linear(10, 32, rngs=rngs), nnx.tanh, nnx.Linear(32, 16, rngs=rngs)
        )


def embed_fn(model, micro_batch):
    return {"member": model.member(micro_batch["member"]), "item": model.item(micro_batch["item"])}


def loss_fn(reps, mesh=None):
    loss, per_dim = matryoshka_info_nce(reps["member"], reps["item"], DIMS, 0.1, mesh=mesh)
    return loss, per_dim


@pytest.fixture
def setup():
    graphdef, params = nnx.split(TwoTower(nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    batch = {
        "member": rng.standard_normal((64, 12)).astype(np.float32),
        "item": rng.standard_normal((64, 10)).astype(np.float32),
    }
    return graphdef, params, batch


def _chunks(batch, k):
    """[N, ...] -> [k, N/k, ...] so that flattening [b, k] gives back a permutation of rows."""
    return jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)


def _direct(graphdef, params, batch):
    def objective(p, b):
        return loss_fn(embed_fn(nnx.merge(graphdef, p), b))

    return jax.jit(jax.value_and_grad(objective, has_aux=True))(params, batch)


@pytest.mark.parametrize("k", [1, 4])
def test_grad_cache_gradient_equals_whole_batch(setup, k):
    graphdef, params, batch = setup
    (loss, per_dim), grads = _direct(graphdef, params, batch)
    (loss_gc, per_dim_gc), grads_gc = jax.jit(
        lambda p, b: grad_cache_value_and_grad(p, graphdef, embed_fn, loss_fn, b)
    )(params, _chunks(batch, k))
    assert float(loss_gc) == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(np.asarray(per_dim_gc), np.asarray(per_dim), rtol=1e-5)
    for g, g_gc in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_gc), strict=False):
        np.testing.assert_allclose(np.asarray(g_gc), np.asarray(g), rtol=1e-4, atol=1e-6)


def test_naive_accumulation_loses_negatives(setup):
    """Per-chunk losses averaged (what plain accumulation computes) differ: the test above can
    fail."""
    graphdef, params, batch = setup
    (_, _), grads = _direct(graphdef, params, batch)
    chunks = _chunks(batch, 4)
    naive = [
        _direct(graphdef, params, jax.tree.map(lambda x, i=i: x[i], chunks))[1] for i in range(4)
    ]
    naive = jax.tree.map(lambda *g: sum(g) / 4, *naive)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(naive), strict=False)
    )
    assert diff > 1e-3


def test_sharded_grad_cache_step_equals_one_big_step(setup):
    """8 devices, negatives gathered across the data axis, k=4 chunks == unsharded k=1 step."""
    graphdef, params, batch = setup
    tx = optax.adam(1e-2)
    mesh = make_mesh({"data": 8})
    one = make_grad_cache_step(graphdef, tx, embed_fn, loss_fn, donate=False)
    state_one, metrics_one = one(init_train_state(params, tx, {}), _chunks(batch, 1))
    sharded = make_grad_cache_step(graphdef, tx, embed_fn, lambda r: loss_fn(r, mesh), donate=False)
    placed = jax.device_put(_chunks(batch, 4), NamedSharding(mesh, PartitionSpec(None, "data")))
    state_k, metrics_k = sharded(init_train_state(params, tx, {}), placed)
    assert float(metrics_k["loss"]) == pytest.approx(float(metrics_one["loss"]), rel=1e-5)
    for a, b in zip(
        jax.tree.leaves(state_one["params"]), jax.tree.leaves(state_k["params"]), strict=False
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert int(state_k["step"]) == 1
