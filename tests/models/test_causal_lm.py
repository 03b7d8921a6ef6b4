"""Llama decoder encoder: parity with transformers' LlamaForCausalLM, masks, loader errors."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lf_jax.errors import UserInputError
from lf_jax.models.causal_lm import LlamaConfig, LlamaModel, last_token_pool, load_llama

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
TINY_DIR = os.path.join(FIXTURES, "tiny_llama")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_llama(TINY_DIR)
    assert tokenizer is None  # the fixture ships no tokenizer files
    forward = nnx.jit(lambda m, ids, mask: m(ids, mask))
    return model, forward


@pytest.fixture(scope="module")
def reference():
    data = np.load(os.path.join(FIXTURES, "tiny_llama_reference.npz"))
    return data["input_ids"], data["attention_mask"], data["hidden"]


def test_config_from_fixture():
    config = LlamaConfig.from_json(TINY_DIR)
    assert (
        config.vocab_size,
        config.hidden_size,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.intermediate_size,
    ) == (512, 64, 2, 4, 2, 128)
    assert config.rope_theta == 10000.0 and config.resolved_head_dim == 16
    assert config.tie_word_embeddings is False


def test_matches_transformers_on_real_tokens(tiny, reference):
    model, forward = tiny
    ids_bl, mask_bl, expected_bld = reference
    assert (mask_bl.sum(1) < mask_bl.shape[1]).any()  # the batch really is padded
    got_bld = np.asarray(forward(model, ids_bl, mask_bl))
    real = mask_bl > 0
    assert np.abs(got_bld - expected_bld)[real].max() < 1e-4
    last_b = mask_bl.sum(1) - 1
    pooled_bd = np.asarray(last_token_pool(got_bld, mask_bl))
    np.testing.assert_allclose(pooled_bd, expected_bld[np.arange(len(last_b)), last_b], atol=1e-4)


def test_causal_and_padding_invariance(tiny, reference):
    model, forward = tiny
    ids_bl, mask_bl, _ = reference
    base_bld = np.asarray(forward(model, ids_bl, mask_bl))
    changed = ids_bl.copy()
    changed[0, 6] = (changed[0, 6] + 1) % 512  # row 0 has 12 real tokens
    changed_bld = np.asarray(forward(model, changed, mask_bl))
    np.testing.assert_allclose(changed_bld[0, :6], base_bld[0, :6], atol=1e-6)
    assert np.abs(changed_bld[0, 6:] - base_bld[0, 6:]).max() > 1e-3
    # Garbage in pad slots changes nothing at real positions.
    noisy = np.where(mask_bl > 0, ids_bl, 7)
    noisy_bld = np.asarray(forward(model, noisy, mask_bl))
    real = mask_bl > 0
    np.testing.assert_allclose(noisy_bld[real], base_bld[real], atol=1e-6)


def _copy_fixture(tmp_path, config_update=None, tensors_update=None, drop=None):
    target = tmp_path / "llama"
    shutil.copytree(TINY_DIR, target)
    if config_update:
        config = json.loads((target / "config.json").read_text())
        config.update(config_update)
        (target / "config.json").write_text(json.dumps(config))
    if tensors_update or drop:
        tensors = load_file(str(target / "model.safetensors"))
        tensors.update(tensors_update or {})
        tensors.pop(drop, None)
        save_file(tensors, str(target / "model.safetensors"))
    return str(target)


def test_unsupported_config_fields_are_named(tmp_path):
    with pytest.raises(UserInputError, match="rope_scaling="):
        LlamaConfig.from_json(_copy_fixture(tmp_path, {"rope_scaling": {"rope_type": "llama3"}}))
    shutil.rmtree(tmp_path / "llama")
    with pytest.raises(UserInputError, match="'num_key_value_heads'.*got 0"):
        LlamaConfig.from_json(_copy_fixture(tmp_path, {"num_key_value_heads": 0}))
    with pytest.raises(UserInputError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        LlamaConfig(
            vocab_size=8,
            hidden_size=16,
            num_layers=1,
            num_heads=4,
            num_kv_heads=3,
            intermediate_size=8,
        )


def test_checkpoint_errors_are_named(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_llama(str(tmp_path / "absent"))
    path = _copy_fixture(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(UserInputError, match="no tensor 'layers.1.mlp.up_proj.weight'"):
        load_llama(path)
    shutil.rmtree(tmp_path / "llama")
    path = _copy_fixture(tmp_path, {"intermediate_size": 96})
    with pytest.raises(
        UserInputError, match=r"gate_proj.weight' has shape \(128, 64\).*\(96, 64\)"
    ):
        load_llama(path)
    shutil.rmtree(tmp_path / "llama")
    path = _copy_fixture(
        tmp_path, tensors_update={"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    )
    with pytest.raises(UserInputError, match="q_proj.bias"):
        load_llama(path)
    with pytest.raises(UserInputError, match="mode='pipeline'"):
        load_llama(TINY_DIR, mesh=object(), mode="pipeline")


def test_length_check_before_device_work():
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=8,
        max_position_embeddings=4,
    )
    model = nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0)))
    with pytest.raises(UserInputError, match="exceeds max_position_embeddings=4"):
        nnx.eval_shape(lambda m: m(np.zeros((1, 5), np.int32), np.ones((1, 5), np.int32)), model)


def test_bfloat16_compute_keeps_float32_params(reference):
    ids_bl, mask_bl, expected_bld = reference
    model, _ = load_llama(TINY_DIR, dtype=jnp.bfloat16)
    assert model.layers[0].q_kernel[...].dtype == jnp.float32
    got_bld = nnx.jit(lambda m, ids, mask: m(ids, mask))(model, ids_bl, mask_bl)
    assert got_bld.dtype == jnp.bfloat16
    real = mask_bl > 0
    error = np.abs(np.asarray(got_bld, np.float32) - expected_bld)[real]
    # measured: mean 0.013, max 0.087 (|hidden| averages 0.79)
    assert error.mean() < 0.03 and error.max() < 0.25, (error.mean(), error.max())
