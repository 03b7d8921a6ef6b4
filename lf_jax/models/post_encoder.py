"""Siamese post encoder: one BERT for both sides, mean pooling, projection to 50 dims, and a
learned scale and bias turning cosines into pair logits (BCE on a scaled cosine).

Shapes: B batch, L tokens, H BERT hidden, P projection dim.

Example:
    >>> encoder = load_sentence_encoder("all-MiniLM-L6-v2").model      # pretrained MiniLM
    >>> model = PostEncoder(encoder, projection_dim=50, rngs=nnx.Rngs(0))
    >>> text_bp = model.embed(ids_bl, mask_bl)                          # unit rows [B, 50]
    >>> logits_b = model.pair_logits(text_bp, post_bp)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lf_jax.models.attention import l2_normalize, mean_pool
from lf_jax.models.bert import BertEncoder


class PostEncoder(nnx.Module):
    """BERT -> mean pool -> unit norm -> Linear(H, P) -> unit norm; scale * cos + bias logits."""

    def __init__(
        self,
        encoder: BertEncoder,
        *,
        projection_dim: int = 50,
        init_scale: float = 10.0,
        init_bias: float = -5.0,
        rngs: nnx.Rngs,
    ):
        self.encoder = encoder
        self.projection = nnx.Linear(encoder.config.hidden_size, projection_dim, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(init_scale, jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(init_bias, jnp.float32))

    def embed(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array) -> jax.Array:
        """Unit-norm embeddings [B, P] of the texts."""
        pooled_bh = l2_normalize(
            mean_pool(self.encoder(input_ids_bl, attention_mask_bl), attention_mask_bl)
        )
        return l2_normalize(self.projection(pooled_bh))

    def pair_logits(self, a_bp: jax.Array, b_bp: jax.Array) -> jax.Array:
        """scale * cos(a, b) + bias [B] for unit rows."""
        return self.logit_scale[...] * jnp.sum(a_bp * b_bp, axis=-1) + self.logit_bias[...]
