"""Sharded encoders == unsharded: BERT and Llama under every placement mode on 8 CPU devices."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lf_jax.distributed.mesh import make_mesh
from lf_jax.errors import UserInputError
from lf_jax.models.bert import BertConfig, BertEncoder
from lf_jax.models.causal_lm import load_llama
from lf_jax.models.encoder_sharding import encoder_shardings, init_sharded_encoder, shard_encoder
from lf_jax.models.hf_weights import build_with_arrays

TINY_LLAMA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "tiny_llama")
BERT = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
)

# (mode, mesh shape, expected spec of layer 0's query kernel [D, H, Dh] and of the
# token embedding table [V, D]).
CASES = [
    ("replicated", (8, 1), P(None, None, None), P(None, None)),
    ("fsdp", (8, 1), P("data", None, None), P(None, "data")),
    ("tensor", (2, 4), P(None, "model", None), P("model", None)),
    ("fsdp_tensor", (4, 2), P("data", "model", None), P("model", "data")),
]


def _random_bert() -> BertEncoder:
    """BertEncoder with N(0, 0.3^2) numpy weights: no init program to compile."""
    rng = np.random.default_rng(3)
    abstract = nnx.eval_shape(lambda: BertEncoder(BERT, rngs=nnx.Rngs(0)))
    arrays = {
        path: rng.normal(0, 0.3, v.get_value().shape).astype(np.float32)
        for path, v in nnx.to_flat_state(nnx.state(abstract))
    }
    return build_with_arrays(lambda: BertEncoder(BERT, rngs=nnx.Rngs(0)), arrays, source="test")


@pytest.fixture(scope="module")
def models():
    """Unsharded (single-device) models, a batch of 8 right-padded rows and the outputs."""
    rng = np.random.default_rng(0)
    lengths = np.array([12, 3, 7, 12, 1, 9, 5, 11])
    mask_bl = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int32)
    bert = _random_bert()
    llama, _ = load_llama(TINY_LLAMA)
    out = {}
    for kind, model, vocab, table in (
        ("bert", bert, 64, "word_embeddings"),
        ("llama", llama, 512, "embed_tokens"),
    ):
        ids_bl = rng.integers(1, vocab, (8, 12)).astype(np.int32) * mask_bl
        out[kind] = dict(
            model=model,
            ids=ids_bl,
            mask=mask_bl,
            table=table,
            hidden=_forward(model, ids_bl, mask_bl),
            grads=_gradients(model, ids_bl, mask_bl) if kind == "llama" else None,
        )
    return out


def _batch(ids_bl, mask_bl, mesh):
    if mesh is None:
        return ids_bl, mask_bl
    batch = NamedSharding(mesh, P("data"))
    return jax.device_put(ids_bl, batch), jax.device_put(mask_bl, batch)


def _forward(model, ids_bl, mask_bl, mesh=None):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return np.asarray(forward(state, *_batch(ids_bl, mask_bl, mesh)))


def _gradients(model, ids_bl, mask_bl, mesh=None):
    """Gradients of a fixed random projection of the real tokens' hidden states."""
    graphdef, state = nnx.split(model)

    def loss(state, ids_bl, mask_bl):
        hidden_bld = nnx.merge(graphdef, state)(ids_bl, mask_bl)
        weights_bld = jnp.sin(jnp.arange(hidden_bld.size, dtype=jnp.float32)).reshape(
            hidden_bld.shape
        )
        return jnp.sum(hidden_bld * weights_bld * mask_bl[..., None]) / jnp.sum(mask_bl)

    grads = jax.jit(jax.grad(loss))(state, *_batch(ids_bl, mask_bl, mesh))
    return [(path, np.asarray(v.get_value())) for path, v in nnx.to_flat_state(grads)]


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("mode,shape,q_spec,table_spec", CASES, ids=[c[0] for c in CASES])
def test_sharded_equals_unsharded(models, kind, mode, shape, q_spec, table_spec):
    base = models[kind]
    mesh = make_mesh({"data": shape[0], "model": shape[1]})
    model = shard_encoder(nnx.clone(base["model"]), mesh, mode)
    q_kernel = model.layers[0].q_kernel[...]
    assert q_kernel.sharding.is_equivalent_to(NamedSharding(mesh, q_spec), 3), q_kernel.sharding
    table = getattr(model, base["table"])[...]
    assert table.sharding.is_equivalent_to(NamedSharding(mesh, table_spec), 2), table.sharding
    got_bld = _forward(model, base["ids"], base["mask"], mesh)
    np.testing.assert_allclose(got_bld, base["hidden"], atol=1e-5)
    if base["grads"] is not None and mode == "fsdp_tensor":  # the backward pass agrees too
        got = _gradients(model, base["ids"], base["mask"], mesh)
        for (path, want_grad), (_, got_grad) in zip(base["grads"], got, strict=False):
            np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_indivisible_dims_are_reported_or_refused(models):
    llama = models["llama"]["model"]
    mesh = make_mesh({"data": 2, "model": 4})
    shardings, notes = encoder_shardings(llama, mesh, "tensor")
    # 2 kv heads cannot split over 4 model devices: k and v kernels of both layers stay whole.
    assert len(notes) == 4 and all("kv_heads" in note and "size 2" in note for note in notes)
    k_spec = shardings["layers"][0]["k_kernel"].get_value().spec
    assert tuple(k_spec) in ((None, None, None), ())
    with pytest.raises(UserInputError, match="k_kernel: dim 1 .kv_heads, size 2."):
        encoder_shardings(llama, mesh, "tensor", strict=True)
    with pytest.raises(UserInputError, match="mode='rows'"):
        shard_encoder(llama, mesh, "rows")


def test_loaded_straight_into_shards(models):
    mesh = make_mesh({"data": 4, "model": 2})
    llama, _ = load_llama(TINY_LLAMA, mesh=mesh, mode="fsdp")
    down = llama.layers[0].down_kernel[...]
    assert down.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 2)
    for (path, want), (_, got) in zip(
        nnx.to_flat_state(nnx.state(models["llama"]["model"])),
        nnx.to_flat_state(nnx.state(llama)),
        strict=False,
    ):
        np.testing.assert_array_equal(
            np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(path)
        )


def test_created_straight_into_shards():
    config = BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    mesh = make_mesh({"data": 4, "model": 2})
    model = init_sharded_encoder(lambda: BertEncoder(config, rngs=nnx.Rngs(0)), mesh, "fsdp_tensor")
    mlp_in = model.layers[0].mlp_in_kernel[...]
    assert mlp_in.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)
    assert model.word_embeddings[...].sharding.is_equivalent_to(
        NamedSharding(mesh, P("model", "data")), 2
    )
    np.testing.assert_array_equal(np.asarray(model.layers[0].out_ln_scale[...]), np.ones(8))
    assert 0.005 < float(np.std(np.asarray(mlp_in))) < 0.05  # N(0, 0.02^2) init
