"""The served forward pass, split into member, post and pair work, equals FeedRanker's on
every block combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lf_jax.models.ranker import FeedRanker
from lf_jax.serving.folded_ranker import post_side, split_logits, x0_kernels
from lf_jax.serving.ranker_split import Split

DIMS = {"member_id": 8, "actor_id": 8, "history": 8, "post_id": 8, "position": 4, "tag": 4}
MEMBER = ("member_id", "history", "position")
DENSE = ("post", "member", "pair", "post", "pair")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dcn_low_rank": 3, "gatenet_vector": True, "head_hidden": 5},
        {"dcn_layers": 0, "hidden_gates": False, "dot_interactions": False},
        {"gatenet": False, "mlp_dims": ()},
        {"dcn_layers": 1, "dcn_low_rank": 2, "num_dense": 0},
        {"dcn_layers": 3, "dcn_low_rank": 4, "mlp_dims": (16,)},
        {"mlp_dims": (), "dcn_low_rank": 2, "head_hidden": 3},
        {"mlp_dims": (), "dcn_layers": 0},
    ],
)
def test_split_logits_equal_the_model(options):
    options = {
        "mlp_dims": (16, 8),
        "dcn_layers": 2,
        "dot_interactions": True,
        "num_dense": len(DENSE),
        **options,
    }
    model = FeedRanker(field_dims=DIMS, tasks=("a", "b"), rngs=nnx.Rngs(0), **options)
    # nonzero gate kernels, so that the gates matter
    for path, leaf in nnx.iter_graph(model):
        if isinstance(leaf, nnx.Param):
            leaf[...] = leaf[...] + 0.1 * jax.random.normal(
                jax.random.key(len(path)), leaf[...].shape
            )
    dense_groups = DENSE if options["num_dense"] else ()
    split = Split.of(model, DIMS, member_fields=MEMBER, dense_groups=dense_groups)
    q, k, n = 3, 5, 11
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    member = {f: normal(q, DIMS[f]) for f in MEMBER}
    posts = {f: normal(n, d) for f, d in DIMS.items() if f not in MEMBER}
    chosen = rng.integers(0, n, q * k)
    member_dense, post_dense, pair_dense = (
        normal(rows, sum(g == group for g in dense_groups))
        for rows, group in ((q, "member"), (n, "post"), (q * k, "pair"))
    )
    # the model's inputs, every feature per pair
    every = {
        **{f: jnp.repeat(v, k, axis=0) for f, v in member.items()},
        **{f: v[chosen] for f, v in posts.items()},
    }
    parts = {
        "member": jnp.repeat(member_dense, k, axis=0),
        "post": post_dense[chosen],
        "pair": pair_dense,
    }
    used = dict.fromkeys(parts, 0)
    columns = []
    for group in dense_groups:
        columns.append(parts[group][:, used[group] : used[group] + 1])
        used[group] += 1
    dense = jnp.concatenate(columns, axis=-1) if columns else None
    expected = jax.jit(lambda: model(every, dense))()

    def served():
        kernels = x0_kernels(model, split)
        cache_nc = post_side(model, split, kernels, posts, post_dense if columns else None)
        return split_logits(
            model,
            split,
            member,
            member_dense if columns else None,
            cache_nc[chosen],
            pair_dense if columns else None,
            kernels=kernels,
            candidates=k,
        )

    got = jax.jit(served)()
    assert got.shape == (q * k, 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(expected))) > 0.1


def test_split_needs_the_models_fields_and_a_group_per_dense_column():
    model = FeedRanker(field_dims=DIMS, num_dense=2, tasks=("a",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must name the model's fields"):
        Split.of(model, {"member_id": 8}, member_fields=MEMBER, dense_groups=("post", "pair"))
    with pytest.raises(ValueError, match="dense_groups must give one of"):
        Split.of(model, DIMS, member_fields=MEMBER, dense_groups=("post",))
