"""BERT encoder (post-LayerNorm, as Hugging Face ``BertModel``) in Flax NNX, and its loader.

Weights load from a local HF directory (config.json + model.safetensors + tokenizer
files) without torch. lf_jax.models.sentence_encoder wraps it into a
sentence-transformers-like encoder. No dropout: the encoder is deterministic.

Shapes: B batch, L tokens, D hidden, H heads, Dh head dim, F intermediate, V vocab.

Example:
    >>> model, tokenizer = load_bert(model_dir)
    >>> hidden_bld = model(batch["input_ids"], batch["attention_mask"])
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from lf_jax.errors import UserInputError
from lf_jax.models import hf_weights
from lf_jax.models.attention import dot_product_attention, logical_param, padding_mask
from lf_jax.models.encoder_sharding import check_mode, encoder_shardings

__all__ = ["BertConfig", "BertEncoder", "layer_norm", "load_bert"]

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Architecture of a BERT encoder, in Hugging Face's terms."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise UserInputError(
                f"BertConfig: hidden_size={self.hidden_size} is not a multiple "
                f"of num_heads={self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise UserInputError(
                f"BertConfig: hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, path: str) -> "BertConfig":
        """Reads a HF config.json (or the config.json inside a directory)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        data = hf_weights.read_json(path, what="BERT config")
        if data.get("model_type", "bert") != "bert":
            raise UserInputError(f"{path}: model_type={data['model_type']!r}, expected 'bert'")
        position_type = data.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UserInputError(
                f"{path}: position_embedding_type={position_type!r} is not "
                "supported (only 'absolute')"
            )
        return cls(
            vocab_size=hf_weights.require_int(data, "vocab_size", path),
            hidden_size=hf_weights.require_int(data, "hidden_size", path),
            num_layers=hf_weights.require_int(data, "num_hidden_layers", path),
            num_heads=hf_weights.require_int(data, "num_attention_heads", path),
            intermediate_size=hf_weights.require_int(data, "intermediate_size", path),
            max_position_embeddings=hf_weights.require_int(
                data, "max_position_embeddings", path, default=512
            ),
            type_vocab_size=hf_weights.require_int(data, "type_vocab_size", path, default=2),
            layer_norm_eps=hf_weights.require_float(data, "layer_norm_eps", path, default=1e-12),
            hidden_act=str(data.get("hidden_act", "gelu")),
        )


def layer_norm(
    x_bld: jax.Array, scale_d: jax.Array, bias_d: jax.Array, eps: float, dtype
) -> jax.Array:
    """LayerNorm over the last dim, computed in float32, returned in ``dtype``."""
    x = x_bld.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale_d.astype(jnp.float32) + bias_d.astype(jnp.float32)).astype(dtype)


class BertLayer(nnx.Module):
    """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        intermediate: int,
        *,
        eps: float,
        act: str,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        head_dim = hidden // heads
        normal, zeros, ones = (
            nnx.initializers.normal(0.02),
            nnx.initializers.zeros,
            nnx.initializers.ones,
        )

        def p(init, shape, names):
            return logical_param(rngs, init, shape, names, param_dtype)

        qkv_names, bias_names = ("embed", "heads", "head_dim"), ("heads", "head_dim")
        self.q_kernel = p(normal, (hidden, heads, head_dim), qkv_names)
        self.q_bias = p(zeros, (heads, head_dim), bias_names)
        self.k_kernel = p(normal, (hidden, heads, head_dim), qkv_names)
        self.k_bias = p(zeros, (heads, head_dim), bias_names)
        self.v_kernel = p(normal, (hidden, heads, head_dim), qkv_names)
        self.v_bias = p(zeros, (heads, head_dim), bias_names)
        self.o_kernel = p(normal, (heads, head_dim, hidden), ("heads", "head_dim", "embed"))
        self.o_bias = p(zeros, (hidden,), ("embed",))
        self.attn_ln_scale = p(ones, (hidden,), ("embed",))
        self.attn_ln_bias = p(zeros, (hidden,), ("embed",))
        self.mlp_in_kernel = p(normal, (hidden, intermediate), ("embed", "mlp"))
        self.mlp_in_bias = p(zeros, (intermediate,), ("mlp",))
        self.mlp_out_kernel = p(normal, (intermediate, hidden), ("mlp", "embed"))
        self.mlp_out_bias = p(zeros, (hidden,), ("embed",))
        self.out_ln_scale = p(ones, (hidden,), ("embed",))
        self.out_ln_bias = p(zeros, (hidden,), ("embed",))
        self.eps, self.act, self.dtype = eps, act, dtype

    def __call__(self, x_bld: jax.Array, mask_bls: jax.Array) -> jax.Array:
        dt = self.dtype
        x_bld = x_bld.astype(dt)

        def project(kernel, bias):
            return jnp.einsum("bld,dhk->blhk", x_bld, kernel[...].astype(dt)) + bias[...].astype(dt)

        q_blhk = project(self.q_kernel, self.q_bias)
        k_blhk = project(self.k_kernel, self.k_bias)
        v_blhk = project(self.v_kernel, self.v_bias)
        ctx_blhk = dot_product_attention(q_blhk, k_blhk, v_blhk, mask_bls)
        attn_bld = jnp.einsum(
            "blhk,hkd->bld", ctx_blhk, self.o_kernel[...].astype(dt)
        ) + self.o_bias[...].astype(dt)
        x_bld = layer_norm(
            x_bld + attn_bld, self.attn_ln_scale[...], self.attn_ln_bias[...], self.eps, dt
        )
        h_blf = x_bld @ self.mlp_in_kernel[...].astype(dt) + self.mlp_in_bias[...].astype(dt)
        h_blf = ACTIVATIONS[self.act](h_blf)
        out_bld = h_blf @ self.mlp_out_kernel[...].astype(dt) + self.mlp_out_bias[...].astype(dt)
        return layer_norm(
            x_bld + out_bld, self.out_ln_scale[...], self.out_ln_bias[...], self.eps, dt
        )


class BertEncoder(nnx.Module):
    """Token ids -> last hidden states [B, L, D]; ``dtype`` is the compute dtype.

    Parameters are kept in ``param_dtype`` (float32 by default) and carry logical axis
    names for ``shard_encoder``. Example:
        >>> model = BertEncoder(BertConfig(vocab_size=100, hidden_size=32, num_layers=2,
        ...                                num_heads=4, intermediate_size=64), rngs=nnx.Rngs(0))
        >>> hidden_bld = model(ids_bl, mask_bl)
    """

    def __init__(
        self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        c = config
        self.config, self.dtype = config, dtype
        normal = nnx.initializers.normal(0.02)
        self.word_embeddings = logical_param(
            rngs, normal, (c.vocab_size, c.hidden_size), ("vocab", "embed"), param_dtype
        )
        self.position_embeddings = logical_param(
            rngs, normal, (c.max_position_embeddings, c.hidden_size), (None, "embed"), param_dtype
        )
        self.token_type_embeddings = logical_param(
            rngs, normal, (c.type_vocab_size, c.hidden_size), (None, "embed"), param_dtype
        )
        self.emb_ln_scale = logical_param(
            rngs, nnx.initializers.ones, (c.hidden_size,), ("embed",), param_dtype
        )
        self.emb_ln_bias = logical_param(
            rngs, nnx.initializers.zeros, (c.hidden_size,), ("embed",), param_dtype
        )
        self.layers = nnx.List(
            [
                BertLayer(
                    c.hidden_size,
                    c.num_heads,
                    c.intermediate_size,
                    eps=c.layer_norm_eps,
                    act=c.hidden_act,
                    rngs=rngs,
                    dtype=dtype,
                    param_dtype=param_dtype,
                )
                for _ in range(c.num_layers)
            ]
        )

    def __call__(
        self,
        input_ids_bl: jax.Array,
        attention_mask_bl: jax.Array,
        token_type_ids_bl: jax.Array | None = None,
    ) -> jax.Array:
        """Last hidden states [B, L, D] (pad positions hold values; mask them downstream)."""
        if input_ids_bl.ndim != 2 or attention_mask_bl.shape != input_ids_bl.shape:
            raise UserInputError(
                f"input_ids {input_ids_bl.shape} and attention_mask "
                f"{attention_mask_bl.shape} must both be [batch, length]"
            )
        length = input_ids_bl.shape[1]
        if length > self.config.max_position_embeddings:
            raise UserInputError(
                f"sequence length {length} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if token_type_ids_bl is None:
            token_type_ids_bl = jnp.zeros_like(input_ids_bl)
        x_bld = (
            jnp.take(self.word_embeddings[...], input_ids_bl, axis=0)
            + self.position_embeddings[...][None, :length]
            + jnp.take(self.token_type_embeddings[...], token_type_ids_bl, axis=0)
        )
        x_bld = layer_norm(
            x_bld,
            self.emb_ln_scale[...],
            self.emb_ln_bias[...],
            self.config.layer_norm_eps,
            self.dtype,
        )
        mask_bls = padding_mask(attention_mask_bl)
        for layer in self.layers:
            x_bld = layer(x_bld, mask_bls)
        return x_bld


def load_bert(
    model_dir: str,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    with_tokenizer: bool = True,
    mesh=None,
    mode: str = "fsdp",
):
    """(BertEncoder, tokenizer) from a local HF BERT directory; no torch, no network.

    The tokenizer comes from transformers.AutoTokenizer(local_files_only=True); with
    ``with_tokenizer=False`` it is None. With ``mesh``, weights go straight to their
    shards per ``mode`` (see encoder_sharding.shard_encoder). Example:
        >>> model, tokenizer = load_bert("/models/all-MiniLM-L6-v2")
    """
    if not os.path.isdir(model_dir):
        raise UserInputError(f"BERT model directory {model_dir!r} does not exist")
    if mesh is not None:
        check_mode(mode)
    config = BertConfig.from_json(os.path.join(model_dir, "config.json"))
    tokenizer = hf_weights.load_tokenizer(model_dir, required=True) if with_tokenizer else None
    tensors = hf_weights.strip_prefix(hf_weights.read_safetensors(model_dir), ("bert.",))
    arrays = hf_weights.bert_arrays_from_hf(tensors, config, model_dir)
    place = None if mesh is None else lambda abstract: encoder_shardings(abstract, mesh, mode)[0]
    model = hf_weights.build_with_arrays(
        lambda: BertEncoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        arrays,
        source=model_dir,
        place=place,
    )
    return model, tokenizer
