"""The folded serving forward pass equals FeedRanker's on every block combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lf_jax.models.ranker import FeedRanker
from lf_jax.serving.folded_ranker import folded_logits

DIMS = {"member_id": 8, "actor_id": 8, "history": 8, "post_id": 8, "position": 4}
MEMBER = ("member_id", "history", "position")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dcn_low_rank": 3, "gatenet_vector": True, "head_hidden": 5},
        {"dcn_layers": 0, "hidden_gates": False, "dot_interactions": False},
        {"gatenet": False, "mlp_dims": ()},
        {"dcn_layers": 1, "dcn_low_rank": 2, "num_dense": 0},
    ],
)
def test_folded_logits_equal_the_model(options):
    options = {
        "mlp_dims": (16, 8),
        "dcn_layers": 2,
        "dot_interactions": True,
        "num_dense": 3,
        **options,
    }
    model = FeedRanker(field_dims=DIMS, tasks=("a", "b"), rngs=nnx.Rngs(0), **options)
    # nonzero gate kernels, so that the gates matter
    for path, leaf in nnx.iter_graph(model):
        if isinstance(leaf, nnx.Param):
            leaf[...] = leaf[...] + 0.1 * jax.random.normal(
                jax.random.key(len(path)), leaf[...].shape
            )
    q, k = 3, 5
    rng = np.random.default_rng(0)
    member = {n: jnp.asarray(rng.normal(size=(q, DIMS[n])), jnp.float32) for n in MEMBER}
    pair = {
        n: jnp.asarray(rng.normal(size=(q * k, d)), jnp.float32)
        for n, d in DIMS.items()
        if n not in MEMBER
    }
    dense = jnp.asarray(rng.normal(size=(q * k, 3)), jnp.float32) if options["num_dense"] else None
    every = {**pair, **{n: jnp.repeat(v, k, axis=0) for n, v in member.items()}}
    expected = jax.jit(lambda: model(every, dense))()
    folded = jax.jit(lambda: folded_logits(model, member, pair, dense, candidates=k))()
    assert folded.shape == (q * k, 2)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(expected), atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(expected))) > 0.1


def test_folded_logits_need_every_field_once():
    model = FeedRanker(field_dims=DIMS, num_dense=0, tasks=("a",), rngs=nnx.Rngs(0))
    member = {"member_id": jnp.zeros((1, 8)), "position": jnp.zeros((1, 4))}
    with pytest.raises(ValueError, match=r"missing \['actor_id', 'history', 'post_id'\]"):
        folded_logits(model, member, {}, None, candidates=2)
