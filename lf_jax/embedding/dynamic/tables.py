"""DynamicTables: the dynamic tables of an EmbeddingCollection, keyed by 64-bit ids.

Rows and optimizer slots stay where the collection keeps them: a dynamic table is
planned ``row_wise`` over every mesh axis or ``table_wise_row_wise`` (one group of
devices along one axis); lf_jax.embedding.dynamic.layout says which devices hold its
shards and where a key's row lives. What this adds is the map key -> row: each device
holds one shard's hash table (lf_jax.embedding.dynamic.hash_table) next to its rows. A
step's ``resolve`` routes every key to its owner, finds, admits, inserts or evicts it
there and returns the collection's row ids (lf_jax.embedding.dynamic.resolve, one
shard_map per dynamic table). The collection's ``kernel`` setting picks the resolve's
path (``self.kernel``): the C++ kernels of lf_jax.embedding.kernels.dynamic ('fused', the
CPU default) or hash_table / key_dedupe in XLA ('xla'); both give the same state.

The returned SparseBatch goes to the collection's ``lookup`` and ``apply_gradients``
unchanged, so lookups, the owner-routed exchange, sparse optimizers and micro-batch
accumulation are the static engine's. An absent (refused or not yet admitted) key
reads nothing: it pools as padding (a zero row, left out of a mean) and gets no gradient.

Shapes: B batch, L max_ids, S devices, C = vocab_size // shards slots per shard, D dim.

Example:
    >>> tables = [TableSpec(name="post", vocab_size=8 * 1024, dim=16,
    ...                     dynamic=DynamicPolicy(admit_after=2, eviction="lru"))]
    >>> coll = EmbeddingCollection(tables, features, {"post": row_wise(("data", "model"))}, mesh)
    >>> dyn = DynamicTables(coll)
    >>> state = dyn.init(jax.random.key(0))       # {"embedding": ..., "index": ...}
    >>> state, batch = dyn.resolve(state, dyn.shard_batch(dyn.preprocess({"post": [[7, 2**40]]})))
    >>> acts = coll.lookup(state["embedding"]["tables"], batch)
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.embedding import ordering
from lf_jax.embedding.collection import EmbeddingCollection, SparseBatch
from lf_jax.embedding.dynamic.hash_table import (
    COUNTERS,
    alive_slots,
    counter_totals,
    init_shard,
)
from lf_jax.embedding.dynamic.keys import join_keys, parse_keys
from lf_jax.embedding.dynamic.layout import TableLayout, table_layout
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.resolve import resolve_table
from lf_jax.embedding.kernels.fused import resolve_kernel
from lf_jax.embedding.preprocess import InvalidIdsError, preprocess
from lf_jax.embedding.spec import SpecError


class KeyBatch(NamedTuple):
    """Static features as a SparseBatch; dynamic features as uint32 key halves and a
    validity mask, each [B, L]."""

    static: SparseBatch
    hi: dict
    lo: dict
    valid: dict


class DynamicTables:
    """Key -> row maps of a collection's dynamic tables (see module docstring)."""

    def __init__(self, collection: EmbeddingCollection):
        self.collection = collection
        self.mesh = collection.mesh
        self.axes = tuple(self.mesh.axis_names)
        self.num_devices = collection.num_devices
        self.specs = {n: t for n, t in collection.tables.items() if t.dynamic is not None}
        if not self.specs:
            raise SpecError("DynamicTables: the collection has no table with a dynamic policy")
        self.policies: dict[str, DynamicPolicy] = {
            n: t.dynamic for n, t in self.specs.items() if t.dynamic is not None
        }
        self.features = {
            t: [f for f in collection.features.values() if f.table == t] for t in self.specs
        }
        # the resolve's path follows the collection's kernel setting (no optimizer involved)
        self.kernel = resolve_kernel(collection.kernel, self.mesh.devices.flat[0].platform)
        self.layouts: dict[str, TableLayout] = {}
        for name in self.specs:
            for feature in self.features[name]:
                if feature.weighted:
                    raise SpecError(
                        f"feature '{feature.name}' reads dynamic table '{name}' and is "
                        "weighted; dynamic features take unweighted keys"
                    )
            self.layouts[name] = table_layout(collection, name)

    def capacity(self, table: str) -> int:
        """Slots (keys) per shard of a dynamic table."""
        return self.layouts[table].capacity

    # ----- state ----------------------------------------------------------------------------
    def index_shardings(self) -> dict:
        def leading(ndim):
            return NamedSharding(self.mesh, PartitionSpec(self.axes, *([None] * (ndim - 1))))

        return {
            name: {k: leading(v.ndim + 1) for k, v in self._empty_shard(name).items()}
            for name in self.specs
        }

    def _empty_shard(self, name: str) -> dict:
        return init_shard(self.capacity(name), self.policies[name])

    def init(self, key: jax.Array) -> dict:
        """{"embedding": the collection's state, "index": {table: per-shard maps [S, ...]}}."""

        def index():
            return {
                name: jax.tree.map(
                    lambda x: jnp.broadcast_to(x, (self.num_devices, *x.shape)),
                    self._empty_shard(name),
                )
                for name in self.specs
            }

        return {
            "embedding": self.collection.init(key),
            "index": jax.jit(index, out_shardings=self.index_shardings())(),
        }

    # ----- batches --------------------------------------------------------------------------
    def preprocess(self, raw_ids: Mapping, raw_weights: Mapping | None = None) -> KeyBatch:
        """Static features through the collection's preprocessing; dynamic ones as keys
        (ints in [0, 2**64) or strings; see lf_jax.embedding.dynamic.keys.parse_keys)."""
        dynamic = {f.name: f for fs in self.features.values() for f in fs}
        static_features = {n: f for n, f in self.collection.features.items() if n not in dynamic}
        missing = sorted(set(dynamic) - set(raw_ids))
        if missing:
            raise InvalidIdsError(f"batch lacks dynamic feature(s) {missing}")
        static = preprocess(
            static_features,
            self.collection.tables,
            {n: v for n, v in raw_ids.items() if n not in dynamic},
            raw_weights,
        )
        parsed = {n: parse_keys(n, raw_ids[n], f.max_ids) for n, f in dynamic.items()}
        sizes = {n: p[0].shape[0] for n, p in parsed.items()}
        sizes.update({n: v.shape[0] for n, v in static.ids.items()})
        if len(set(sizes.values())) > 1:
            raise InvalidIdsError(f"features have different batch sizes {sizes}")
        return KeyBatch(
            static,
            {n: p[0] for n, p in parsed.items()},
            {n: p[1] for n, p in parsed.items()},
            {n: p[2] for n, p in parsed.items()},
        )

    def shard_batch(self, batch: KeyBatch, leading_dims: int = 0) -> KeyBatch:
        """Places a host KeyBatch on the mesh (examples split over every device)."""
        size = next(iter(batch.hi.values())).shape[leading_dims]
        if size % self.num_devices:
            raise InvalidIdsError(
                f"batch size {size} does not divide over {self.num_devices} devices"
            )
        sharding = self.collection.batch_sharding(leading_dims)
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)

    # ----- resolve --------------------------------------------------------------------------
    def _key_spec(self, keys) -> PartitionSpec:
        """Partition spec of a [..., B, L] batch array: examples split over every device."""
        return PartitionSpec(*([None] * (keys.ndim - 2)), self.axes, None)

    def resolve(
        self, state: Mapping, batch: KeyBatch, insert: bool = True
    ) -> tuple[dict, SparseBatch]:
        """(new state, the collection's SparseBatch) for one training step's keys.

        Jit-able (donate ``state``). Keys of a micro-batched step ([k, B, L]) are resolved
        together, as one step. Inserted keys get fresh rows and optimizer slots; the step
        stamped on the maps is the one ``apply_gradients`` will apply next. With
        ``insert`` False (evaluation, serving) keys are only found: nothing is admitted,
        inserted, stamped or counted, and the state comes back unchanged.
        """
        emb = state["embedding"]
        tables, slots = dict(emb["tables"]), dict(emb["slots"])
        index = dict(state["index"])
        ids, weights = dict(batch.static.ids), dict(batch.static.weights)
        step = emb["step"] + 1
        done: list = []  # the previous resolve's output, for the multi-process chain
        for name in self.specs:
            layout = self.layouts[name]
            group = layout.group
            feats = [f.name for f in self.features[name]]
            his = [batch.hi[f] for f in feats]
            if ordering.ordered() and done:  # this table's exchange after the previous one's
                his = list(ordering.after(self.mesh, done, *his, spec=self._key_spec(his[0])))
            rows, tables[group.name], slots[group.name], index[name] = resolve_table(
                layout,
                self.mesh,
                tables[group.name],
                slots[group.name],
                index[name],
                his,
                [batch.lo[f] for f in feats],
                [batch.valid[f] for f in feats],
                step,
                insert,
                self.kernel,
            )
            done = [(rows[0], self._key_spec(rows[0]))]
            for feature, part in zip(feats, rows, strict=True):
                ids[feature] = part
                weights[feature] = (part >= 0).astype(jnp.float32)
        if ordering.ordered():  # the lookup's routing (every group's) after the resolves
            for feature, value in ids.items():
                (ids[feature],) = ordering.after(self.mesh, done, value, spec=self._key_spec(value))
        new_state = {
            "embedding": {"tables": tables, "slots": slots, "step": emb["step"]},
            "index": index,
        }
        return new_state, SparseBatch(ids, weights)

    # ----- host views -----------------------------------------------------------------------
    def counters(self, state: Mapping) -> dict[str, dict[str, Any]]:
        """Per table: the cumulative COUNTERS summed over shards (probe_max: the largest),
        ``occupancy`` (alive keys / capacity, all the table's shards) and
        ``occupancy_max`` (the fullest shard)."""
        out = {}
        step = int(state["embedding"]["step"])
        for name, index in jax.device_get(state["index"]).items():
            counts = index["counters"]
            alive = np.asarray(
                jax.vmap(lambda s, n=name: alive_slots(s, step, self.policies[n]))(index)
            )[list(self.layouts[name].devices)]
            row: dict[str, Any] = dict(zip(COUNTERS, counter_totals(counts), strict=True))
            row["occupancy"] = float(alive.mean())
            row["occupancy_max"] = float(alive.mean(axis=1).max())
            out[name] = row
        return out

    def snapshot(self, state: Mapping) -> dict[str, dict[str, Any]]:
        """Per table, as numpy: the alive keys (uint64, ascending) with their rows [K, D],
        optimizer slots ({name: [K] or [K, D]}), ``last`` and ``freq`` [K]: the table's
        content, independent of the mesh."""
        emb = jax.device_get(state["embedding"])
        step = int(emb["step"])
        out = {}
        for name, index in jax.device_get(state["index"]).items():
            group, piece = self.layouts[name].group, self.layouts[name].piece
            policy = self.policies[name]
            alive = np.asarray(jax.vmap(lambda s, p=policy: alive_slots(s, step, p))(index))
            shard_s, slot_s = np.nonzero(alive)
            keys = join_keys(index["key_hi"][alive], index["key_lo"][alive])
            order = np.argsort(keys, kind="stable")
            local = piece.row_offset + slot_s[order]
            shard_s = shard_s[order]
            cols = slice(piece.col_start, piece.col_end)
            out[name] = {
                "keys": keys[order],
                "rows": np.asarray(emb["tables"][group.name])[shard_s, local][:, cols],
                "slots": {
                    k: np.asarray(v)[shard_s, local] for k, v in emb["slots"][group.name].items()
                },
                "last": index["last"][alive][order],
                "freq": index["freq"][alive][order],
            }
        return out
