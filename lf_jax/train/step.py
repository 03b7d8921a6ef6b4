"""Jitted train and eval steps with exact gradient accumulation.

A batch carries a leading micro-batch axis [k, b, ...]. Dense gradients are summed in
a lax.scan and averaged; activation gradients of every micro-batch are collected and the
embedding rows they touch are updated once (``apply_gradients(microbatched=True)``), so
k micro-batches of b examples give the update of one batch of k*b examples. Tables do
not change between micro-batches, exactly as in the big batch.

``loss_fn(model, activations, micro_batch) -> (loss, aux)`` where ``loss`` is a mean
over the micro-batch's examples.

The owner exchange of row-spread tables takes its capacities from the traffic
(``TrainStep``: a ``CapacityChooser`` fed the steps' ``metrics["exchange"]``).

Example:
    >>> train_step = make_train_step(graphdef, collection, optax.adamw(1e-3), loss_fn)
    >>> state, metrics = train_step(state, batch)     # jitted, state donated
    >>> train_step.last_capacities                     # (("<group>", C), ...) or None
"""

import logging
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lf_jax.embedding.capacity import (
    CapacityChooser,
    capacity_names,
    exchange_counts,
    settled_modes,
)
from lf_jax.embedding.collection import EmbeddingCollection

log = logging.getLogger(__name__)


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


def train_step_body(
    graphdef: nnx.GraphDef,
    collection: EmbeddingCollection | None,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
) -> Callable:
    """The pure step(state, batch, capacities=None) -> (state, metrics) that
    ``make_train_step`` jits; batch has "sparse" (a SparseBatch) plus model inputs, each
    with a leading micro-batch axis [k, b, ...].

    ``capacities``: the owner exchange's keys per owner, ((group, C), ...) as
    ``CapacityChooser.capacities()`` gives (None: the static ones). With one micro-batch
    the exchange layout is built once and shared by the lookup and the update; with k
    micro-batches each lookup builds its own with ``capacities`` and the update of all k
    keeps the static ones. ``metrics["exchange"]``: {group: the most distinct keys a
    device sent one owner} (``exchange_counts``: [n], one per device, the largest over
    micro-batches; the max over devices is left to the host, a collective otherwise).

    ``collection=None`` (a model without sparse tables, e.g. a text encoder): no "sparse"
    entry, ``activations`` is None and ``state["embedding"]`` passes through unchanged."""

    def step(state, batch, capacities=None):
        params = state["params"]
        tables = state["embedding"]["tables"] if collection is not None else None
        num_micro = jax.tree.leaves(batch)[0].shape[0]
        shared = None
        if collection is not None and num_micro == 1:
            shared = collection.routing(_first(batch["sparse"]), capacities)

        def micro(grad_sum, micro_batch):
            activations, counts = None, {}
            if collection is not None:
                routing = shared
                if routing is None:
                    routing = collection.routing(micro_batch["sparse"], capacities)
                activations = collection.lookup(tables, micro_batch["sparse"], routing)
                counts = exchange_counts(routing)

            def objective(params, activations):
                return loss_fn(nnx.merge(graphdef, params), activations, micro_batch)

            (loss, aux), (grad_params, grad_acts) = jax.value_and_grad(
                objective, argnums=(0, 1), has_aux=True
            )(params, activations)
            return jax.tree.map(jnp.add, grad_sum, grad_params), (grad_acts, loss, aux, counts)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, (grad_acts, losses, aux, counts) = jax.lax.scan(micro, zeros, batch)
        grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
        grad_acts = jax.tree.map(lambda g: g / num_micro, grad_acts)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        embedding = state["embedding"]
        if collection is not None and shared is not None:
            embedding = collection.apply_gradients(
                embedding, _first(batch["sparse"]), _first(grad_acts), routing=shared
            )
        elif collection is not None:
            embedding = collection.apply_gradients(
                embedding, batch["sparse"], grad_acts, microbatched=True
            )
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "embedding": embedding,
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": jnp.mean(losses),
            "aux": jax.tree.map(lambda x: jnp.mean(x, axis=0), aux),
            "grad_norm": optax.tree.norm(grads),
            "exchange": {name: jnp.max(count, axis=0) for name, count in counts.items()},
        }
        return new_state, metrics

    return step


def _first(tree):
    """The first micro-batch of a [k, ...] pytree."""
    return jax.tree.map(lambda x: x[0], tree)


class TrainStep:
    """jit(step)(state, batch) -> (state, metrics) whose owner-exchange capacities follow
    the traffic: a ``CapacityChooser`` per global micro-batch size observes each step's
    ``metrics["exchange"]`` one step late (the dispatch stays asynchronous) and picks the
    next step's capacities from its ladder, so the step compiles once per rung it
    visits, never per step; any capacity is exact (an overflow takes more rounds).
    Groups of an ``exchange="auto"`` collection are probed in both modes, then keep
    the one that moves fewer bytes (``CapacityChooser.mode``; logged).
    ``adaptive=False`` (or a collection with no exchanging group): the static
    capacities, one compile. ``lower(state, batch)`` lowers the static-capacity step.
    """

    def __init__(self, body: Callable, collection, donate: bool, adaptive: bool):
        self.jitted = jax.jit(
            body, static_argnames="capacities", donate_argnums=(0,) if donate else ()
        )
        self.collection = collection
        self.adaptive = adaptive and collection is not None and bool(capacity_names(collection))
        self.choosers: dict[int, CapacityChooser] = {}
        self.pending: tuple[CapacityChooser, dict] | None = None
        self.last_capacities: tuple | None = None  # what the latest call was given
        self.modes: dict[str, str] = {}  # the exchange modes auto groups settled on

    def _chooser(self, batch) -> CapacityChooser:
        """The chooser of ``batch``'s global micro-batch size (ids [k, b, L]), after it
        observed the previous step's counts."""
        if self.pending is not None:
            chooser, counts = self.pending
            chooser.observe(counts)
            self.pending = None
        size = int(next(iter(batch["sparse"].ids.values())).shape[1])
        if size not in self.choosers:
            self.choosers[size] = CapacityChooser(self.collection, size, modes=self.modes)
        return self.choosers[size]

    def _log_modes(self, chooser: CapacityChooser) -> None:
        """Logs each exchange mode an auto group settles on (``exchange_modes``)."""
        for group, mode in chooser.chosen.items():
            if self.modes.get(group) == mode:
                continue
            self.modes[group] = mode
            rows_b, bag_b = chooser.probed.get(group, (0, 0))
            log.info(
                "owner exchange of shard group %s: %s mode (probed per owner and step: rows "
                "%s B, bags %s B)",
                group,
                mode,
                f"{rows_b:,}",
                f"{bag_b:,}",
            )

    def exchange_modes(self) -> dict[str, str]:
        """{group: "rows" | "bags"} the ``exchange="auto"`` groups settled on, to keep in
        a checkpoint: ``restore_exchange_modes`` gives a resumed run the same modes (and
        the same bits) without probing again."""
        return dict(self.modes)

    def restore_exchange_modes(self, modes: Mapping[str, str]) -> None:
        """Takes a checkpoint's ``exchange_modes``; groups of this collection that do not
        offer the mode (a changed config) probe anew, logged."""
        settled = settled_modes(self.collection, modes) if self.collection is not None else {}
        self.modes.update(settled)
        for group, mode in modes.items():
            if group not in settled:
                log.info(
                    "checkpoint's exchange mode %s for shard group %s does not apply to this "
                    "collection",
                    mode,
                    group,
                )

    def __call__(self, state, batch):
        chooser = self._chooser(batch) if self.adaptive else None
        capacities = None
        if chooser is not None:
            capacities = chooser.capacities()
            if self.last_capacities not in (None, capacities):
                static = chooser.static
                log.info(
                    "owner exchange capacities per owner (<group>: distinct ids; "
                    "<group>/entries, <group>/bags: bag mode): %s",
                    ", ".join(f"{name} {c:,} (static {static[name]:,})" for name, c in capacities),
                )
            self._log_modes(chooser)
        self.last_capacities = capacities
        state, metrics = self.jitted(state, batch, capacities=capacities)
        if chooser is not None:
            self.pending = (chooser, metrics["exchange"])
        return state, metrics

    def lower(self, state, batch):
        """The static-capacity step lowered for ``state`` and ``batch`` (abstract or
        concrete): ``.compile()`` it for XLA's cost and memory figures."""
        return self.jitted.lower(state, batch, capacities=None)


def make_train_step(
    graphdef: nnx.GraphDef,
    collection: EmbeddingCollection | None,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    donate: bool = True,
    adaptive_capacities: bool = True,
) -> TrainStep:
    """Returns the jitted step(state, batch) -> (state, {"loss": [], "aux": ...,
    "grad_norm": [], "exchange": {...}}) of ``train_step_body``, its state donated.

    ``adaptive_capacities``: size the owner exchange of row-spread tables from the
    traffic (``TrainStep``); False keeps the static capacities (one compile)."""
    body = train_step_body(graphdef, collection, tx, loss_fn)
    return TrainStep(body, collection, donate, adaptive_capacities)


def make_eval_step(
    graphdef: nnx.GraphDef, collection: EmbeddingCollection | None, predict_fn: Callable
) -> Callable:
    """Returns jit(step)(params, tables, batch) -> predict_fn(model, activations, batch)
    (``collection=None``: tables are ignored and activations is None)."""

    def step(params, tables, batch):
        activations = collection.lookup(tables, batch["sparse"]) if collection is not None else None
        return predict_fn(nnx.merge(graphdef, params), activations, batch)

    return jax.jit(step)
