"""Losses: per-task (IPS-)weighted binary cross-entropy; contrastive losses come later.

Example:
    >>> per_task_t = weighted_bce(logits_bt, labels_bt, weights_bt)
    >>> loss = per_task_t.sum()
"""

import jax
import jax.numpy as jnp


def weighted_bce(logits_bt: jax.Array, labels_bt: jax.Array, weights_bt: jax.Array | None = None,
                 mask_b: jax.Array | None = None) -> jax.Array:
    """Per-task mean of w * BCE(logit, label) -> [T].

    ``weights_bt`` are per-example, per-task weights (e.g. inverse propensity); the mean
    divides by the number of (unmasked) examples, not by the sum of weights, so IPS
    weights normalised to mean 1 keep the loss scale.
    """
    losses_bt = jnp.maximum(logits_bt, 0) - logits_bt * labels_bt + jnp.log1p(jnp.exp(-jnp.abs(logits_bt)))
    if weights_bt is not None:
        losses_bt = losses_bt * weights_bt
    if mask_b is None:
        return jnp.mean(losses_bt, axis=0)
    mask_b1 = mask_b.astype(losses_bt.dtype)[:, None]
    return jnp.sum(losses_bt * mask_b1, axis=0) / jnp.maximum(jnp.sum(mask_b1), 1.0)
