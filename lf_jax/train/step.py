"""Jitted train and eval steps with exact gradient accumulation.

A batch carries a leading micro-batch axis [k, b, ...]. Dense gradients are summed in
a lax.scan and averaged; activation gradients of every micro-batch are collected and the
embedding rows they touch are updated once (``apply_gradients(microbatched=True)``), so
k micro-batches of b examples give the update of one batch of k*b examples. Tables do
not change between micro-batches, exactly as in the big batch.

``loss_fn(model, activations, micro_batch) -> (loss, aux)`` where ``loss`` is a mean
over the micro-batch's examples.

Example:
    >>> train_step = make_train_step(graphdef, collection, optax.adamw(1e-3), loss_fn)
    >>> state, metrics = train_step(state, batch)     # jitted, state donated
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lf_jax.embedding.collection import EmbeddingCollection


def dense_optimizer(train_config) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay from ``train_config`` (learning_rate,
    warmup_steps, steps, weight_decay): the dense optimizer every model family uses."""
    warmup = min(train_config.warmup_steps, max(train_config.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train_config.learning_rate, warmup, max(train_config.steps, warmup + 1)
    )
    return optax.adamw(schedule, weight_decay=train_config.weight_decay)


def init_train_state(
    params: nnx.State, tx: optax.GradientTransformation, embedding_state: dict
) -> dict:
    """The train state pytree: params, dense optimizer state, embedding state, step."""
    return {
        "params": params,
        "opt_state": tx.init(params),
        "embedding": embedding_state,
        "step": jnp.zeros((), jnp.int32),
    }


def make_train_step(
    graphdef: nnx.GraphDef,
    collection: EmbeddingCollection | None,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    donate: bool = True,
) -> Callable:
    """Returns jit(step)(state, batch) -> (state, {"loss": [], "aux": ...}); batch has
    "sparse" (a SparseBatch) plus model inputs, each with a leading micro-batch axis.

    ``collection=None`` (a model without sparse tables, e.g. a text encoder): no "sparse"
    entry, ``activations`` is None and ``state["embedding"]`` passes through unchanged."""

    def step(state, batch):
        params = state["params"]
        tables = state["embedding"]["tables"] if collection is not None else None
        num_micro = jax.tree.leaves(batch)[0].shape[0]

        def micro(grad_sum, micro_batch):
            activations = (
                collection.lookup(tables, micro_batch["sparse"]) if collection is not None else None
            )

            def objective(params, activations):
                return loss_fn(nnx.merge(graphdef, params), activations, micro_batch)

            (loss, aux), (grad_params, grad_acts) = jax.value_and_grad(
                objective, argnums=(0, 1), has_aux=True
            )(params, activations)
            return jax.tree.map(jnp.add, grad_sum, grad_params), (grad_acts, loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, (grad_acts, losses, aux) = jax.lax.scan(micro, zeros, batch)
        grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
        grad_acts = jax.tree.map(lambda g: g / num_micro, grad_acts)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "embedding": (
                collection.apply_gradients(
                    state["embedding"], batch["sparse"], grad_acts, microbatched=True
                )
                if collection is not None
                else state["embedding"]
            ),
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": jnp.mean(losses),
            "aux": jax.tree.map(lambda x: jnp.mean(x, axis=0), aux),
            "grad_norm": optax.tree.norm(grads),
        }
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(
    graphdef: nnx.GraphDef, collection: EmbeddingCollection | None, predict_fn: Callable
) -> Callable:
    """Returns jit(step)(params, tables, batch) -> predict_fn(model, activations, batch)
    (``collection=None``: tables are ignored and activations is None)."""

    def step(params, tables, batch):
        activations = collection.lookup(tables, batch["sparse"]) if collection is not None else None
        return predict_fn(nnx.merge(graphdef, params), activations, batch)

    return jax.jit(step)
