"""The feed ranker's forward pass for serving, split into member-only, post-only and pair work.

A ranking request scores K candidate posts for one member. Every column of the model's
input x0 = [gated fields, dots, dense] depends on the member only (its id, history and
position embeddings, their gates, the dots among them, its activity), on the post only
(author, hashtag and post embeddings, their gates and dots, the post's counters and age),
or on the pair (member x post dots, the affinity features). ``Split`` sorts the columns
into those three groups (M, P, X). Every layer that reads x0 (the first MLP layer and its
hidden gate, the first cross layer's W, or its down projection when low rank) is split by
rows:

    x0 @ W = x0_M @ W[M]      once per query                  [Q, H_M] @ [H_M, F]
           + x0_P @ W[P]      once per post, at version load  [N, H_P] @ [H_P, F]
           + x0_X @ W[X]      once per pair                   [Q*K, H_X] @ [H_X, F]

``post_side`` computes, for every post, x0_P and x0_P @ W[P] (one row of the post cache);
``split_logits`` computes the member side once per query, gathers the candidates' cache
rows and does only the pair work: the member x post dots (one product per width), the
pair features, one [H_X, F] product for all first layers, then the layers after the first
(which read the pair's whole activations) and the task heads. Inside the cross network
x0 is held with its columns in group order (M, P, X); the cross and head weights are
permuted to match, so nothing is scattered back. Sums are reassociated: scores agree with
the model to float32 rounding (~1e-7), not bit for bit.

Shapes: Q queries, K candidates per query, N posts, D_f a field's width, F the summed
output width of the first layers, C = H_P + F the cache width, T tasks.

Example:
    >>> split = Split.of(ranker, field_dims, member_fields=("member_id", "position"),
    ...                  dense_groups=("post", "member", "pair"))
    >>> cache_nc = post_side(ranker, split, {"actor_id": a_nd, ...}, post_dense_nd)
    >>> logits = split_logits(ranker, split, {"member_id": m_qd, ...}, member_dense_qd,
    ...                       cache_nc[post_rows_qk.reshape(-1)], pair_dense_pd, candidates=K)
"""

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.models.ranker import FeedRanker

GROUPS = ("member", "post", "pair")


@dataclasses.dataclass(frozen=True)
class Split:
    """x0's columns by group, each group in its own order (see the module docstring).

    order[g]: the model's x0 column indices of group g, in the order the served pass holds
    them: member and post: their fields' blocks (model order), the dots among them, their
    dense columns; pair: the member x post dots per width as [post field, member field]
    (the einsum's order), then the pair dense columns. dense[g]: dense column indices of g.
    """

    field_dims: dict[str, int]
    member_fields: tuple[str, ...]
    post_fields: tuple[str, ...]
    order: dict[str, np.ndarray]
    dense: dict[str, np.ndarray]

    @classmethod
    def of(
        cls,
        model: FeedRanker,
        field_dims: Mapping[str, int],
        *,
        member_fields: Sequence[str],
        dense_groups: Sequence[str],
    ) -> "Split":
        if set(field_dims) != set(model.sparse_fields) or not set(member_fields) <= set(field_dims):
            raise ValueError(
                f"field_dims {sorted(field_dims)} must name the model's fields "
                f"{sorted(model.sparse_fields)}, member_fields {sorted(member_fields)} among them"
            )
        if len(dense_groups) != model.num_dense or set(dense_groups) - set(GROUPS):
            raise ValueError(
                f"dense_groups must give one of {GROUPS} for each of the model's "
                f"{model.num_dense} dense columns, got {list(dense_groups)}"
            )
        names = model.sparse_fields
        dims = [int(field_dims[n]) for n in names]
        starts = np.cumsum([0, *dims])
        group = ["member" if n in member_fields else "post" for n in names]
        order: dict[str, list[int]] = {g: [] for g in GROUPS}
        for g in ("member", "post"):
            for i in range(len(names)):
                if group[i] == g:
                    order[g].extend(range(starts[i], starts[i + 1]))
        column = int(starts[-1])
        dot_column = {}
        if model.dot_interactions:
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    if dims[i] == dims[j]:
                        dot_column[i, j] = dot_column[j, i] = column
                        if group[i] == group[j]:
                            order[group[i]].append(column)
                        column += 1
            for width in sorted(set(dims)):
                posts = [i for i in range(len(names)) if group[i] == "post" and dims[i] == width]
                members = [
                    i for i in range(len(names)) if group[i] == "member" and dims[i] == width
                ]
                order["pair"].extend(dot_column[p, m] for p in posts for m in members)
        dense = {
            g: np.asarray([c for c, d in enumerate(dense_groups) if d == g], np.int32)
            for g in GROUPS
        }
        for g in GROUPS:
            order[g].extend(column + dense[g])
        return cls(
            field_dims=dict(zip(names, dims, strict=True)),
            member_fields=tuple(n for n in names if n in member_fields),
            post_fields=tuple(n for n in names if n not in member_fields),
            order={g: np.asarray(v, np.int32) for g, v in order.items()},
            dense=dense,
        )

    @property
    def perm(self) -> np.ndarray:
        """[H]: x0's model column index at each position of the served order (M, P, X)."""
        return np.concatenate([self.order[g] for g in GROUPS])

    def width(self, group: str) -> int:
        return len(self.order[group])


def _gated(model: FeedRanker, name: str, x_bd: jax.Array) -> jax.Array:
    if model.gate is None:
        return x_bd
    gate = model.gate.gates[model.sparse_fields.index(name)]
    return x_bd * 2.0 * jax.nn.sigmoid(gate(x_bd))


def _first_layers(model: FeedRanker) -> list[nnx.Linear]:
    """The layers that read x0, in the order their outputs sit in the F columns."""
    layers = []
    if len(model.mlp.layers):
        layers.append(model.mlp.layers[0])
        if model.mlp.gates is not None:
            layers.append(model.mlp.gates[0])
    if model.cross is not None:
        first = model.cross.layers[0]
        layers.append(first.down if first.low_rank else first.full)
    return layers


def _first_kernel(model: FeedRanker, split: Split) -> tuple[jax.Array, jax.Array]:
    """(kernel [H, F] with x0's rows in model order, bias [F]) of the first layers; a full
    rank cross layer's output columns are permuted to the served order."""
    kernels, biases = [], []
    for layer in _first_layers(model):
        kernel = layer.kernel[...]
        bias = layer.bias[...] if layer.bias is not None else jnp.zeros(kernel.shape[1])
        if model.cross is not None and layer is getattr(model.cross.layers[0], "full", None):
            kernel, bias = kernel[:, split.perm], bias[split.perm]
        kernels.append(kernel)
        biases.append(bias)
    return jnp.concatenate(kernels, axis=1), jnp.concatenate(biases)


def _pairwise(fields: list[jax.Array]) -> list[jax.Array]:
    """Dots [B, 1] of every i < j pair of same-width fields, the model's order."""
    return [
        jnp.sum(fields[i] * fields[j], axis=-1, keepdims=True)
        for i in range(len(fields))
        for j in range(i + 1, len(fields))
        if fields[i].shape[-1] == fields[j].shape[-1]
    ]


def _side(model: FeedRanker, split: Split, group: str, fields, dense) -> jax.Array:
    """x0_M [Q, H_M] or x0_P [N, H_P] in the group's order from its pooled fields and its
    standardised dense columns."""
    names = split.member_fields if group == "member" else split.post_fields
    gated = [_gated(model, n, fields[n]) for n in names]
    parts = list(gated)
    if model.dot_interactions:
        parts.extend(_pairwise(gated))
    if len(split.dense[group]):
        parts.append(dense)
    return jnp.concatenate(parts, axis=-1)


def post_side(
    model: FeedRanker, split: Split, post_fields: Mapping[str, jax.Array], post_dense
) -> jax.Array:
    """The post cache [N, H_P + F]: x0_P and x0_P @ W[P] of N posts.

    post_fields: {post field: pooled [N, D_f]}; post_dense: standardised [N, d_P] (the
    dense columns of group "post"; None when there are none)."""
    x0_p = _side(model, split, "post", post_fields, post_dense)
    kernel, _ = _first_kernel(model, split)
    return jnp.concatenate([x0_p, x0_p @ kernel[split.order["post"]]], axis=-1)


def split_logits(
    model: FeedRanker,
    split: Split,
    member_fields: Mapping[str, jax.Array],
    member_dense,
    cache_pc: jax.Array,
    pair_dense,
    *,
    candidates: int,
) -> jax.Array:
    """Logits [Q*K, T] (pairs in query-major order).

    member_fields: {member field: pooled [Q, D_f]}; member_dense: standardised [Q, d_M];
    cache_pc: the candidates' post cache rows [Q*K, C] (``post_side``); pair_dense:
    standardised [Q*K, d_X] (None where a group has no dense columns)."""
    k = candidates
    x0_m = _side(model, split, "member", member_fields, member_dense)  # [Q, H_M]
    q = x0_m.shape[0]
    h_p = split.width("post")
    x0_p = cache_pc[:, :h_p]
    kernel, bias = _first_kernel(model, split)
    pair_parts = []
    if model.dot_interactions:
        members = [_gated(model, n, member_fields[n]) for n in split.member_fields]
        offsets = np.cumsum([0, *(split.field_dims[n] for n in split.post_fields)])
        for width in sorted(set(split.field_dims.values())):
            m = [
                x for n, x in zip(split.member_fields, members, strict=True) if x.shape[-1] == width
            ]
            p = [
                x0_p[:, offsets[i] : offsets[i + 1]]
                for i, n in enumerate(split.post_fields)
                if split.field_dims[n] == width
            ]
            if m and p:
                p_qkfd = jnp.stack(p, axis=1).reshape(q, k, len(p), width)
                pm = jnp.einsum("qkpd,qmd->qkpm", p_qkfd, jnp.stack(m, axis=1))
                pair_parts.append(pm.reshape(q * k, len(p) * len(m)))
    if len(split.dense["pair"]):
        pair_parts.append(pair_dense)
    x0_x = jnp.concatenate(pair_parts, axis=-1) if pair_parts else None
    per_query = x0_m @ kernel[split.order["member"]] + bias  # [Q, F]
    first = cache_pc[:, h_p:].reshape(q, k, -1) + per_query[:, None, :]
    first = first.reshape(q * k, -1)
    if x0_x is not None:
        first = first + x0_x @ kernel[split.order["pair"]]

    def x0_served():  # [Q*K, H], columns in the served order
        parts = [jnp.broadcast_to(x0_m[:, None, :], (q, k, x0_m.shape[1])).reshape(q * k, -1)]
        return jnp.concatenate([*parts, x0_p, *([x0_x] if x0_x is not None else [])], axis=-1)

    perm = split.perm
    used, top = 0, []
    mlp = model.mlp
    if len(mlp.layers):
        width = mlp.layers[0].out_features
        y_bh = jax.nn.relu(first[:, :width])
        used = width
        if mlp.gates is not None:
            y_bh = y_bh * 2.0 * jax.nn.sigmoid(first[:, width : 2 * width])
            used = 2 * width
        for index in range(1, len(mlp.layers)):
            x_bh = y_bh
            y_bh = jax.nn.relu(mlp.layers[index](x_bh))
            if mlp.gates is not None:
                y_bh = y_bh * 2.0 * jax.nn.sigmoid(mlp.gates[index](x_bh))
        top.append((y_bh, None))
    else:
        top.append((x0_served(), perm))
    if model.cross is not None:
        x0_bh = x0_served()
        x_bh = x0_bh
        for index, cross in enumerate(model.cross.layers):
            if cross.low_rank:
                low = first[:, used:] if index == 0 else x_bh @ cross.down.kernel[...][perm]
                mixed_bh = low @ cross.up.kernel[...][:, perm] + cross.up.bias[...][perm]
            elif index == 0:
                mixed_bh = first[:, used:]
            else:
                full = cross.full
                mixed_bh = x_bh @ full.kernel[...][perm][:, perm] + full.bias[...][perm]
            x_bh = x0_bh * mixed_bh + x_bh
        top.append((x_bh, perm))
    top_bh = jnp.concatenate([x for x, _ in top], axis=-1)
    # rows of the heads' input kernels in the served order of their input columns
    rows, start = [], 0
    for x, p in top:
        rows.append(start + (np.arange(x.shape[-1]) if p is None else p))
        start += x.shape[-1]
    head_rows = np.concatenate(rows)
    logits = []
    for head in model.heads:
        first_layer = head.hidden if head.hidden is not None else head.out
        h = top_bh @ first_layer.kernel[...][head_rows]
        if first_layer.bias is not None:
            h = h + first_layer.bias[...]
        if head.hidden is not None:
            h = head.out(jax.nn.relu(h))
        logits.append(h[:, 0])
    return jnp.stack(logits, axis=-1)
