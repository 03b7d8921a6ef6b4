"""GradCache: the exact gradient of a contrastive loss over a batch too large for one pass.

A contrastive loss couples every example of the batch (in-batch negatives), so the
trainer's usual accumulation (one loss per micro-batch) would drop the negatives of the
other micro-batches. GradCache (Gao et al., 2021) keeps them:

  1. embed each of the k micro-batches without building a graph (lax.scan, forward only);
  2. compute the loss on all k*b representations at once and its gradient with respect
     to the representations (cheap: [k*b, D]);
  3. re-run each micro-batch's forward under ``jax.vjp`` and pull its slice of the
     representation gradient back to the parameters, summing over micro-batches.

The update equals one step on the whole batch (tested to float tolerance) while the
activation memory is one micro-batch's. The trainer's micro-batch axis is GradCache's
chunk axis: ``train.grad_accum_steps = k`` splits the global batch into k chunks and the
loss still sees every example as a negative of every other.

``embed_fn(model, micro_batch) -> reps`` (a pytree of [b, ...] arrays, e.g. member and
item vectors); ``loss_fn(reps) -> (loss, aux)`` on the pytree of all [k*b, ...] arrays.
Rows are ordered example-major within each data shard ([b, k] flattened), which keeps each
device's rows local; row i of one rep always pairs with row i of the others.

Example:
    >>> step = make_grad_cache_step(graphdef, optax.adamw(1e-3), embed_fn, loss_fn)
    >>> state, metrics = step(state, batch)   # batch leaves [k, b, ...]
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def _flatten_chunks(x_kb):
    """[k, b, ...] -> [b*k, ...] (example-major, so data-sharded rows stay on their device)."""
    k, b = x_kb.shape[:2]
    return jnp.swapaxes(x_kb, 0, 1).reshape(b * k, *x_kb.shape[2:])


def _unflatten_chunks(x_n, k: int):
    b = x_n.shape[0] // k
    return jnp.swapaxes(x_n.reshape(b, k, *x_n.shape[1:]), 0, 1)


def grad_cache_value_and_grad(
    params, graphdef: nnx.GraphDef, embed_fn: Callable, loss_fn: Callable, batch
) -> tuple[tuple[jax.Array, object], object]:
    """((loss, aux), grads w.r.t. params) of ``loss_fn(embed(all micro-batches))``.

    ``batch`` leaves carry a leading micro-batch axis [k, b, ...]; the result equals
    ``jax.value_and_grad`` of the loss on the concatenated batch.
    """
    num_micro = jax.tree.leaves(batch)[0].shape[0]

    def embed(params, micro_batch):
        return embed_fn(nnx.merge(graphdef, params), micro_batch)

    _, reps_k = jax.lax.scan(lambda carry, mb: (carry, embed(params, mb)), None, batch)
    reps = jax.tree.map(_flatten_chunks, reps_k)
    (loss, aux), grad_reps = jax.value_and_grad(loss_fn, has_aux=True)(reps)
    grad_reps_k = jax.tree.map(lambda g: _unflatten_chunks(g, num_micro), grad_reps)

    def backward(grad_sum, inputs):
        micro_batch, grad_micro = inputs
        _, pullback = jax.vjp(lambda p: embed(p, micro_batch), params)
        (grad_params,) = pullback(grad_micro)
        return jax.tree.map(jnp.add, grad_sum, grad_params), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backward, zeros, (batch, grad_reps_k))
    return (loss, aux), grads


def make_grad_cache_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    embed_fn: Callable,
    loss_fn: Callable,
    donate: bool = True,
) -> Callable:
    """Returns jit(step)(state, batch) -> (state, {"loss", "aux", "grad_norm"}), the same
    contract as lf_jax.train.step.make_train_step for models without sparse tables."""

    def step(state, batch):
        params = state["params"]
        (loss, aux), grads = grad_cache_value_and_grad(params, graphdef, embed_fn, loss_fn, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "embedding": state["embedding"],
            "step": state["step"] + 1,
        }
        return new_state, {"loss": loss, "aux": aux, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0,) if donate else ())
