"""The feed ranker's forward pass for serving, with the member-only work done once per query.

A ranking request scores K candidates for one member: every input column that depends only
on the member (its pooled id, history and position embeddings, their gates, the dot
products among them) is the same for all K pairs. ``folded_logits`` computes exactly what
``FeedRanker.__call__`` computes on the concatenated input x0 = [gated fields, dots, dense],
but splits every layer that reads x0 (the first MLP layer and its hidden gate, the first
cross layer's W, or its down projection when low rank) by columns:

    x0 @ W = x0[:, member_cols] @ W[member_cols]   (once per query:      [Q, H_m] @ [H_m, O])
           + x0[:, pair_cols] @ W[pair_cols]       (once per pair:  [Q*K, H_p] @ [H_p, O])

so the per-pair multiply-adds of those layers shrink by H_m / H. Layers after the first
(x_l for l >= 1, the heads) depend on the pair and run per pair as in the model; linear
task heads run as one [H, T] product. The sum is reassociated, so scores agree with the
model to float32 rounding (~1e-7), not bit for bit.

Shapes: Q queries, K candidates per query, D_f a field's width, T tasks.

Example:
    >>> logits_qk_t = folded_logits(ranker, {"member_id": m_qd, "position": p_qd, ...},
    ...                             {"actor_id": a_pd, ...}, dense_pk, candidates=K)
    >>> np.allclose(logits_qk_t, ranker(all_fields_repeated, dense_pk), atol=1e-5)
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.models.ranker import FeedRanker


def _gated(model: FeedRanker, name: str, x_bd: jax.Array) -> jax.Array:
    if model.gate is None:
        return x_bd
    gate = model.gate.gates[model.sparse_fields.index(name)]
    return x_bd * 2.0 * jax.nn.sigmoid(gate(x_bd))


def _split_linear(
    layer: nnx.Linear, member_qh, pair_ph, member_cols, pair_cols, candidates: int
) -> jax.Array:
    """layer(x0) [Q*K, O] from the member columns [Q, H_m] and the pair columns [Q*K, H_p]."""
    kernel = layer.kernel[...]
    per_query = member_qh @ kernel[member_cols]
    if layer.bias is not None:
        per_query = per_query + layer.bias[...]
    per_pair = pair_ph @ kernel[pair_cols]
    q, out = per_query.shape
    return (per_pair.reshape(q, candidates, out) + per_query[:, None, :]).reshape(-1, out)


def _dots(fields: list[tuple[bool, jax.Array]], q: int, k: int) -> list[tuple[bool, jax.Array]]:
    """The model's pairwise dots (i < j, same width, its order) as (member?, [rows, 1]) blocks:
    member x member once per query; member x pair as one [Q, K, F_p, D] x [Q, F_m, D]
    product and pair x pair as one [Q, K, F_p, F_p] product per width."""
    products = {}
    for width in sorted({x.shape[-1] for _, x in fields}):
        members = [i for i, (m, x) in enumerate(fields) if m and x.shape[-1] == width]
        pairs = [i for i, (m, x) in enumerate(fields) if not m and x.shape[-1] == width]
        if pairs:
            p_qkfd = jnp.stack([fields[i][1] for i in pairs], axis=1).reshape(q, k, -1, width)
            pp = jnp.sum(p_qkfd[:, :, :, None, :] * p_qkfd[:, :, None, :, :], axis=-1)
            for a, i in enumerate(pairs):
                for b, j in enumerate(pairs):
                    products[i, j] = pp[:, :, a, b].reshape(-1, 1)
            if members:
                m_qfd = jnp.stack([fields[i][1] for i in members], axis=1)
                pm = jnp.einsum("qkpd,qmd->qkpm", p_qkfd, m_qfd)
                for a, i in enumerate(pairs):
                    for b, j in enumerate(members):
                        products[i, j] = products[j, i] = pm[:, :, a, b].reshape(-1, 1)
    out = []
    for i in range(len(fields)):
        for j in range(i + 1, len(fields)):
            (mi, xi), (mj, xj) = fields[i], fields[j]
            if xi.shape[-1] != xj.shape[-1]:
                continue
            if mi and mj:
                out.append((True, jnp.sum(xi * xj, axis=-1, keepdims=True)))
            else:
                out.append((False, products[i, j]))
    return out


def folded_logits(
    model: FeedRanker,
    member_fields: Mapping[str, jax.Array],
    pair_fields: Mapping[str, jax.Array],
    dense_pk: jax.Array | None,
    *,
    candidates: int,
) -> jax.Array:
    """Logits [Q*K, T] of ``model`` (pairs in query-major order).

    member_fields: {field: [Q, D_f]} for the fields that depend only on the member;
    pair_fields: {field: [Q*K, D_f]} for the others (every field of the model in exactly
    one); dense_pk: standardised dense features [Q*K, K_d] (None without dense features).
    """
    missing = set(model.sparse_fields) - set(member_fields) - set(pair_fields)
    both = set(member_fields) & set(pair_fields)
    if missing or both:
        raise ValueError(
            f"every field in exactly one of member_fields / pair_fields: missing "
            f"{sorted(missing)}, in both {sorted(both)}"
        )

    if not member_fields:
        raise ValueError("folded_logits needs at least one member field")
    q = next(iter(member_fields.values())).shape[0]

    def widen(x_qd):  # [Q, D] -> [Q*K, D]
        return jnp.repeat(x_qd, candidates, axis=0)

    # x0 column blocks in the model's order, each tagged member (per query) or pair.
    blocks: list[tuple[bool, jax.Array]] = []
    for name in model.sparse_fields:
        is_member = name in member_fields
        x = member_fields[name] if is_member else pair_fields[name]
        blocks.append((is_member, _gated(model, name, x)))
    if model.dot_interactions:
        blocks.extend(_dots(list(blocks), q, candidates))
    if model.num_dense:
        if dense_pk is None:
            raise ValueError(f"the model reads {model.num_dense} dense features; got none")
        blocks.append((False, dense_pk))
    member_cols: list[int] = []
    pair_cols: list[int] = []
    start = 0
    for is_member, x in blocks:
        cols = range(start, start + x.shape[-1])
        (member_cols if is_member else pair_cols).extend(cols)
        start += x.shape[-1]
    member_cols_np = np.asarray(member_cols, np.int32)
    pair_cols_np = np.asarray(pair_cols, np.int32)
    member_qh = jnp.concatenate([x for m, x in blocks if m], axis=-1)
    pair_ph = jnp.concatenate([x for m, x in blocks if not m], axis=-1)

    def first_layer(layer):
        return _split_linear(layer, member_qh, pair_ph, member_cols_np, pair_cols_np, candidates)

    def full_x0():  # [Q*K, H]: the whole x0, for what reads it elementwise
        return jnp.concatenate([widen(x) if m else x for m, x in blocks], axis=-1)

    mlp, top = model.mlp, []
    if len(mlp.layers):
        y_bh = jax.nn.relu(first_layer(mlp.layers[0]))
        if mlp.gates is not None:
            y_bh = y_bh * 2.0 * jax.nn.sigmoid(first_layer(mlp.gates[0]))
        for index in range(1, len(mlp.layers)):
            x_bh = y_bh
            y_bh = jax.nn.relu(mlp.layers[index](x_bh))
            if mlp.gates is not None:
                y_bh = y_bh * 2.0 * jax.nn.sigmoid(mlp.gates[index](x_bh))
        top.append(y_bh)
    else:
        top.append(full_x0())
    if model.cross is not None:
        x0_bh = full_x0()
        x_bh = x0_bh
        for index, cross in enumerate(model.cross.layers):
            if cross.low_rank:
                low = first_layer(cross.down) if index == 0 else cross.down(x_bh)
                mixed_bh = cross.up(low)
            else:
                mixed_bh = first_layer(cross.full) if index == 0 else cross.full(x_bh)
            x_bh = x0_bh * mixed_bh + x_bh
        top.append(x_bh)
    top_bh = jnp.concatenate(top, axis=-1)
    biases = [head.out.bias for head in model.heads]
    if any(head.hidden is not None for head in model.heads) or None in biases:
        return jnp.stack([head(top_bh) for head in model.heads], axis=-1)
    # linear heads: one [H, T] product instead of T products of width 1
    kernel_ht = jnp.concatenate([head.out.kernel[...] for head in model.heads], axis=-1)
    bias_t = jnp.concatenate([bias[...] for bias in biases if bias is not None])
    return top_bh @ kernel_ht + bias_t
