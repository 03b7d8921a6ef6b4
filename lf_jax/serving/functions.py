"""The served computations as pure functions of (weights, inputs), for ``jax.export``.

* ``rank``: member rows [Q, W] and post rows [Q, K, W] of the feature store, with the
  member and post table rows from the id maps -> the feed ranker's task probabilities
  [Q, K, T]. Inside: the pair features (feed_features.pair_inputs), one gather per
  feature from the tables (float32, or int8 codes times a float32 scale per row), the
  feature's combiner, the dense standardisation and the FeedRanker, with the member's
  features looked up and multiplied into the first layers once per query
  (folded_ranker.py) rather than once per candidate.
* ``retrieve``: member rows [Q, W] -> the member tower (the dual encoder on the member's
  prompt tokens), L2-normalised, scored against every item vector (cosine) -> top K
  scores and item rows [Q, K] (exact: all items are scored).

Weights are plain dicts of arrays (``params``: the model's parameter leaves in pytree
order), so an exported function's signature is serializable and loads without Flax.
``encode_table`` quantizes a table (int8 with per-row scales) or keeps it float32.

Example:
    >>> fn = rank_function(graphdef, treedef, features, layout)
    >>> probs_qkt = jax.jit(fn)(weights, member_qw, post_qkw, member_rows_q, post_rows_qk)
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.errors import UserInputError
from lf_jax.export.quantize import quantize_int8
from lf_jax.serving.feed_features import FeatureLayout, pair_inputs
from lf_jax.serving.folded_ranker import folded_logits

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
    graphdef, treedef, features: Mapping[str, tuple[str, str]], weights, sparse, dense, candidates=1
):
    """Task probabilities [B, T] from sparse ids {feature: [B, L]} and raw dense [B, K_d].

    features: {feature: (table, combiner)} in the model's field order. A feature given for
    B / ``candidates`` rows (one per query: the member's) is looked up once per query, and
    the model's layers that read it are split so that its columns are multiplied once per
    query (folded_ranker.folded_logits); with every feature given for B rows the model
    runs as trained."""
    rows = dense.shape[0]
    member: dict[str, jax.Array] = {}
    pair: dict[str, jax.Array] = {}
    for name, (table, combiner) in features.items():
        pooled = pooled_lookup(weights["tables"][table], sparse[name], combiner)
        (pair if pooled.shape[0] == rows else member)[name] = pooled
    dense = (dense - weights["dense_mean"]) / weights["dense_std"]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights["params"]))
    if not member:
        return jax.nn.sigmoid(model(pair, dense))
    return jax.nn.sigmoid(folded_logits(model, member, pair, dense, candidates=candidates))


def rank_function(graphdef, treedef, features: Mapping[str, tuple[str, str]], layout):
    """rank(weights, member_qw, post_qkw, member_table_q, post_table_qk) -> probs [Q, K, T]."""

    def rank(weights, member_qw, post_qkw, member_table_q, post_table_qk):
        q, k = post_qkw.shape[:2]
        sparse, dense = pair_inputs(
            jnp, layout, member_qw, post_qkw, member_table_q, post_table_qk, per_query=True
        )
        probs = ranker_probs(graphdef, treedef, features, weights, sparse, dense, candidates=k)
        return probs.reshape(q, k, -1)

    return rank


def retrieve_function(graphdef, treedef, layout: FeatureLayout, pad_id: int, dims: int, k: int):
    """retrieve(weights, member_qw) -> (cosine scores [Q, K], item rows [Q, K]), best first."""
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
            scores_qn = query_qd @ items["values"].T
        else:
            scores_qn = (query_qd @ items["codes"].astype(jnp.float32).T) * items["scales"]
        return jax.lax.top_k(scores_qn, k)

    return retrieve


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
