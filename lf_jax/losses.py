"""Losses: per-task (IPS-)weighted BCE, BCE on a scaled cosine, InfoNCE, Matryoshka InfoNCE.

Contrastive losses take global arrays; ``info_nce_sharded`` computes the same value with
each data shard scoring its own queries against the documents gathered across the data
axis (in-batch negatives from every device), so no device holds the full N x N logits.

Example:
    >>> per_task_t = weighted_bce(logits_bt, labels_bt, weights_bt)
    >>> loss = per_task_t.sum()
    >>> loss_n = scaled_cosine_bce(text_nd, post_nd, labels_n, scale=10.0, bias=-5.0)
    >>> loss = info_nce(member_nd, item_nd, temperature=0.05)
    >>> loss, per_dim_k = matryoshka_info_nce(
    ...     member_nd, item_nd, dims=(16, 32, 64), temperature=0.05
    ... )
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


def weighted_bce(
    logits_bt: jax.Array,
    labels_bt: jax.Array,
    weights_bt: jax.Array | None = None,
    mask_b: jax.Array | None = None,
) -> jax.Array:
    """Per-task mean of w * BCE(logit, label) -> [T].

    ``weights_bt`` are per-example, per-task weights (e.g. inverse propensity); the mean
    divides by the number of (unmasked) examples, not by the sum of weights, so IPS
    weights normalised to mean 1 keep the loss scale.
    """
    losses_bt = (
        jnp.maximum(logits_bt, 0) - logits_bt * labels_bt + jnp.log1p(jnp.exp(-jnp.abs(logits_bt)))
    )
    if weights_bt is not None:
        losses_bt = losses_bt * weights_bt
    if mask_b is None:
        return jnp.mean(losses_bt, axis=0)
    mask_b1 = mask_b.astype(losses_bt.dtype)[:, None]
    return jnp.sum(losses_bt * mask_b1, axis=0) / jnp.maximum(jnp.sum(mask_b1), 1.0)


def l2_normalize(x_nd: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x_nd * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_nd * x_nd, axis=-1, keepdims=True), eps))


def scaled_cosine_bce(
    a_nd: jax.Array,
    b_nd: jax.Array,
    labels_n: jax.Array,
    scale: jax.Array | float,
    bias: jax.Array | float,
) -> jax.Array:
    """Per-pair BCE of ``sigmoid(scale * cos(a, b) + bias)`` against ``labels_n`` -> [N].

    Example:
        >>> loss = scaled_cosine_bce(text_nd, post_nd, labels_n, 10.0, -5.0).mean()
    """
    cos_n = jnp.sum(l2_normalize(a_nd) * l2_normalize(b_nd), axis=-1)
    return _bce(scale * cos_n + bias, labels_n.astype(cos_n.dtype))


def _bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _cross_entropy_rows(logits_nm: jax.Array, targets_n: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per row -> [n]."""
    logz_n = jax.nn.logsumexp(logits_nm, axis=-1)
    return logz_n - jnp.take_along_axis(logits_nm, targets_n[:, None], axis=-1)[:, 0]


def info_nce(
    q_nd: jax.Array, d_nd: jax.Array, temperature: float, *, symmetric: bool = False
) -> jax.Array:
    """InfoNCE with in-batch negatives: row i of ``q`` should pick row i of ``d``.

    ``logits = q @ d.T / temperature`` (normalise q and d first for cosine scores); the
    mean cross-entropy over the N queries, averaged with the d -> q direction when
    ``symmetric``. Returns a scalar.
    """
    logits_nn = (q_nd @ d_nd.T) / temperature
    targets_n = jnp.arange(q_nd.shape[0])
    loss = jnp.mean(_cross_entropy_rows(logits_nn, targets_n))
    if symmetric:
        loss = 0.5 * (loss + jnp.mean(_cross_entropy_rows(logits_nn.T, targets_n)))
    return loss


def info_nce_sharded(
    q_nd: jax.Array,
    d_nd: jax.Array,
    temperature: float,
    mesh: Mesh,
    *,
    axis: str = "data",
    symmetric: bool = False,
) -> jax.Array:
    """``info_nce`` with rows sharded over mesh ``axis``: each shard scores its n local
    queries against all N documents (all_gather over ``axis``); the loss sums are psum'd.

    Same value and gradient as ``info_nce`` on the global arrays (tested); memory per
    device is n x N logits instead of N x N.
    """
    spec = PartitionSpec(axis, None)

    def local(q_local, d_local):
        n = q_local.shape[0]
        offset = jax.lax.axis_index(axis) * n
        targets_n = offset + jnp.arange(n)
        d_all = jax.lax.all_gather(d_local, axis, tiled=True)
        total = jnp.sum(_cross_entropy_rows(q_local @ d_all.T / temperature, targets_n))
        if symmetric:
            q_all = jax.lax.all_gather(q_local, axis, tiled=True)
            back = jnp.sum(_cross_entropy_rows(d_local @ q_all.T / temperature, targets_n))
            total = 0.5 * (total + back)
        return jax.lax.psum(total, axis)

    total = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec), out_specs=PartitionSpec(), check_vma=False
    )(q_nd, d_nd)
    return total / q_nd.shape[0]


def matryoshka_info_nce(
    q_nd: jax.Array,
    d_nd: jax.Array,
    dims: Sequence[int],
    temperature: float,
    *,
    weights: Sequence[float] | None = None,
    symmetric: bool = False,
    mesh: Mesh | None = None,
    axis: str = "data",
) -> tuple[jax.Array, jax.Array]:
    """InfoNCE on each nested prefix ``[:, :k]`` (re-normalised) for k in ``dims``.

    Returns (weighted mean over dims, per-dim losses [K]); ``weights`` default to 1 each.
    With ``mesh`` every term uses ``info_nce_sharded`` (negatives across ``axis``).
    """
    weights = [1.0] * len(dims) if weights is None else list(weights)
    losses = []
    for k in dims:
        q, d = l2_normalize(q_nd[:, :k]), l2_normalize(d_nd[:, :k])
        if mesh is None:
            losses.append(info_nce(q, d, temperature, symmetric=symmetric))
        else:
            losses.append(info_nce_sharded(q, d, temperature, mesh, axis=axis, symmetric=symmetric))
    per_dim_k = jnp.stack(losses)
    w_k = jnp.asarray(weights, per_dim_k.dtype)
    return jnp.sum(per_dim_k * w_k) / jnp.sum(w_k), per_dim_k
