"""DCNv2 cross layers, GateNet gates and the gated MLP against small numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lf_jax.models.interactions import MLP, CrossNetwork, EmbeddingGate


def randomized(module, seed=0):
    """``module`` with every parameter redrawn (gates start at zero kernels: a reference
    check on the initial values would not see the gate weights)."""
    graphdef, params = nnx.split(module)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def linear(layer, x):
    """numpy x W (+ b) of an nnx.Linear."""
    out = x @ np.asarray(layer.kernel[...], np.float64)
    return out if layer.bias is None else out + np.asarray(layer.bias[...], np.float64)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("low_rank", [0, 3])
def test_cross_network_matches_dcn_v2(low_rank):
    cross = randomized(CrossNetwork(6, num_layers=3, low_rank=low_rank, rngs=nnx.Rngs(0)))
    x0 = np.random.default_rng(1).normal(size=(5, 6))
    x = x0
    for layer in cross.layers:  # x_{l+1} = x0 * (W x_l + b) + x_l, W = U V^T when low rank
        mixed = linear(layer.up, linear(layer.down, x)) if low_rank else linear(layer.full, x)
        x = x0 * mixed + x
    got = np.asarray(cross(jnp.asarray(x0, jnp.float32)))
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
    if low_rank:
        assert cross.layers[0].down.kernel.shape == (6, low_rank)


@pytest.mark.parametrize("vector", [False, True])
def test_embedding_gate_matches_gatenet(vector):
    dims = (4, 2)
    gate = randomized(EmbeddingGate(dims, vector=vector, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(2)
    fields = [rng.normal(size=(3, d)) for d in dims]
    got = gate([jnp.asarray(f, jnp.float32) for f in fields])
    for layer, field, out in zip(gate.gates, fields, got, strict=True):
        scale = 2.0 * sigmoid(linear(layer, field))  # [B, 1] per field or [B, D] per dim
        assert scale.shape[1] == (field.shape[1] if vector else 1)
        np.testing.assert_allclose(np.asarray(out), field * scale, rtol=1e-5, atol=1e-5)


def test_gates_start_as_identity():
    rng = np.random.default_rng(3)
    field = rng.normal(size=(3, 4)).astype(np.float32)
    (out,) = EmbeddingGate((4,), vector=True, rngs=nnx.Rngs(0))([jnp.asarray(field)])
    np.testing.assert_allclose(np.asarray(out), field, rtol=1e-6)


def test_mlp_with_hidden_gates_matches_numpy():
    mlp = randomized(MLP(5, (4, 3), hidden_gates=True, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(4).normal(size=(6, 5))
    want = x
    for layer, gate in zip(mlp.layers, mlp.gates, strict=True):
        want = np.maximum(linear(layer, want), 0.0) * 2.0 * sigmoid(linear(gate, want))
    got = np.asarray(mlp(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
