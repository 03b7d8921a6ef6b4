"""FeedRanker blocks against numpy: pairwise dot interactions, switchable blocks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lf_jax.models.interactions import pairwise_dots
from lf_jax.models.ranker import FeedRanker


def test_pairwise_dots_match_numpy_and_skip_mismatched_widths():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((5, 4)).astype(np.float32) for _ in range(3))
    narrow = rng.standard_normal((5, 2)).astype(np.float32)
    dots = np.asarray(pairwise_dots([jnp.asarray(x) for x in (a, narrow, b, c)]))
    expected = np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], axis=1)
    np.testing.assert_allclose(dots, expected, rtol=1e-5, atol=1e-6)
    assert pairwise_dots([jnp.asarray(a), jnp.asarray(narrow)]).shape == (5, 0)


@pytest.mark.parametrize("dots", [False, True])
def test_ranker_input_width_counts_dot_products(dots):
    dims = {"member": 4, "actor": 4, "position": 2}
    ranker = FeedRanker(
        field_dims=dims,
        num_dense=3,
        tasks=("like", "share"),
        mlp_dims=(8,),
        dcn_layers=1,
        gatenet=False,
        hidden_gates=False,
        dot_interactions=dots,
        rngs=nnx.Rngs(0),
    )
    width = 4 + 4 + 2 + 3 + (1 if dots else 0)  # member.actor is the only same-width pair
    assert ranker.cross.layers[0].full.kernel.shape == (width, width)
    rng = np.random.default_rng(1)
    fields = {
        name: jnp.asarray(rng.standard_normal((6, d)), jnp.float32) for name, d in dims.items()
    }
    dense = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    logits = ranker(fields, dense)
    assert logits.shape == (6, 2) and np.isfinite(np.asarray(logits)).all()
