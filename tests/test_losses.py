"""Contrastive and scaled-cosine losses against numpy oracles; sharded == global."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.losses import (
    info_nce,
    info_nce_sharded,
    matryoshka_info_nce,
    scaled_cosine_bce,
    weighted_bce,
)


def _np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_info_nce(q, d, t, symmetric=False):
    logits = (q.astype(np.float64) @ d.T.astype(np.float64)) / t

    def ce(m):
        m = m - m.max(axis=1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return 0.5 * (ce(logits) + ce(logits.T)) if symmetric else ce(logits)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    return rng.standard_normal((16, 24)).astype(np.float32), rng.standard_normal((16, 24)).astype(
        np.float32
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_numpy(pair, symmetric):
    q, d = _np_unit(pair[0]), _np_unit(pair[1])
    got = float(info_nce(jnp.asarray(q), jnp.asarray(d), 0.1, symmetric=symmetric))
    assert got == pytest.approx(_np_info_nce(q, d, 0.1, symmetric), rel=1e-5)


def test_info_nce_perfect_match_is_near_zero():
    q = np.eye(8, dtype=np.float32)
    assert float(info_nce(jnp.asarray(q), jnp.asarray(q), 0.01)) < 1e-6


@pytest.mark.parametrize("symmetric", [False, True])
def test_sharded_info_nce_equals_global_value_and_gradient(pair, symmetric):
    mesh = make_mesh({"data": 4, "model": 2})
    q, d = jnp.asarray(pair[0]), jnp.asarray(pair[1])

    def global_loss(q, d):
        return info_nce(q, d, 0.2, symmetric=symmetric)

    def sharded_loss(q, d):
        return info_nce_sharded(q, d, 0.2, mesh, axis="data", symmetric=symmetric)

    value, grads = jax.value_and_grad(global_loss, argnums=(0, 1))(q, d)
    value_s, grads_s = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1)))(q, d)
    assert float(value_s) == pytest.approx(float(value), rel=1e-5)
    for g, gs in zip(grads, grads_s, strict=False):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(g), rtol=1e-4, atol=1e-6)


def test_matryoshka_matches_numpy_per_dim_and_weighted_mean(pair):
    q, d = pair
    dims, weights = (4, 8, 24), (1.0, 2.0, 1.0)
    loss, per_dim = matryoshka_info_nce(jnp.asarray(q), jnp.asarray(d), dims, 0.1, weights=weights)
    expected = [_np_info_nce(_np_unit(q[:, :k]), _np_unit(d[:, :k]), 0.1) for k in dims]
    np.testing.assert_allclose(np.asarray(per_dim), expected, rtol=1e-5)
    assert float(loss) == pytest.approx(np.dot(expected, weights) / sum(weights), rel=1e-5)
    mesh = make_mesh({"data": 8})
    loss_s, per_dim_s = jax.jit(
        lambda a, b: matryoshka_info_nce(a, b, dims, 0.1, weights=weights, mesh=mesh)
    )(q, d)
    np.testing.assert_allclose(np.asarray(per_dim_s), expected, rtol=1e-5)


def test_scaled_cosine_bce_matches_numpy(pair):
    a, b = pair
    labels = (np.arange(16) % 2).astype(np.float32)
    got = np.asarray(
        scaled_cosine_bce(jnp.asarray(a), jnp.asarray(b), jnp.asarray(labels), 7.0, -2.0)
    )
    cos = np.sum(_np_unit(a.astype(np.float64)) * _np_unit(b.astype(np.float64)), axis=1)
    p = 1 / (1 + np.exp(-(7.0 * cos - 2.0)))
    np.testing.assert_allclose(got, -(labels * np.log(p) + (1 - labels) * np.log(1 - p)), rtol=1e-5)


def test_weighted_bce_unchanged():
    logits = jnp.asarray([[0.0, 2.0], [-1.0, 3.0]])
    labels = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    p = 1 / (1 + np.exp(-np.asarray(logits)))
    oracle = -(np.asarray(labels) * np.log(p) + (1 - np.asarray(labels)) * np.log(1 - p)).mean(0)
    np.testing.assert_allclose(np.asarray(weighted_bce(logits, labels)), oracle, rtol=1e-6)
