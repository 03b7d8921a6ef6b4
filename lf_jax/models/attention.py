"""Pieces shared by the text encoders: annotated parameters, masks, multi-head attention.

Every parameter carries logical axis names (``"vocab"``, ``"embed"``, ``"mlp"``,
``"heads"``, ``"kv_heads"``, ``"head_dim"``) in its ``out_sharding`` metadata, with eager
sharding off, so a model builds anywhere and ``encoder_sharding.shard_encoder`` decides
placement later through lf_jax/distributed/rules.py.

Shapes: B batch, L query length, S key length, H query heads, K key/value heads,
Dh head dim, D model width.

Example:
    >>> mask_bls = padding_mask(mask_bl)                       # [B, 1, L]
    >>> out_blhd = dot_product_attention(q_blhd, k_bskd, v_bskd, mask_bls)
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def logical_param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An nnx.Param of ``shape`` whose dims carry the logical ``names``.

    Example:
        >>> w = logical_param(rngs, nnx.initializers.normal(0.02), (384, 1536), ("embed", "mlp"))
    """
    if len(shape) != len(names):
        raise ValueError(
            f"parameter shape {tuple(shape)} has {len(shape)} dims but "
            f"{len(names)} logical names {tuple(names)}"
        )
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = init(key, tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def padding_mask(mask_bl: jax.Array) -> jax.Array:
    """[B, S] 1/0 key mask -> boolean [B, 1, S]: every query may see every real key."""
    return (mask_bl > 0)[:, None, :]


def causal_padding_mask(mask_bl: jax.Array) -> jax.Array:
    """[B, L] 1/0 mask -> boolean [B, L, L]: query i sees real keys j <= i."""
    length = mask_bl.shape[1]
    causal_ll = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal_ll[None, :, :] & (mask_bl > 0)[:, None, :]


def dot_product_attention(
    q_blhd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bls: jax.Array
) -> jax.Array:
    """Softmax attention with grouped-query heads (H a multiple of K).

    ``mask_bls`` is boolean, broadcastable to [B, L, S]; masked keys get the smallest
    float before the softmax, so a query row with no visible key (a pad row of a
    causal + padding mask) yields a finite average instead of NaN. Logits and softmax
    run in float32; the result has the dtype of ``v``.

    Returns [B, L, H, Dh].
    """
    heads, kv_heads, head_dim = q_blhd.shape[2], k_bskd.shape[2], q_blhd.shape[3]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    group = heads // kv_heads
    batch, length = q_blhd.shape[:2]
    q_blkgd = q_blhd.reshape(batch, length, kv_heads, group, head_dim)
    logits_bkgls = jnp.einsum(
        "blkgd,bskd->bkgls", q_blkgd, k_bskd, preferred_element_type=jnp.float32
    )
    logits_bkgls = logits_bkgls / jnp.sqrt(jnp.float32(head_dim))
    visible = mask_bls[:, None, None, :, :]
    logits_bkgls = jnp.where(visible, logits_bkgls, jnp.finfo(jnp.float32).min)
    probs_bkgls = jax.nn.softmax(logits_bkgls, axis=-1).astype(v_bskd.dtype)
    out_blkgd = jnp.einsum("bkgls,bskd->blkgd", probs_bkgls, v_bskd)
    return out_blkgd.reshape(batch, length, heads, head_dim)


def mean_pool(hidden_bld: jax.Array, mask_bl: jax.Array) -> jax.Array:
    """Mean of the hidden states over real tokens -> [B, D] (float32).

    A row without any real token pools to zeros. Example:
        >>> emb_bd = mean_pool(hidden_bld, batch["attention_mask"])
    """
    weights_bl = (mask_bl > 0).astype(jnp.float32)
    summed_bd = jnp.einsum("bld,bl->bd", hidden_bld.astype(jnp.float32), weights_bl)
    count_b1 = jnp.maximum(weights_bl.sum(axis=1, keepdims=True), 1e-9)
    return summed_bd / count_b1


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along ``axis`` (as torch.nn.functional.normalize)."""
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / jnp.maximum(norm, eps)
