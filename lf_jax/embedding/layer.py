"""NNX wrapper: an EmbeddingCollection and its state inside a Flax NNX model.

The state lives in an ``EmbeddingState`` variable, not an ``nnx.Param``, so
``nnx.grad``/``nnx.Optimizer`` (which default to Params) never build a dense table
gradient. Train by differentiating the loss w.r.t. the looked-up activations, then
call ``apply_gradients`` with them.

Example:
    >>> class Model(nnx.Module):
    ...     def __init__(self, collection, rngs):
    ...         self.embedding = Embedding(collection, key=jax.random.key(0))
    ...         self.head = nnx.Linear(16, 1, rngs=rngs)
    >>> @nnx.jit
    ... def train_step(model, optimizer, batch, labels):
    ...     acts = model.embedding(batch)                       # {feature: [B, D]}
    ...     def loss_fn(model, acts):
    ...         return jnp.mean((model.head(acts["actor"])[:, 0] - labels) ** 2)
    ...     loss, (g_model, g_acts) = nnx.value_and_grad(loss_fn, argnums=(0, 1))(model, acts)
    ...     optimizer.update(model, g_model)                    # dense params only
    ...     model.embedding.apply_gradients(batch, g_acts)      # touched rows only
    ...     return loss
"""

from collections.abc import Mapping

import jax
from flax import nnx

from lf_jax.embedding.collection import EmbeddingCollection, SparseBatch


class EmbeddingState(nnx.Variable):
    """Embedding tables, optimizer slots and step: updated sparsely, never by nnx.grad."""


class Embedding(nnx.Module):
    """Looks up every feature of ``collection``; see the module docstring."""

    def __init__(
        self,
        collection: EmbeddingCollection,
        *,
        key: jax.Array | None = None,
        state: Mapping | None = None,
    ):
        if (key is None) == (state is None):
            raise ValueError("Embedding needs exactly one of key= (fresh tables) or state=")
        self.collection = collection
        if state is None:
            assert key is not None  # exactly one of them, checked above
            state = collection.init(key)
        self.state = EmbeddingState(dict(state))

    def __call__(self, batch: SparseBatch) -> dict[str, jax.Array]:
        """Activations per feature: pooled [B, D] or sequence [B, max_ids, D]."""
        return self.collection.lookup(self.state.get_value()["tables"], batch)

    def apply_gradients(
        self, batch: SparseBatch, activation_grads: Mapping, microbatched: bool = False
    ) -> None:
        """Sparse update of the touched rows from gradients w.r.t. the activations."""
        self.state.set_value(
            self.collection.apply_gradients(
                self.state.get_value(), batch, activation_grads, microbatched
            )
        )

    def logical_tables(self):
        """Tables in logical [vocab_size, dim] form (numpy)."""
        return self.collection.logical_tables(self.state.get_value())
