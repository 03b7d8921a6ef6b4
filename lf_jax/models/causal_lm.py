"""Llama-architecture decoder as a text encoder (Flax NNX), and its safetensors loader.

Pre-RMSNorm blocks, grouped-query attention with rotary position embeddings
(Hugging Face's rotate-half layout), SwiGLU MLP, final RMSNorm. Batches are right-padded:
positions run 0..L-1 and a query sees real keys at or before it. The output is the last
hidden state (after the final norm); pool it with ``last_token_pool`` or ``mean_pool``.

Shapes: B batch, L tokens, D hidden, H query heads, K kv heads, Dh head dim,
F intermediate, V vocab.

Example:
    >>> model, tokenizer = load_llama("tests/fixtures/tiny_llama")
    >>> hidden_bld = model(ids_bl, mask_bl)
    >>> emb_bd = last_token_pool(hidden_bld, mask_bl)
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from lf_jax.errors import UserInputError
from lf_jax.models import hf_weights
from lf_jax.models.attention import (
    causal_padding_mask,
    dot_product_attention,
    l2_normalize,
    logical_param,
    mean_pool,
)
from lf_jax.models.encoder_sharding import check_mode, encoder_shardings

__all__ = [
    "LlamaConfig",
    "LlamaModel",
    "l2_normalize",
    "last_token_pool",
    "load_llama",
    "mean_pool",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture of a Llama decoder, in Hugging Face's terms (``head_dim`` None: D/H)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UserInputError(
                f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise UserInputError(
                f"LlamaConfig: hidden_size={self.hidden_size} is not a "
                f"multiple of num_heads={self.num_heads}"
            )
        if self.resolved_head_dim % 2:
            raise UserInputError(
                f"LlamaConfig: head_dim={self.resolved_head_dim} must be even for rotary embeddings"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, path: str) -> "LlamaConfig":
        """Reads a HF Llama config.json (or the config.json inside a directory)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        data = hf_weights.read_json(path, what="Llama config")
        checks = {
            "model_type": ("llama",),
            "hidden_act": ("silu",),
            "rope_scaling": (None,),
            "attention_bias": (False,),
            "mlp_bias": (False,),
        }
        defaults = {"model_type": "llama", "hidden_act": "silu"}
        for key, allowed in checks.items():
            value = data.get(key, defaults.get(key))
            if value not in allowed:
                raise UserInputError(
                    f"{path}: {key}={value!r} is not supported (supported: {list(allowed)})"
                )
        rope_theta = data.get("rope_theta")
        if rope_theta is None and isinstance(data.get("rope_parameters"), dict):
            parameters = data["rope_parameters"]  # transformers >= 5 writes this form
            if parameters.get("rope_type", "default") != "default":
                raise UserInputError(
                    f"{path}: rope_parameters.rope_type="
                    f"{parameters['rope_type']!r} is not supported ('default')"
                )
            rope_theta = parameters.get("rope_theta")
        heads = hf_weights.require_int(data, "num_attention_heads", path)
        head_dim = data.get("head_dim")
        return cls(
            vocab_size=hf_weights.require_int(data, "vocab_size", path),
            hidden_size=hf_weights.require_int(data, "hidden_size", path),
            num_layers=hf_weights.require_int(data, "num_hidden_layers", path),
            num_heads=heads,
            num_kv_heads=hf_weights.require_int(data, "num_key_value_heads", path, default=heads),
            intermediate_size=hf_weights.require_int(data, "intermediate_size", path),
            rms_norm_eps=hf_weights.require_float(data, "rms_norm_eps", path, default=1e-6),
            rope_theta=hf_weights.require_float(
                {"rope_theta": rope_theta}, "rope_theta", path, default=10000.0
            ),
            max_position_embeddings=hf_weights.require_int(
                data, "max_position_embeddings", path, default=2048
            ),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            head_dim=None if head_dim is None else hf_weights.require_int(data, "head_dim", path),
        )


def rms_norm(x_bld: jax.Array, scale_d: jax.Array, eps: float, dtype) -> jax.Array:
    """x / rms(x) * scale, in float32 like HF's LlamaRMSNorm, returned in ``dtype``."""
    x = x_bld.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return (scale_d.astype(jnp.float32) * x.astype(dtype).astype(jnp.float32)).astype(dtype)


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [L, Dh] for positions 0..L-1 (frequencies repeated over both halves)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_lh = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles_ld = jnp.concatenate([angles_lh, angles_lh], axis=-1)
    return jnp.cos(angles_ld), jnp.sin(angles_ld)


def apply_rotary(x_blhd: jax.Array, cos_ld: jax.Array, sin_ld: jax.Array) -> jax.Array:
    """Rotates (first half, second half) pairs of each head: x*cos + rotate_half(x)*sin."""
    half = x_blhd.shape[-1] // 2
    x = x_blhd.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_ld[None, :, None, :] + rotated * sin_ld[None, :, None, :]
    return out.astype(x_blhd.dtype)


class LlamaLayer(nnx.Module):
    """x += attn(rms(x)); x += swiglu(rms(x))."""

    def __init__(
        self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        d, h, k, dh = (
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.resolved_head_dim,
        )
        f = config.intermediate_size
        normal, ones = nnx.initializers.normal(0.02), nnx.initializers.ones

        def p(init, shape, names):
            return logical_param(rngs, init, shape, names, param_dtype)

        self.attn_norm = p(ones, (d,), ("embed",))
        self.q_kernel = p(normal, (d, h, dh), ("embed", "heads", "head_dim"))
        self.k_kernel = p(normal, (d, k, dh), ("embed", "kv_heads", "head_dim"))
        self.v_kernel = p(normal, (d, k, dh), ("embed", "kv_heads", "head_dim"))
        self.o_kernel = p(normal, (h, dh, d), ("heads", "head_dim", "embed"))
        self.mlp_norm = p(ones, (d,), ("embed",))
        self.gate_kernel = p(normal, (d, f), ("embed", "mlp"))
        self.up_kernel = p(normal, (d, f), ("embed", "mlp"))
        self.down_kernel = p(normal, (f, d), ("mlp", "embed"))
        self.eps, self.dtype = config.rms_norm_eps, dtype

    def __call__(self, x_bld, mask_bls, cos_ld, sin_ld):
        dt = self.dtype
        h_bld = rms_norm(x_bld, self.attn_norm[...], self.eps, dt)
        q_blhd = jnp.einsum("bld,dhk->blhk", h_bld, self.q_kernel[...].astype(dt))
        k_blkd = jnp.einsum("bld,dhk->blhk", h_bld, self.k_kernel[...].astype(dt))
        v_blkd = jnp.einsum("bld,dhk->blhk", h_bld, self.v_kernel[...].astype(dt))
        q_blhd = apply_rotary(q_blhd, cos_ld, sin_ld)
        k_blkd = apply_rotary(k_blkd, cos_ld, sin_ld)
        ctx_blhd = dot_product_attention(q_blhd, k_blkd, v_blkd, mask_bls)
        x_bld = x_bld + jnp.einsum("blhk,hkd->bld", ctx_blhd, self.o_kernel[...].astype(dt))
        h_bld = rms_norm(x_bld, self.mlp_norm[...], self.eps, dt)
        gate_blf = jax.nn.silu(h_bld @ self.gate_kernel[...].astype(dt))
        up_blf = h_bld @ self.up_kernel[...].astype(dt)
        return x_bld + (gate_blf * up_blf) @ self.down_kernel[...].astype(dt)


class LlamaModel(nnx.Module):
    """Token ids [B, L] + right-padding mask -> final-norm hidden states [B, L, D].

    ``dtype`` is the compute dtype; parameters stay in ``param_dtype``. The LM head is
    not part of the encoder. Example:
        >>> model = LlamaModel(LlamaConfig(vocab_size=512, hidden_size=64, num_layers=2,
        ...                                num_heads=4, num_kv_heads=2, intermediate_size=128),
        ...                    rngs=nnx.Rngs(0))
        >>> hidden_bld = model(ids_bl, mask_bl)
    """

    def __init__(
        self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.config, self.dtype = config, dtype
        self.embed_tokens = logical_param(
            rngs,
            nnx.initializers.normal(0.02),
            (config.vocab_size, config.hidden_size),
            ("vocab", "embed"),
            param_dtype,
        )
        self.layers = nnx.List(
            [
                LlamaLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                for _ in range(config.num_layers)
            ]
        )
        self.final_norm = logical_param(
            rngs, nnx.initializers.ones, (config.hidden_size,), ("embed",), param_dtype
        )

    def __call__(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array) -> jax.Array:
        """Hidden states [B, L, D] after the final RMSNorm (pad positions: mask downstream)."""
        if input_ids_bl.ndim != 2 or attention_mask_bl.shape != input_ids_bl.shape:
            raise UserInputError(
                f"input_ids {input_ids_bl.shape} and attention_mask "
                f"{attention_mask_bl.shape} must both be [batch, length]"
            )
        length = input_ids_bl.shape[1]
        c = self.config
        if length > c.max_position_embeddings:
            raise UserInputError(
                f"sequence length {length} exceeds max_position_embeddings="
                f"{c.max_position_embeddings}"
            )
        cos_ld, sin_ld = rotary_tables(length, c.resolved_head_dim, c.rope_theta)
        mask_bls = causal_padding_mask(attention_mask_bl)
        x_bld = jnp.take(self.embed_tokens[...], input_ids_bl, axis=0).astype(self.dtype)
        for layer in self.layers:
            x_bld = layer(x_bld, mask_bls, cos_ld, sin_ld)
        return rms_norm(x_bld, self.final_norm[...], c.rms_norm_eps, self.dtype)


def last_token_pool(hidden_bld: jax.Array, mask_bl: jax.Array) -> jax.Array:
    """Hidden state of each row's last real token (right padding) -> [B, D] float32.

    A row without real tokens takes position 0. Example:
        >>> emb_bd = last_token_pool(hidden_bld, mask_bl)
    """
    last_b = jnp.maximum(jnp.sum(mask_bl > 0, axis=1) - 1, 0)
    return jnp.take_along_axis(hidden_bld, last_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def load_llama(
    model_dir: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None, mode: str = "fsdp"
):
    """(LlamaModel, tokenizer or None) from a local HF Llama directory; no torch, no network.

    Reads config.json and model.safetensors (or a sharded index); the tokenizer is
    returned when tokenizer files are present. With ``mesh``, weights go straight to
    their shards per ``mode`` (see encoder_sharding.shard_encoder). Example:
        >>> model, tokenizer = load_llama("/models/my-llama")
    """
    if not os.path.isdir(model_dir):
        raise UserInputError(f"Llama model directory {model_dir!r} does not exist")
    if mesh is not None:
        check_mode(mode)
    config = LlamaConfig.from_json(os.path.join(model_dir, "config.json"))
    tensors = hf_weights.strip_prefix(hf_weights.read_safetensors(model_dir), ("model.",))
    arrays = hf_weights.llama_arrays_from_hf(tensors, config, model_dir)
    place = None if mesh is None else lambda abstract: encoder_shardings(abstract, mesh, mode)[0]
    model = hf_weights.build_with_arrays(
        lambda: LlamaModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        arrays,
        source=model_dir,
        place=place,
    )
    return model, hf_weights.load_tokenizer(model_dir, required=False)
