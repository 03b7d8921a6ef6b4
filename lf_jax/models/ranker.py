"""The multi-task feed ranker: pooled sparse embeddings + dense features -> task logits.

Blocks (each switchable, so an ablation is one config override):
  GateNet embedding gates -> optional pairwise dot products of same-width fields -> [cross network
  (DCNv2, full or low rank) || wide MLP with
  optional GateNet hidden gates] -> one head per task.

Shapes: B batch, D_f dim of field f, K dense features, T tasks.

Example:
    >>> ranker = FeedRanker(field_dims={"member": 16, "actor": 16}, num_dense=8,
    ...                     tasks=("like", "comment"), rngs=nnx.Rngs(0))
    >>> logits_bt = ranker({"member": m_bd, "actor": a_bd}, dense_bk)
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lf_jax.models.interactions import MLP, CrossNetwork, EmbeddingGate, pairwise_dots


class TaskHead(nnx.Module):
    """One task's tower: optional hidden layer, then a single logit."""

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs) if hidden else None
        self.out = nnx.Linear(hidden or in_features, 1, rngs=rngs)

    def __call__(self, x_bh: jax.Array) -> jax.Array:
        if self.hidden is not None:
            x_bh = jax.nn.relu(self.hidden(x_bh))
        return self.out(x_bh)[:, 0]


class FeedRanker(nnx.Module):
    """Multi-task ranker over embedding activations and dense features."""

    def __init__(
        self,
        *,
        field_dims: Mapping[str, int],
        num_dense: int,
        tasks: Sequence[str],
        mlp_dims: Sequence[int] = (256, 128),
        dcn_layers: int = 2,
        dcn_low_rank: int = 0,
        gatenet: bool = True,
        gatenet_vector: bool = False,
        hidden_gates: bool = True,
        head_hidden: int = 0,
        dot_interactions: bool = False,
        rngs: nnx.Rngs,
    ):
        if not field_dims or not tasks:
            raise ValueError("FeedRanker needs at least one sparse field and one task")
        self.sparse_fields = tuple(field_dims)
        self.tasks = tuple(tasks)
        self.num_dense = num_dense
        self.gate = (
            EmbeddingGate(list(field_dims.values()), vector=gatenet_vector, rngs=rngs)
            if gatenet
            else None
        )
        self.dot_interactions = dot_interactions
        dims = list(field_dims.values())
        num_dots = sum(
            dims[i] == dims[j] for i in range(len(dims)) for j in range(i + 1, len(dims))
        )
        width = sum(dims) + num_dense + (num_dots if dot_interactions else 0)
        self.cross = (
            CrossNetwork(width, dcn_layers, dcn_low_rank, rngs=rngs) if dcn_layers else None
        )
        self.mlp = MLP(width, mlp_dims, hidden_gates=hidden_gates, rngs=rngs)
        top = self.mlp.out_features + (width if self.cross is not None else 0)
        self.heads = nnx.List([TaskHead(top, head_hidden, rngs=rngs) for _ in tasks])

    def __call__(
        self, activations: Mapping[str, jax.Array], dense_bk: jax.Array | None
    ) -> jax.Array:
        """Logits [B, T] from activations {field: [B, D_f]} and standardised dense [B, K]."""
        fields = [activations[name] for name in self.sparse_fields]
        if self.gate is not None:
            fields = self.gate(fields)
        parts = list(fields)
        if self.dot_interactions:
            parts.append(pairwise_dots(fields))
        if self.num_dense:
            parts.append(dense_bk)
        x0_bh = jnp.concatenate(parts, axis=-1)
        top = [self.mlp(x0_bh)]
        if self.cross is not None:
            top.append(self.cross(x0_bh))
        top_bh = jnp.concatenate(top, axis=-1)
        return jnp.stack([head(top_bh) for head in self.heads], axis=-1)
