"""Feature-interaction blocks of the feed ranker: MLP, DCNv2 cross layers, GateNet gates.

Shapes: B batch, F number of embedding fields, D embedding dim, H hidden width.

Example:
    >>> cross = CrossNetwork(in_features=64, num_layers=3, low_rank=16, rngs=nnx.Rngs(0))
    >>> cross(x_bh).shape
    (B, 64)
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Dense layers with ReLU; optional GateNet hidden-layer gates after each layer.

    A hidden gate multiplies a layer's output by 2*sigmoid(W x) of the layer's input
    (GateNet's hidden gating), so gates start close to identity.
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], *, hidden_gates: bool = False, rngs: nnx.Rngs
    ):
        sizes = [in_features, *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=False)]
        )
        self.gates = (
            nnx.List(
                [
                    nnx.Linear(a, b, rngs=rngs, kernel_init=nnx.initializers.zeros)
                    for a, b in zip(sizes[:-1], sizes[1:], strict=False)
                ]
            )
            if hidden_gates
            else None
        )
        self.out_features = sizes[-1]

    def __call__(self, x_bh: jax.Array) -> jax.Array:
        for index, layer in enumerate(self.layers):
            y_bh = jax.nn.relu(layer(x_bh))
            if self.gates is not None:
                y_bh = y_bh * 2.0 * jax.nn.sigmoid(self.gates[index](x_bh))
            x_bh = y_bh
        return x_bh


class CrossLayer(nnx.Module):
    """DCNv2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l; W is full or U V^T (low rank)."""

    def __init__(self, in_features: int, low_rank: int = 0, *, rngs: nnx.Rngs):
        if low_rank < 0:
            raise ValueError(f"low_rank must be >= 0, got {low_rank}")
        self.low_rank = low_rank
        if low_rank:
            self.down = nnx.Linear(in_features, low_rank, use_bias=False, rngs=rngs)
            self.up = nnx.Linear(low_rank, in_features, rngs=rngs)
        else:
            self.full = nnx.Linear(in_features, in_features, rngs=rngs)

    def __call__(self, x0_bh: jax.Array, x_bh: jax.Array) -> jax.Array:
        mixed_bh = self.up(self.down(x_bh)) if self.low_rank else self.full(x_bh)
        return x0_bh * mixed_bh + x_bh


class CrossNetwork(nnx.Module):
    """A stack of DCNv2 cross layers (full rank when low_rank == 0)."""

    def __init__(self, in_features: int, num_layers: int, low_rank: int = 0, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CrossLayer(in_features, low_rank, rngs=rngs) for _ in range(num_layers)]
        )

    def __call__(self, x0_bh: jax.Array) -> jax.Array:
        x_bh = x0_bh
        for layer in self.layers:
            x_bh = layer(x0_bh, x_bh)
        return x_bh


class EmbeddingGate(nnx.Module):
    """GateNet embedding gates: each field's vector scaled by 2*sigmoid of a gate.

    ``vector=False`` gives one scalar gate per field; ``vector=True`` one gate per
    dimension. The gate reads the field's own embedding; fields may differ in dim.
    Gates start at 1 (zero kernels).
    """

    def __init__(self, dims: Sequence[int], *, vector: bool = False, rngs: nnx.Rngs):
        self.gates = nnx.List(
            [
                nnx.Linear(dim, dim if vector else 1, rngs=rngs, kernel_init=nnx.initializers.zeros)
                for dim in dims
            ]
        )

    def __call__(self, fields: Sequence[jax.Array]) -> list[jax.Array]:
        """Per field [B, D_f] -> gated [B, D_f]."""
        return [
            emb_bd * 2.0 * jax.nn.sigmoid(gate(emb_bd))
            for gate, emb_bd in zip(self.gates, fields, strict=False)
        ]


def pairwise_dots(fields: Sequence[jax.Array]) -> jax.Array:
    """Dot products of every pair of same-width fields (DLRM-style interaction).

    fields: F arrays [B, D_f] -> [B, P] with P = number of pairs (i < j) whose widths match;
    a member vector dotted with an author vector is the affinity a feed ranker needs, and
    an MLP or cross layer only approximates it.

    Example:
        >>> dots_bp = pairwise_dots([member_bd, actor_bd, hashtags_bd])   # [B, 3]
    """
    pairs = [
        (i, j)
        for i in range(len(fields))
        for j in range(i + 1, len(fields))
        if fields[i].shape[-1] == fields[j].shape[-1]
    ]
    if not pairs:
        return jnp.zeros((fields[0].shape[0], 0), fields[0].dtype)
    return jnp.stack([jnp.sum(fields[i] * fields[j], axis=-1) for i, j in pairs], axis=-1)
