"""Member/item dual encoder: one Llama-architecture decoder reads both prompts (the prompt
says which side it is) and pools its hidden states into a vector whose nested prefixes
(Matryoshka dims) are each usable embeddings.

Shapes: B batch, L tokens, D hidden (= full embedding dim).

Example:
    >>> model = DualEncoder(LlamaConfig(vocab_size=640, hidden_size=64, num_layers=2, num_heads=4,
    ...                                 num_kv_heads=2, intermediate_size=128), rngs=nnx.Rngs(0))
    >>> member_bd = model.embed(ids_bl, mask_bl)       # [B, 64]; normalise prefixes to use them
"""

import jax
from flax import nnx

from lf_jax.errors import UserInputError
from lf_jax.models.attention import mean_pool
from lf_jax.models.causal_lm import LlamaConfig, LlamaModel, last_token_pool

POOLINGS = ("last", "mean")


class DualEncoder(nnx.Module):
    """LlamaModel + last-token (default: the prompt ends with an eos token) or mean pooling."""

    def __init__(self, config: LlamaConfig, *, pooling: str = "last", rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise UserInputError(f"dual encoder pooling={pooling!r} is not one of {POOLINGS}")
        self.decoder = LlamaModel(config, rngs=rngs)
        self.pooling = pooling

    def embed(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array) -> jax.Array:
        """Pooled hidden states [B, D] (float32, not normalised)."""
        hidden_bld = self.decoder(input_ids_bl, attention_mask_bl)
        if self.pooling == "last":
            return last_token_pool(hidden_bld, attention_mask_bl)
        return mean_pool(hidden_bld, attention_mask_bl)
