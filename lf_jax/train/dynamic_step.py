"""Train and eval steps of a model whose collection has dynamic tables (64-bit keys).

The train state gains ``state["dynamic"]``: per dynamic table, the per-shard hash tables
of ``DynamicTables`` ({table: {"key_hi", "key_lo", "last", "freq", "sketch", "counters"}},
each [S, ...] on the mesh). The batch's "sparse" entry is a ``KeyBatch`` (``dyn.preprocess``
of the host ids, with the micro-batch axis [k, b, L]). One jitted step:

1. ``dyn.resolve`` maps the keys of all k micro-batches to rows at once (find, admit,
   insert, evict; inserted keys' rows and optimizer slots reset), giving a SparseBatch;
2. the ordinary train step body (``train_step_body``: lookup, loss, exact accumulation,
   sparse update; static exchange capacities) runs on it;
3. the step's metrics carry ``"scalars"``: per table, the cumulative counters summed over
   shards (``dynamic/<table>/<counter>``), ``occupancy`` (alive keys / capacity),
   ``occupancy_max`` (the fullest shard) and ``probe_mean`` (mean window offset of found
   and inserted keys). ``run_training`` logs them with the loss (history.jsonl,
   TensorBoard ``train/dynamic/...``).

Evaluation finds keys without inserting (``resolve(insert=False)``): a key the table does
not hold reads nothing (padding), as in serving.

Example:
    >>> step = make_dynamic_train_step(dyn, graphdef, tx, ranker_loss)
    >>> state, metrics = step(state, batch)       # batch["sparse"]: a KeyBatch
    >>> metrics["scalars"]["dynamic/post/occupancy"]
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.dynamic.hash_table import COUNTERS, WORD, alive_slots
from lf_jax.embedding.dynamic.tables import DynamicTables, KeyBatch
from lf_jax.embedding.preprocess import SparseBatch
from lf_jax.train.step import train_step_body


def dynamic_scalars(dyn: DynamicTables, index: Mapping, step) -> dict[str, jax.Array]:
    """{"dynamic/<table>/<name>": float32 scalar} of the hash tables ``index`` at ``step``
    (jit-able): COUNTERS summed over shards (probe_max: the largest; float32, so exact up
    to 2**24, then to 7 digits; DynamicTables.counters gives exact ints), occupancy,
    occupancy_max, probe_mean."""
    out = {}
    for name, shards in index.items():
        words = shards["counters"].astype(jnp.float32)  # [S, 2, N]: float32 totals
        total = jnp.sum(words[:, 0] + words[:, 1] * jnp.float32(WORD), axis=0)
        values = {c: total[i] for i, c in enumerate(COUNTERS)}
        values["probe_max"] = jnp.max(words[:, 0, -1])
        alive = jax.vmap(lambda s, n=name: alive_slots(s, step, dyn.policies[n]))(shards)
        alive = alive[np.asarray(dyn.layouts[name].devices)]  # the table's shards
        values["occupancy"] = jnp.mean(alive)
        values["occupancy_max"] = jnp.max(jnp.mean(alive, axis=1))
        found = values["hits"] + values["inserts"]
        values["probe_mean"] = values["probe_sum"] / jnp.maximum(found, 1)
        out.update({f"dynamic/{name}/{k}": v for k, v in values.items()})
    return out


def describe_scalars(scalars: Mapping[str, float]) -> str:
    """The log line's part of ``dynamic_scalars`` (as floats), e.g. "post: occupancy 0.98
    (fullest shard 1.00), inserts 4,142, evictions 4,092, refused 30, not admitted 0"."""
    tables = sorted({key.split("/")[1] for key in scalars if key.startswith("dynamic/")})
    parts = []
    for name in tables:
        v = {k.split("/")[2]: x for k, x in scalars.items() if k.startswith(f"dynamic/{name}/")}
        parts.append(
            f"{name}: occupancy {v['occupancy']:.2f} (fullest shard {v['occupancy_max']:.2f}), "
            f"inserts {v['inserts']:,.0f}, evictions {v['evictions']:,.0f}, refused "
            f"{v['refused']:,.0f}, not admitted {v['not_admitted']:,.0f}"
        )
    return "; ".join(parts)


def make_dynamic_train_step(
    dyn: DynamicTables, graphdef, tx, loss_fn: Callable, donate: bool = True
) -> Callable:
    """jit(step)(state, batch) -> (state, metrics) as ``make_train_step``'s, with keys
    resolved first and ``metrics["scalars"]`` (see module docstring)."""
    inner = train_step_body(graphdef, dyn.collection, tx, loss_fn)

    def step(state, batch):
        resolved, sparse = dyn.resolve(
            {"embedding": state["embedding"], "index": state["dynamic"]}, batch["sparse"]
        )
        dense_state = {k: v for k, v in state.items() if k != "dynamic"}
        new_state, metrics = inner(
            {**dense_state, "embedding": resolved["embedding"]}, {**batch, "sparse": sparse}
        )
        new_state["dynamic"] = resolved["index"]
        metrics["scalars"] = dynamic_scalars(dyn, resolved["index"], new_state["embedding"]["step"])
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_dynamic_resolve(dyn: DynamicTables) -> Callable:
    """jit(find)(state, key_batch) -> SparseBatch: rows of the keys the tables hold
    (others padding), nothing inserted or counted (evaluation)."""

    def find(state: Mapping, batch: KeyBatch) -> SparseBatch:
        view = {"embedding": state["embedding"], "index": state["dynamic"]}
        return dyn.resolve(view, batch, insert=False)[1]

    return jax.jit(find)


def dynamic_eval_metrics(dyn: DynamicTables, state: Mapping) -> dict[str, float]:
    """The step's scalars of ``state`` as floats (the eval output's ``dynamic/...``)."""
    step = state["embedding"]["step"]
    values = jax.jit(lambda index, s: dynamic_scalars(dyn, index, s))(state["dynamic"], step)
    return {k: float(np.asarray(v)) for k, v in values.items()}
