"""BERT encoder: parity with sentence-transformers on all-MiniLM-L6-v2, loader and input checks."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from lf_jax.errors import UserInputError
from lf_jax.models import sentence_encoder
from lf_jax.models.attention import l2_normalize, mean_pool
from lf_jax.models.bert import BertConfig, BertEncoder, load_bert
from lf_jax.models.sentence_encoder import SentenceEncoder, load_sentence_encoder

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_encoder("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def reference():
    data = np.load(os.path.join(FIXTURES, "minilm_reference.npz"))
    return json.loads(str(data["sentences_json"])), data["embeddings"]


def test_minilm_matches_sentence_transformers(minilm, reference):
    sentences, expected_nd = reference
    got_nd = minilm.encode(sentences, batch_size=8)
    assert got_nd.shape == expected_nd.shape == (16, 384) and got_nd.dtype == np.float32
    cosine_n = (got_nd * expected_nd).sum(1) / (
        np.linalg.norm(got_nd, axis=1) * np.linalg.norm(expected_nd, axis=1)
    )
    assert cosine_n.min() >= 0.9999, cosine_n
    np.testing.assert_allclose(np.linalg.norm(got_nd, axis=1), 1.0, atol=1e-5)
    # The reference padded each batch to its longest text, we pad to a power of two (32 for
    # the first batch), so padding did not matter; nor may the order of rows in a batch.
    again_nd = minilm.encode(sentences[7::-1], batch_size=8)[::-1]
    np.testing.assert_allclose(again_nd, got_nd[:8], atol=1e-5)


def test_tokenize_truncates_to_max_length(minilm, reference):
    sentences, _ = reference
    batch = minilm.tokenize(sentences)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    assert minilm.max_length == 256 and batch["input_ids"].shape == (16, 256)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == 256 and lengths[1] < 10  # the long post and "Ok"
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_encoder_input_errors(minilm):
    with pytest.raises(UserInputError, match="wrap a single text"):
        minilm.encode("just one string")
    with pytest.raises(UserInputError, match=r"texts\[1\] is a int"):
        minilm.encode(["ok", 3])
    with pytest.raises(UserInputError, match="batch_size"):
        minilm.encode(["ok"], batch_size=0)
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(UserInputError, match="'no-such-model'"):
        load_sentence_encoder("no-such-model")


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(
        sentence_encoder.KNOWN_SENTENCE_ENCODERS,
        "fake-encoder",
        ("lf_jax_no_such_package", "lf-jax-no-such-package"),
    )
    with pytest.raises(UserInputError, match="pip install lf-jax-no-such-package"):
        load_sentence_encoder("fake-encoder")


def test_unsupported_pooling_is_refused_before_loading(tmp_path):
    pooling = tmp_path / "1_Pooling"
    pooling.mkdir()
    (pooling / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": True})
    )
    with pytest.raises(UserInputError, match="pooling_mode_lasttoken"):
        SentenceEncoder.from_dir(str(tmp_path))


def test_mean_pool_and_normalize_against_numpy():
    rng = np.random.default_rng(0)
    hidden_bld = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask_bl = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
    pooled = np.asarray(mean_pool(jnp.asarray(hidden_bld), jnp.asarray(mask_bl)))
    for row in range(3):
        np.testing.assert_allclose(
            pooled[row], hidden_bld[row, mask_bl[row] == 1].mean(0), rtol=1e-6
        )
    unit = np.asarray(l2_normalize(jnp.asarray(pooled)))
    np.testing.assert_allclose(
        unit, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), rtol=1e-6
    )


TINY = dict(
    vocab_size=40,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=12,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    model_type="bert",
)


def _tiny_checkpoint(directory, prefix="", drop=None, reshape=None, extra=None):
    rng = np.random.default_rng(1)
    d, f = TINY["hidden_size"], TINY["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (40, d),
        "embeddings.position_embeddings.weight": (12, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    pre = "encoder.layer.0."
    for name in ("query", "key", "value"):
        shapes[f"{pre}attention.self.{name}.weight"] = (d, d)
        shapes[f"{pre}attention.self.{name}.bias"] = (d,)
    shapes.update(
        {
            f"{pre}attention.output.dense.weight": (d, d),
            f"{pre}attention.output.dense.bias": (d,),
            f"{pre}attention.output.LayerNorm.weight": (d,),
            f"{pre}attention.output.LayerNorm.bias": (d,),
            f"{pre}intermediate.dense.weight": (f, d),
            f"{pre}intermediate.dense.bias": (f,),
            f"{pre}output.dense.weight": (d, f),
            f"{pre}output.dense.bias": (d,),
            f"{pre}output.LayerNorm.weight": (d,),
            f"{pre}output.LayerNorm.bias": (d,),
            "pooler.dense.weight": (d, d),
        }
    )
    if reshape:
        shapes[reshape[0]] = reshape[1]
    tensors = {
        prefix + name: rng.normal(size=shape).astype(np.float32)
        for name, shape in shapes.items()
        if name != drop
    }
    tensors.update(extra or {})
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(TINY, handle)
    return tensors


def test_loader_maps_hf_layout_and_strips_prefix(tmp_path):
    bare = _tiny_checkpoint(tmp_path / "bare")
    _tiny_checkpoint(tmp_path / "prefixed", prefix="bert.")
    model, tokenizer = load_bert(str(tmp_path / "bare"), with_tokenizer=False)
    other, _ = load_bert(str(tmp_path / "prefixed"), with_tokenizer=False)
    assert tokenizer is None
    layer = model.layers[0]
    q_weight = bare["encoder.layer.0.attention.self.query.weight"]  # [out = H*Dh, in = D]
    np.testing.assert_array_equal(np.asarray(layer.q_kernel[...])[:, 1, 2], q_weight[1 * 4 + 2])
    o_weight = bare["encoder.layer.0.attention.output.dense.weight"]  # [out = D, in = H*Dh]
    np.testing.assert_array_equal(np.asarray(layer.o_kernel[...])[1, 3], o_weight[:, 1 * 4 + 3])
    np.testing.assert_array_equal(
        np.asarray(layer.mlp_in_kernel[...]), bare["encoder.layer.0.intermediate.dense.weight"].T
    )
    for a, b in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(other)), strict=False
    ):
        np.testing.assert_array_equal(np.asarray(a[1].get_value()), np.asarray(b[1].get_value()))
    ids_bl = np.array([[2, 5, 7, 0]], np.int32)
    hidden_bld = nnx.jit(lambda m, i, k: m(i, k))(model, ids_bl, np.array([[1, 1, 1, 0]], np.int32))
    assert hidden_bld.shape == (1, 4, 8) and np.isfinite(np.asarray(hidden_bld)).all()


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_bert(str(tmp_path / "nowhere"))
    _tiny_checkpoint(tmp_path / "missing", drop="encoder.layer.0.output.dense.bias")
    with pytest.raises(UserInputError, match="no tensor 'encoder.layer.0.output.dense.bias'"):
        load_bert(str(tmp_path / "missing"), with_tokenizer=False)
    _tiny_checkpoint(tmp_path / "shape", reshape=("embeddings.word_embeddings.weight", (41, 8)))
    with pytest.raises(UserInputError, match=r"word_embeddings.weight' has shape \(41, 8\)"):
        load_bert(str(tmp_path / "shape"), with_tokenizer=False)
    _tiny_checkpoint(tmp_path / "extra", extra={"encoder.rel_pos.weight": np.zeros(3, np.float32)})
    with pytest.raises(UserInputError, match="encoder.rel_pos.weight"):
        load_bert(str(tmp_path / "extra"), with_tokenizer=False)
    _tiny_checkpoint(tmp_path / "ok")
    with pytest.raises(UserInputError, match="no tokenizer files"):
        load_bert(str(tmp_path / "ok"))


def test_config_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "num_hidden_layers": 0}))
    with pytest.raises(UserInputError, match="'num_hidden_layers'.*got 0"):
        BertConfig.from_json(str(path))
    path.write_text(json.dumps({**TINY, "hidden_act": "swish7"}))
    with pytest.raises(UserInputError, match="hidden_act='swish7'"):
        BertConfig.from_json(str(tmp_path))
    with pytest.raises(UserInputError, match="not a multiple"):
        BertConfig(vocab_size=10, hidden_size=10, num_layers=1, num_heads=3, intermediate_size=4)
    config = BertConfig(
        vocab_size=10,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=8,
        max_position_embeddings=4,
    )
    model = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
    with pytest.raises(UserInputError, match="exceeds max_position_embeddings=4"):
        nnx.eval_shape(lambda m: m(np.zeros((1, 5), np.int32), np.ones((1, 5), np.int32)), model)
