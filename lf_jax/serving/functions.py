"""The served computations as pure functions of (weights, inputs), for ``jax.export``.

* ``posts``: post rows [N, W] of the feature store and their post table rows [N] -> the
  post cache [N, C]: every part of the ranker that depends on the post alone (its
  features, table lookups, gates, dots, standardised dense columns, and their products
  with the first layers; folded_ranker.post_side), computed once per post when a server
  loads a version (and when the store changes), not per request.
* ``rank``: the post cache, member rows [Q, W] and the member and candidate post table
  rows [Q], [Q, K] (from the id maps) -> the feed ranker's task probabilities [Q, K, T].
  Inside: the member's lookups (float32 tables, or int8 codes times a float32 scale per
  row), combiners, gates and first-layer products once per query, the candidates' cache
  rows gathered, and only the member x post work per pair (folded_ranker.split_logits).
* ``retrieve``: member rows [Q, W] -> the member tower (the dual encoder on the member's
  prompt tokens), L2-normalised, scored against every item vector (cosine) -> top K
  scores and item rows [Q, K] (exact: all items are scored).

Weights are plain dicts of arrays (``params``: the model's parameter leaves in pytree
order), so an exported function's signature is serializable and loads without Flax.
``encode_table`` quantizes a table (int8 with per-row scales) or keeps it float32.
``ranker_weights`` adds the ranker's weight-only products (x0_kernels) the two ranker
functions read. A run with dynamic tables (lf_jax.embedding.dynamic) adds "key_rows":
{table: int32 [V]}, id -> row of the served table (its alive keys' rows, compacted), -1
for an id the table did not hold: ``served_ids`` maps every id of such a table through it
inside the functions, so the feature store keeps ids and an absent id pools as padding
(left out of a mean, zero alone), as training's lookup of an absent key does.

Example:
    >>> weights = ranker_weights(graphdef, treedef, features, weights)
    >>> posts_nc = jax.jit(posts_function(graphdef, treedef, features, layout))(
    ...     weights, post_nw, np.arange(n))
    >>> fn = rank_function(graphdef, treedef, features, layout)
    >>> probs_qkt = jax.jit(fn)(weights, posts_nc, member_qw, member_rows_q, post_rows_qk)
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.errors import UserInputError
from lf_jax.export.quantize import quantize_int8
from lf_jax.serving.feed_features import (
    DENSE_GROUPS,
    MEMBER_FEATURES,
    FeatureLayout,
    member_inputs,
    pair_dense,
    post_inputs,
    post_latents,
)
from lf_jax.serving.folded_ranker import post_side, split_logits, x0_kernels
from lf_jax.serving.ranker_split import Split

TABLE_DTYPES = ("float32", "int8")


def encode_table(values_vd: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """{"values": float32 [V, D]} or {"codes": int8 [V, D], "scales": float32 [V]}."""
    if dtype not in TABLE_DTYPES:
        raise UserInputError(f"serving table dtype must be one of {TABLE_DTYPES}, got {dtype!r}")
    values_vd = np.asarray(values_vd, np.float32)
    if dtype == "float32":
        return {"values": values_vd}
    codes, scales = quantize_int8(values_vd)
    return {"codes": codes, "scales": scales.astype(np.float32)}


def table_rows(table: Mapping[str, jax.Array], rows) -> jax.Array:
    """Rows [..., D] float32 of an ``encode_table`` table (dequantized for int8)."""
    if "values" in table:
        return table["values"][rows]
    return table["codes"][rows].astype(jnp.float32) * table["scales"][rows][..., None]


def served_ids(weights, table: str, ids_bl: jax.Array) -> jax.Array:
    """Ids [...] of ``table`` as rows of its served table: unchanged for a static table;
    through "key_rows" for a dynamic one (an id the table did not hold, or outside the
    map, -> -1: padding)."""
    key_rows_v = weights.get("key_rows", {}).get(table)
    if key_rows_v is None:
        return ids_bl
    size = key_rows_v.shape[0]
    inside = (ids_bl >= 0) & (ids_bl < size)
    return jnp.where(inside, key_rows_v[jnp.clip(ids_bl, 0, size - 1)], -1)


def pooled_lookup(table: Mapping[str, jax.Array], ids_bl: jax.Array, combiner: str) -> jax.Array:
    """[B, D]: the combiner ("sum", "mean", "sqrtn") over the valid ids (>= 0) of each bag,
    as EmbeddingCollection.lookup pools an unweighted feature."""
    w_bl = (ids_bl >= 0).astype(jnp.float32)
    if combiner == "mean":
        w_bl = w_bl / jnp.maximum(jnp.sum(w_bl, axis=-1, keepdims=True), 1e-12)
    elif combiner == "sqrtn":
        w_bl = w_bl / jnp.maximum(jnp.sqrt(jnp.sum(w_bl * w_bl, axis=-1, keepdims=True)), 1e-12)
    elif combiner != "sum":
        raise UserInputError(f"serving supports pooled features only, got combiner {combiner!r}")
    return jnp.einsum("bl,bld->bd", w_bl, table_rows(table, jnp.maximum(ids_bl, 0)))


def ranker_probs(
    graphdef, treedef, features: Mapping[str, tuple[str, str]], weights, sparse, dense
):
    """Task probabilities [B, T] of the model as trained, from sparse ids {feature: [B, L]}
    (rows of static tables, ids of dynamic ones: ``served_ids``) and raw dense [B, K_d]
    (every feature per row; the export's holdout AUC).

    features: {feature: (table, combiner)} in the model's field order."""
    pooled = {
        name: pooled_lookup(
            weights["tables"][table], served_ids(weights, table, sparse[name]), combiner
        )
        for name, (table, combiner) in features.items()
    }
    dense = (dense - weights["dense_mean"]) / weights["dense_std"]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights["params"]))
    return jax.nn.sigmoid(model(pooled, dense))


def _served_model(graphdef, treedef, features, weights):
    """(model, Split) of the served ranker: member features of MEMBER_FEATURES, dense
    columns grouped by DENSE_GROUPS, field widths from the tables."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights["params"]))
    tables = weights["tables"]
    dims = {
        name: next(iter(tables[table].values())).shape[1] for name, (table, _) in features.items()
    }
    member = [name for name in features if name in MEMBER_FEATURES]
    return model, Split.of(model, dims, member_fields=member, dense_groups=DENSE_GROUPS)


def _standardised(weights, split: Split, group: str, raw):
    columns = split.dense[group]
    return (raw - weights["dense_mean"][columns]) / weights["dense_std"][columns]


def _pooled(weights, features: Mapping[str, tuple[str, str]], sparse, fields) -> dict:
    """{feature: pooled table rows} of the features in ``fields`` (member or post side)."""
    return {
        name: pooled_lookup(
            weights["tables"][table], served_ids(weights, table, sparse[name]), combiner
        )
        for name, (table, combiner) in features.items()
        if name in fields
    }


def ranker_weights(graphdef, treedef, features: Mapping[str, tuple[str, str]], weights) -> dict:
    """The served ranker's weights: ``weights`` ({"params", "tables", "dense_mean",
    "dense_std"}) and "x0_kernels", the x0 products by row group (folded_ranker.x0_kernels:
    functions of the params alone, computed here once instead of in every rank call)."""

    def kernels(w):
        return x0_kernels(*_served_model(graphdef, treedef, features, w))

    return {**weights, "x0_kernels": jax.device_get(jax.jit(kernels)(weights))}


def posts_function(graphdef, treedef, features: Mapping[str, tuple[str, str]], layout):
    """posts(weights, post_nw, post_table_n) -> the post cache [N, C + 2d]: every post-only
    part of the ranker (folded_ranker.post_side: x0_P and its first-layer products) and the
    post's two latent vectors (the pair features read them)."""

    def posts(weights, post_nw, post_table_n):
        model, split = _served_model(graphdef, treedef, features, weights)
        sparse, dense = post_inputs(jnp, layout, post_nw, post_table_n)
        pooled = _pooled(weights, features, sparse, split.post_fields)
        dense = _standardised(weights, split, "post", dense)
        side = post_side(model, split, weights["x0_kernels"], pooled, dense)
        return jnp.concatenate([side, post_latents(layout, post_nw)], axis=-1)

    return posts


def rank_function(graphdef, treedef, features: Mapping[str, tuple[str, str]], layout):
    """rank(weights, posts_nc, member_qw, member_table_q, post_table_qk) -> probs [Q, K, T].

    posts_nc: the post cache of ``posts_function`` for every post row of the post table;
    post_table_qk picks the candidates' rows of it. The member's features are looked up
    and multiplied into the first layers once per query, the pair work is per candidate
    (folded_ranker.split_logits). Q > 1 queries run one after another (``lax.map``):
    16 x 2,048 pairs at once stream [32768, <=335] arrays through memory, one query's
    [2048, <=335] stay in cache (190 -> 143 CPU ms per 16 x 2,048, scores equal to 2e-7)."""

    def rank(weights, posts_nc, member_qw, member_table_q, post_table_qk):
        q, k = post_table_qk.shape
        if q > 1:  # one query at a time: its [K, C] arrays stay cache-sized (see above)
            return jax.lax.map(
                lambda a: rank(weights, posts_nc, a[0][None], a[1][None], a[2][None])[0],
                (member_qw, member_table_q, post_table_qk),
            )
        model, split = _served_model(graphdef, treedef, features, weights)
        sparse, dense = member_inputs(jnp, layout, member_qw, member_table_q)
        pooled = _pooled(weights, features, sparse, split.member_fields)
        rows = posts_nc.at[post_table_qk.reshape(q * k)].get(mode="promise_in_bounds")
        cache = rows[:, : rows.shape[1] - 2 * layout.latent_dim]
        latents = rows[:, cache.shape[1] :].reshape(q, k, -1)
        pair = _standardised(weights, split, "pair", pair_dense(jnp, layout, member_qw, latents))
        member_dense = _standardised(weights, split, "member", dense)
        logits = split_logits(
            model,
            split,
            pooled,
            member_dense,
            cache,
            pair,
            kernels=weights["x0_kernels"],
            candidates=k,
        )
        return jax.nn.sigmoid(logits).reshape(q, k, -1)

    return rank


def retrieve_function(graphdef, treedef, layout: FeatureLayout, pad_id: int, dims: int):
    """retrieve(weights, member_qw) -> cosine scores [Q, N] of every item (int8 items: the
    codes' product times the row scales, which XLA fuses: 0.86 CPU ms for 20,000 x 64
    against 1.28 for the matrix in float32). The top K is taken on the host
    (``top_k_rows``: 0.4-0.8 CPU ms less than ``jax.lax.top_k`` for 2,048 of 20,000)."""
    start, stop = layout.member_columns()["prompt"]

    def retrieve(weights, member_qw):
        prompt_ql = member_qw[:, start:stop].astype(jnp.int32)
        mask_ql = (prompt_ql >= 0).astype(jnp.int32)
        ids_ql = jnp.where(mask_ql > 0, prompt_ql, pad_id)
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights["params"]))
        query_qd = model.embed(ids_ql, mask_ql)[:, :dims]
        query_qd = query_qd * jax.lax.rsqrt(
            jnp.maximum(jnp.sum(query_qd * query_qd, axis=-1, keepdims=True), 1e-12)
        )
        items = weights["items"]
        if "values" in items:
            return query_qd @ items["values"].T
        return (query_qd @ items["codes"].astype(jnp.float32).T) * items["scales"]

    return retrieve


def top_k_rows(scores_qn: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], rows [Q, k] int32) of the k best rows per query, best first, ties
    to the lower row: exactly ``jax.lax.top_k``'s rows and order (its total order of
    float32 too: 0.0 before -0.0). One uint64 key per score, (descending score bits) << 32
    | row, so ``np.partition`` selects and ``np.sort`` orders by score and row at once.

    >>> top_k_rows(np.array([[0.1, 0.9, 0.5, 0.9]], np.float32), 3)[1].tolist()
    [[1, 3, 2]]
    """
    n = scores_qn.shape[1]
    bits = np.ascontiguousarray(scores_qn, np.float32).view(np.uint32)
    # a larger float has a smaller key: negative floats keep their bits (sign bit set,
    # larger magnitude = larger bits), non-negative ones get their bits flipped below it
    descending = np.where(bits >> 31 == 1, bits, ~bits & np.uint32(0x7FFFFFFF))
    keys = (descending.astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    if k < n:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    rows = (keys & np.uint64(0xFFFFFFFF)).astype(np.int32)
    return np.take_along_axis(scores_qn, rows, 1), rows


def export_function(fn, weights, *args) -> bytes:
    """``jax.export`` of ``fn(weights, *args)`` for the shapes and dtypes of the arguments
    (numpy arrays or ShapeDtypeStructs), serialized (StableHLO + signature)."""

    def spec(x):
        return jax.ShapeDtypeStruct(
            np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
        )

    exported = jax.export.export(jax.jit(fn))(
        jax.tree.map(spec, weights), *[jax.tree.map(spec, a) for a in args]
    )
    return bytes(exported.serialize())
