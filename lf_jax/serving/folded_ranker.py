"""The feed ranker's forward pass for serving, split into member-only, post-only and pair work.

A ranking request scores K candidate posts for one member. Every column of the model's
input x0 = [gated fields, dots, dense] depends on the member only (its id, history and
position embeddings, their gates, the dots among them, its activity), on the post only
(author, hashtag and post embeddings, their gates and dots, the post's counters and age),
or on the pair (member x post dots, the affinity features). ``Split`` (ranker_split.py)
sorts the columns into those three groups (M, P, X). Every layer that reads x0 (the first
MLP layer and its hidden gate, the first cross layer's W, or its down projection when low
rank) is split by rows:

    x0 @ W = x0_M @ W[M]      once per query                  [Q, H_M] @ [H_M, F]
           + x0_P @ W[P]      once per post, at version load  [N, H_P] @ [H_P, F]
           + x0_X @ W[X]      once per pair                   [Q*K, H_X] @ [H_X, F]

A low-rank cross network folds whole: with x_{l+1} = x0 * (low_l @ U_l + b_l) + x_l,
x_l = x0 * s_l where s_l = c_l + sum_{j<l} low_j @ U_j, so low_l = x_l @ D_l and the
heads' cross term x_L @ W_c are products of x0 too, linear ones (c_l * D_l, c_L * W_c)
and [r, r] and [r, T'] mixes by the earlier low_j (``_x0_kernel``): no H-wide array is
formed per pair. A mix's member part is a matrix per query; its post and pair parts are
computed per pair as ((low_j @ U_j[:, G]) * x0_G) @ [D_l, W_c][G] for G = P, X
(``_direct_mixes``), so the post cache holds x0_P (139 floats for the demo ranker)
instead of the post's mix columns (384). The last layer's [r, T'] mix of the heads is
the exception when r*T' is small (``_expanded_mix``: 64 columns for the demo ranker): it
is computed like a linear product (post part cached, pair part in the pair product) and
contracted with low_{L-1} per pair. A full-rank cross network does not fold: x0 is
rebuilt per pair with its columns in group order (M, P, X) and the cross and head
weights are permuted to match, so nothing is scattered back.

``x0_kernels`` gives the x0 products' weights by group (weights only: the export computes
them once); ``post_side`` computes, for every post, x0_P (or the post fields the pair
dots read) and x0_P @ W[P] for the linear products (one row of the post cache);
``split_logits`` computes the member side once per query, takes the candidates' cache
rows and does only the pair work: the member x post dots (one product per width), the
pair features, one [H_X, F_lin] product, the mixes, the MLP layers after the first and
the heads. Sums are reassociated: scores agree with the model to float32 rounding
(~1e-7), not bit for bit.

Shapes: Q queries, K candidates per query, N posts, D_f a field's width, H x0's width
(H_M + H_P + H_X), F the width of all x0 products (F_lin: the linear ones, the mixes
after them), C the cache width, r the cross rank,
T tasks, T' the heads' first-layer width.

Example:
    >>> split = Split.of(ranker, field_dims, member_fields=("member_id", "position"),
    ...                  dense_groups=("post", "member", "pair"))
    >>> kernels = x0_kernels(ranker, split)     # weights only: once, at export
    >>> cache_nc = post_side(ranker, split, kernels, {"actor_id": a_nd, ...}, post_dense_nd)
    >>> logits = split_logits(ranker, split, {"member_id": m_qd, ...}, member_dense_qd,
    ...                       cache_nc[post_rows_qk.reshape(-1)], pair_dense_pd,
    ...                       kernels=kernels, candidates=K)
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.models.ranker import FeedRanker
from lf_jax.serving.ranker_split import Split


def _gated(model: FeedRanker, name: str, x_bd: jax.Array) -> jax.Array:
    if model.gate is None:
        return x_bd
    gate = model.gate.gates[model.sparse_fields.index(name)]
    return x_bd * 2.0 * jax.nn.sigmoid(gate(x_bd))


def _bias(layer: nnx.Linear) -> jax.Array:
    """The layer's bias [O] (zeros for a layer without one)."""
    return layer.bias[...] if layer.bias is not None else jnp.zeros(layer.kernel.shape[1])


def folds_cross(model: FeedRanker) -> bool:
    """Whether the cross network folds into x0 products (none, or low-rank layers only)."""
    return model.cross is None or all(layer.low_rank for layer in model.cross.layers)


def _expanded_mix(model: FeedRanker, split: Split) -> str | None:
    """The mix computed like a linear block ("y<L-1>": the last cross layer's [r, T'] mix
    of the heads), or None. Its x0_P part sits in the post cache and its x0_X part in the
    pair product, so the pair work contracts low_{L-1} with r*T' columns per pair instead
    of the direct [P, H_P + H_X] products of ``_direct_mixes`` (the demo ranker: 64 more
    cache columns, 7.8 instead of 8.7 CPU ms per 2,048 pairs with ``_direct_mixes``'s
    split by group). Only when those r*T' columns are no wider than x0_P and x0_X."""
    if model.cross is None or not folds_cross(model) or not len(model.cross.layers):
        return None
    rank = model.cross.layers[-1].up.kernel.shape[0]
    width = _heads_in(model)[0].shape[1]
    if rank * width > split.width("post") + split.width("pair"):
        return None
    return f"y{len(model.cross.layers) - 1}"


def _heads_in(model: FeedRanker) -> tuple[jax.Array, jax.Array]:
    """(kernel [top, T'], bias [T']) of the heads' first layers side by side: the hidden
    layer of a head that has one, else its output layer."""
    layers = [head.hidden if head.hidden is not None else head.out for head in model.heads]
    kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=1)
    return kernel, jnp.concatenate([_bias(layer) for layer in layers])


def _x0_kernel(model: FeedRanker, split: Split):
    """(kernel [H, F] (x0's rows in model order), bias [F], blocks {name: (start, stop)}): every
    product of x0 the served pass needs, side by side.

    "mlp", "gate": the first MLP layer and its hidden gate. A full-rank cross network:
    "cross0", its first layer (output columns in the served order). A low-rank one folds
    whole (x_l = x0 * s_l with s_l = 1 + sum_{j<l} (low_j @ U_j + b_j)): "low<l>" =
    c_l * D_l with c_l = 1 + sum_{j<l} b_j, "z<j>_<l>" [H, r*r] = U_j[a, h] D_l[h, b]
    (low_l adds low_j . (x0 @ z)), "heads" = c_L * W_c (W_c: the heads' cross rows; plus
    their x0 rows without an MLP; bias: the heads'), "y<j>" [H, r*T'] = U_j[a, h] W_c[h, t]
    (the heads add low_j . (x0 @ y)). The mixes (z, y) come last: per pair, their x0_X
    part is not a product with x0_X (r*r or r*T' columns) but ((low_j @ U_j[:, X]) * x0_X)
    @ [D_l[X], W_c[X]] (``_direct_mixes``); the ``_expanded_mix`` sits among the linear blocks."""
    kernels: list[tuple[str, jax.Array, jax.Array | None]] = []
    mlp = model.mlp
    if len(mlp.layers):
        kernels.append(("mlp", mlp.layers[0].kernel[...], _bias(mlp.layers[0])))
        if mlp.gates is not None:
            kernels.append(("gate", mlp.gates[0].kernel[...], _bias(mlp.gates[0])))
    cross = model.cross
    if cross is not None and not folds_cross(model):
        full = cross.layers[0].full
        perm = split.perm
        kernels.append(("cross0", full.kernel[...][:, perm], _bias(full)[perm]))
    elif cross is not None or not len(mlp.layers):
        width = len(split.perm)
        w_heads, b_heads = _heads_in(model)
        mlp_out = mlp.out_features  # the heads' cross rows start here (x0's width without MLP)
        layers = list(cross.layers) if cross is not None else []
        c = jnp.ones(width)
        for index, layer in enumerate(layers):
            down = layer.down.kernel[...]
            kernels.append((f"low{index}", c[:, None] * down, None))
            for j in range(index):
                up_j = layers[j].up.kernel[...].T  # [H, r]
                z = (up_j[:, :, None] * down[:, None, :]).reshape(width, -1)
                kernels.append((f"z{j}_{index}", z, None))
            c = c + _bias(layer.up)
        w_cross = w_heads[mlp_out:] if layers else jnp.zeros((width, w_heads.shape[1]))
        w_x0 = w_heads[:width] if not len(mlp.layers) else 0.0
        kernels.append(("heads", c[:, None] * w_cross + w_x0, b_heads))
        for j, layer in enumerate(layers):
            up_j = layer.up.kernel[...].T
            y = (up_j[:, :, None] * w_cross[:, None, :]).reshape(width, -1)
            kernels.append((f"y{j}", y, None))
    # the mixes last (the pair work adds their post and pair parts directly, split_logits),
    # but for the one computed like a linear block (_expanded_mix)
    expanded = _expanded_mix(model, split)
    kernels.sort(key=lambda entry: entry[0][0] in "zy" and entry[0] != expanded)
    blocks, start = {}, 0
    for name, kernel, _ in kernels:
        blocks[name] = (start, start + kernel.shape[1])
        start += kernel.shape[1]
    bias = jnp.concatenate([b if b is not None else jnp.zeros(k.shape[1]) for _, k, b in kernels])
    return jnp.concatenate([k for _, k, _ in kernels], axis=1), bias, blocks


def _cached_x0(model: FeedRanker, split: Split) -> int:
    """Columns of x0_P the post cache keeps: all of them with cross layers (a full-rank
    network rebuilds x0 per pair; a low-rank one computes its mixes' post part per pair,
    ``_direct_mixes``), else only the post fields the pair dots read."""
    if model.cross is not None:
        return split.width("post")
    if not model.dot_interactions:
        return 0
    return sum(split.field_dims[name] for name in split.post_fields)


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


def _mix_start(blocks: dict[str, tuple[int, int]], width: int, expanded: str | None) -> int:
    """The first column of the mixes (z, y) among the x0 products (``width`` if none), the
    ``_expanded_mix`` aside (it sits among the linear blocks)."""
    starts = (start for name, (start, _) in blocks.items() if name[0] in "zy" and name != expanded)
    return min(starts, default=width)


def x0_kernels(model: FeedRanker, split: Split) -> dict[str, jax.Array]:
    """The x0 products' kernel (``_x0_kernel``) by row group, as the served pass reads it:
    {"member": [H_M, F], "post": [H_P, F_lin], "pair": [H_X, F_lin] (the linear blocks
    and the ``_expanded_mix``: the other mixes get their post and pair parts in
    ``_direct_mixes``), "bias": [F]}. Functions of the weights alone: the export computes
    them once (ranker_weights)."""
    kernel, bias, blocks = _x0_kernel(model, split)
    linear = _mix_start(blocks, kernel.shape[1], _expanded_mix(model, split))
    return {
        "member": kernel[split.order["member"]],
        "post": kernel[split.order["post"], :linear],
        "pair": kernel[split.order["pair"], :linear],
        "bias": bias,
    }


def post_side(
    model: FeedRanker,
    split: Split,
    kernels: Mapping[str, jax.Array],
    post_fields: Mapping[str, jax.Array],
    post_dense,
) -> jax.Array:
    """The post cache [N, C]: the columns of x0_P the pair work reads (``_cached_x0``) and
    x0_P @ W[P] for every x0 product (``_x0_kernel``) of N posts; kernels: ``x0_kernels``.

    post_fields: {post field: pooled [N, D_f]}; post_dense: standardised [N, d_P] (the
    dense columns of group "post"; None when there are none)."""
    x0_p = _side(model, split, "post", post_fields, post_dense)
    keep = _cached_x0(model, split)
    return jnp.concatenate([x0_p[:, :keep], x0_p @ kernels["post"]], axis=-1)


def _direct_mixes(model: FeedRanker, split: Split, j: int, low_j, x0_p, x0_x) -> list[jax.Array]:
    """x0_P's and x0_X's part (x0_p [P, H_P], x0_x [P, H_X] or None) of the mixes of cross
    layer j's output low_j [P, r]: for each later layer l, low_j . ([x0_P, x0_X] @
    z<j>_<l>[P, X]) [P, r], and low_j . ([x0_P, x0_X] @ y<j>[P, X]) [P, T'] last (unless
    y<j> is the ``_expanded_mix``), computed as ((low_j @ U_j[:, G]) * x0_G) @ [D_l[G] ...,
    W_c[G]] summed over the groups G = P, X (two products per group; no r*r-wide array, the
    post cache holds x0_P instead of the post's r*r and r*T' mix columns, and x0_P and x0_X
    are not concatenated per pair)."""
    assert model.cross is not None  # mixes exist only with cross layers
    layers = list(model.cross.layers)
    w_heads, _ = _heads_in(model)
    targets = [layer.down.kernel[...] for layer in layers[j + 1 :]]
    if _expanded_mix(model, split) != f"y{j}":
        targets.append(w_heads[model.mlp.out_features :])
    if not targets:
        return []
    target = jnp.concatenate(targets, 1)
    up = layers[j].up.kernel[...]
    parts = [
        ((low_j @ up[:, split.order[group]]) * x0_g) @ target[split.order[group]]
        for group, x0_g in (("post", x0_p), ("pair", x0_x))
        if x0_g is not None and len(split.order[group])
    ]
    if not parts:  # neither post nor pair columns: no post or pair part
        parts = [jnp.zeros((low_j.shape[0], target.shape[1]), low_j.dtype)]
    mixed = sum(parts[1:], parts[0])
    ends = np.cumsum([t.shape[1] for t in targets])
    return [mixed[:, stop - t.shape[1] : stop] for t, stop in zip(targets, ends, strict=True)]


def split_logits(
    model: FeedRanker,
    split: Split,
    member_fields: Mapping[str, jax.Array],
    member_dense,
    cache_pc: jax.Array,
    pair_dense,
    *,
    kernels: Mapping[str, jax.Array],
    candidates: int,
) -> jax.Array:
    """Logits [Q*K, T] (pairs in query-major order).

    member_fields: {member field: pooled [Q, D_f]}; member_dense: standardised [Q, d_M];
    cache_pc: the candidates' post cache rows [Q*K, C] (``post_side``); pair_dense:
    standardised [Q*K, d_X] (None where a group has no dense columns); kernels:
    ``x0_kernels``."""
    k = candidates
    x0_m = _side(model, split, "member", member_fields, member_dense)  # [Q, H_M]
    q = x0_m.shape[0]
    keep = _cached_x0(model, split)
    x0_p = cache_pc[:, :keep]
    _, _, blocks = _x0_kernel(model, split)  # only its column blocks (the values: kernels)
    pair_parts = []
    if model.dot_interactions:
        members = [_gated(model, n, member_fields[n]) for n in split.member_fields]
        start = 0
        for width in sorted(set(split.field_dims.values())):
            m = [x for x in members if x.shape[-1] == width]
            count = sum(split.field_dims[n] == width for n in split.post_fields)
            if m and count:  # the post fields of one width are adjacent in the cache
                p_qkfd = x0_p[:, start : start + count * width].reshape(q, k, count, width)
                pm = jnp.einsum("qkpd,qmd->qkpm", p_qkfd, jnp.stack(m, axis=1))
                pair_parts.append(pm.reshape(q * k, count * len(m)))
            start += count * width
    if len(split.dense["pair"]):
        pair_parts.append(pair_dense)
    x0_x = jnp.concatenate(pair_parts, axis=-1) if pair_parts else None
    # the linear x0 products [Q*K, F_lin]; the mixes' member part [Q, F - F_lin] (their post
    # and pair parts: _direct_mixes)
    expanded = _expanded_mix(model, split)
    mix_start = _mix_start(blocks, len(kernels["bias"]), expanded)
    per_query = x0_m @ kernels["member"] + kernels["bias"]  # [Q, F]
    linear = cache_pc[:, keep:].reshape(q, k, -1) + per_query[:, None, :mix_start]
    linear = linear.reshape(q * k, -1)
    if x0_x is not None:
        linear = linear + x0_x @ kernels["pair"]

    def block(name):
        start, stop = blocks[name]
        if start >= mix_start:  # a mix: per query
            return per_query[:, start:stop]
        return linear[:, start:stop]

    def mix(low_j, name):  # low_j . (x0_M @ z or y) per pair: a product per query
        if name == expanded:  # its whole [r, T'] matrix per pair (the linear blocks)
            m = block(name).reshape(q * k, low_j.shape[-1], -1)
            return jnp.einsum("pa,pab->pb", low_j, m)
        rows = low_j.reshape(q, k, -1)
        m = block(name).reshape(q, rows.shape[-1], -1)
        return jnp.einsum("qka,qab->qkb", rows, m).reshape(q * k, -1)

    mlp = model.mlp
    mlp_top = None
    if len(mlp.layers):
        y_bh = jax.nn.relu(block("mlp"))
        if mlp.gates is not None:
            y_bh = y_bh * 2.0 * jax.nn.sigmoid(block("gate"))
        for index in range(1, len(mlp.layers)):  # a layer and its gate as one product
            linears = [mlp.layers[index]] + ([mlp.gates[index]] if mlp.gates is not None else [])
            h = y_bh @ jnp.concatenate([la.kernel[...] for la in linears], axis=1)
            h = h + jnp.concatenate([_bias(la) for la in linears])
            width = mlp.layers[index].out_features
            y_bh = jax.nn.relu(h[:, :width])
            if mlp.gates is not None:
                y_bh = y_bh * 2.0 * jax.nn.sigmoid(h[:, width:])
        mlp_top = y_bh
    w_heads, b_heads = _heads_in(model)
    if folds_cross(model):
        heads = block("heads") if "heads" in blocks else b_heads
        layers = list(model.cross.layers) if model.cross is not None else []
        lows: list[jax.Array] = []
        mixes: list[list[jax.Array]] = []  # [j][l - j - 1]: the x0_P + x0_X part of z<j>_<l>, y<j>
        for index in range(len(layers)):
            low = block(f"low{index}")
            for j, low_j in enumerate(lows):
                low = low + mix(low_j, f"z{j}_{index}") + mixes[j][index - j - 1]
            lows.append(low)
            mixes.append(_direct_mixes(model, split, index, low, x0_p, x0_x))
        for j, low_j in enumerate(lows):
            heads = heads + mix(low_j, f"y{j}")
            if f"y{j}" != expanded:
                heads = heads + mixes[j][-1]
        if mlp_top is not None:
            heads = heads + mlp_top @ w_heads[: mlp_top.shape[1]]
    else:  # full-rank cross layers: x0 per pair, columns in the served order (M, P, X)
        perm = split.perm
        x0_m_pairs = jnp.broadcast_to(x0_m[:, None, :], (q, k, x0_m.shape[1]))
        x0_parts = [x0_m_pairs.reshape(q * k, -1), x0_p]
        x0_bh = jnp.concatenate(x0_parts + ([x0_x] if x0_x is not None else []), axis=-1)
        x_bh = x0_bh
        assert model.cross is not None  # folds_cross is False only with cross layers
        for index, cross in enumerate(model.cross.layers):
            if index == 0:
                mixed_bh = block("cross0")
            else:
                full = cross.full
                mixed_bh = x_bh @ full.kernel[...][perm][:, perm] + _bias(full)[perm]
            x_bh = x0_bh * mixed_bh + x_bh
        tops = [mlp_top if mlp_top is not None else x0_bh, x_bh]
        first_rows = np.arange(mlp.out_features) if mlp_top is not None else perm
        rows = np.concatenate([first_rows, mlp.out_features + perm])
        heads = jnp.concatenate(tops, axis=-1) @ w_heads[rows] + b_heads
    logits, start = [], 0
    for head in model.heads:
        if head.hidden is None:
            logits.append(heads[:, start])
            start += 1
        else:
            width = head.hidden.out_features
            logits.append(head.out(jax.nn.relu(heads[:, start : start + width]))[:, 0])
            start += width
    return jnp.stack(logits, axis=-1)
