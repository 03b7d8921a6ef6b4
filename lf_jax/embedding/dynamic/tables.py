"""DynamicTables: the dynamic tables of an EmbeddingCollection, keyed by 64-bit ids.

Rows and optimizer slots stay where the collection keeps them: a dynamic table is
planned ``row_wise`` over every mesh axis, so its S shards are the S devices and shard s
holds ``vocab_size // S`` rows. What this adds is the map key -> row: each device holds
one shard's hash table (lf_jax.embedding.dynamic.hash_table) next to its rows. A step's
``resolve``, inside one shard_map per dynamic table:

1. every device dedupes its keys and buckets them by owner, ``key_hash(key) % S``;
2. one ``all_to_all`` sends each owner the keys it owns in a static [S, W] buffer, W the
   expected keys per owner plus 5 standard deviations (lf_jax.embedding.exchange's
   ``capacity_for``); when some device has more than W keys for one owner (skew), the
   step takes the other branch of a ``lax.cond``: [S, M] buffers, which fit any skew at
   O(S x M) per device for M local entries. Both branches resolve an owner's keys of the
   step at once, so the result does not depend on the branch;
3. each owner dedupes the keys of every sender and resolves them (find, admit, insert,
   evict), resetting the rows and optimizer slots of inserted keys to their initial
   values, then sends every key's slot back (a second ``all_to_all``);
4. a key in slot c of shard s becomes row ``c * S + s`` of the collection's table (row r
   lives on shard r % S at local row r // S), an absent key becomes padding (-1).

The returned SparseBatch goes to the collection's ``lookup`` and ``apply_gradients``
unchanged, so lookups, the owner-routed exchange, sparse optimizers and micro-batch
accumulation are the static engine's. An absent (refused or not yet admitted) key
reads nothing: it pools as padding (a zero row, left out of a mean) and gets no gradient.

Shapes: B batch, L max_ids, S shards, C = vocab_size // S slots per shard, D dim.

Example:
    >>> tables = [TableSpec(name="post", vocab_size=8 * 1024, dim=16,
    ...                     dynamic=DynamicPolicy(admit_after=2, eviction="lru"))]
    >>> coll = EmbeddingCollection(tables, features, {"post": row_wise(("data", "model"))}, mesh)
    >>> dyn = DynamicTables(coll)
    >>> state = dyn.init(jax.random.key(0))       # {"embedding": ..., "index": ...}
    >>> state, batch = dyn.resolve(state, dyn.shard_batch(dyn.preprocess({"post": [[7, 2**40]]})))
    >>> acts = coll.lookup(state["embedding"]["tables"], batch)
"""

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.embedding.collection import EmbeddingCollection, SparseBatch
from lf_jax.embedding.dynamic.hash_table import (
    COUNTERS,
    alive_slots,
    counter_totals,
    init_shard,
    resolve_shard,
)
from lf_jax.embedding.dynamic.keys import (
    OWNER_SALT,
    initial_rows,
    join_keys,
    key_hash,
    parse_keys,
    salt,
)
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.exchange import capacity_for
from lf_jax.embedding.preprocess import InvalidIdsError, preprocess
from lf_jax.embedding.sharding.piece import PlanError
from lf_jax.embedding.spec import SpecError


class KeyBatch(NamedTuple):
    """Static features as a SparseBatch; dynamic features as uint32 key halves and a
    validity mask, each [B, L]."""

    static: SparseBatch
    hi: dict
    lo: dict
    valid: dict


def _dedupe(sort_keys: tuple, fill_values: tuple):
    """Distinct rows of the columns ``sort_keys`` (sorted, padded with ``fill_values``) and
    each entry's position among them. Returns (unique columns, inverse [M], is_first [M]
    in sorted order, count)."""
    m = sort_keys[0].shape[0]
    *sorted_cols, perm = jax.lax.sort(
        (*sort_keys, jnp.arange(m, dtype=jnp.int32)), num_keys=len(sort_keys)
    )
    differs = functools.reduce(jnp.logical_or, [c[1:] != c[:-1] for c in sorted_cols])
    is_new = jnp.concatenate([jnp.ones((1,), bool), differs])
    rank = jnp.cumsum(is_new, dtype=jnp.int32) - 1
    target = jnp.where(is_new, rank, m)
    unique = tuple(
        jnp.full((m,), fill, col.dtype).at[target].set(col, mode="drop")
        for col, fill in zip(sorted_cols, fill_values, strict=True)
    )
    inverse = jnp.zeros((m,), jnp.int32).at[perm].set(rank)
    return unique, inverse


class DynamicTables:
    """Key -> row maps of a collection's dynamic tables (see module docstring)."""

    def __init__(self, collection: EmbeddingCollection):
        self.collection = collection
        self.mesh = collection.mesh
        self.axes = tuple(self.mesh.axis_names)
        self.shards = collection.num_devices
        self.specs = {n: t for n, t in collection.tables.items() if t.dynamic is not None}
        if not self.specs:
            raise SpecError("DynamicTables: the collection has no table with a dynamic policy")
        self.policies: dict[str, DynamicPolicy] = {
            n: t.dynamic for n, t in self.specs.items() if t.dynamic is not None
        }
        self.features = {
            t: [f for f in collection.features.values() if f.table == t] for t in self.specs
        }
        self.placement = {}
        for name, spec in self.specs.items():
            for feature in self.features[name]:
                if feature.weighted:
                    raise SpecError(
                        f"feature '{feature.name}' reads dynamic table '{name}' and is "
                        "weighted; dynamic features take unweighted keys"
                    )
            if spec.vocab_size % self.shards:
                raise SpecError(
                    f"dynamic table '{name}': vocab_size {spec.vocab_size} (its row capacity) "
                    f"must divide over the {self.shards} devices"
                )
            group, piece = next(
                (g, p) for g in collection.groups for p in g.pieces if p.table == name
            )
            if group.axes != self.axes or piece.num_slots != self.shards:
                raise PlanError(
                    f"dynamic table '{name}': plan it row_wise over every mesh axis "
                    f"{self.axes}, got {collection.plan[name]!r}"
                )
            self.placement[name] = (group, piece)

    def capacity(self, table: str) -> int:
        """Slots (keys) per shard of a dynamic table."""
        return self.specs[table].vocab_size // self.shards

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
                    lambda x: jnp.broadcast_to(x, (self.shards, *x.shape)), self._empty_shard(name)
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
        if size % self.shards:
            raise InvalidIdsError(f"batch size {size} does not divide over {self.shards} devices")
        sharding = self.collection.batch_sharding(leading_dims)
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)

    # ----- resolve --------------------------------------------------------------------------
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
        for name in self.specs:
            group, _ = self.placement[name]
            feats = [f.name for f in self.features[name]]
            rows, tables[group.name], slots[group.name], index[name] = self._resolve_table(
                name,
                tables[group.name],
                slots[group.name],
                index[name],
                [batch.hi[f] for f in feats],
                [batch.lo[f] for f in feats],
                [batch.valid[f] for f in feats],
                step,
                insert,
            )
            for feature, part in zip(feats, rows, strict=True):
                ids[feature] = part
                weights[feature] = (part >= 0).astype(jnp.float32)
        new_state = {
            "embedding": {"tables": tables, "slots": slots, "step": emb["step"]},
            "index": index,
        }
        return new_state, SparseBatch(ids, weights)

    def _resolve_table(self, name, stored, opt_slots, index, his, los, valids, step, insert):
        spec, (group, piece) = self.specs[name], self.placement[name]
        policy = self.policies[name]
        shards, axes = self.shards, self.axes
        widths = [h.shape[-1] for h in his]
        lead = his[0].ndim - 2
        batch_spec = PartitionSpec(*([None] * lead), axes)
        slot_init = {k: group.optimizer.slot_init(k) for k in opt_slots}

        def shard(stored, opt_slots, index, hi, lo, valid, step):
            shape = hi.shape
            hi, lo, valid = hi.reshape(-1), lo.reshape(-1), valid.reshape(-1)
            m = hi.shape[0]
            owner = jnp.where(
                valid,
                (key_hash(jnp, hi, lo, salt(OWNER_SALT, policy.seed)) % shards).astype(jnp.int32),
                shards,
            )
            (u_owner, u_hi, u_lo), inverse = _dedupe((owner, hi, lo), (shards, 0, 0))
            start = jnp.searchsorted(u_owner, jnp.arange(shards, dtype=jnp.int32))
            within = jnp.arange(m, dtype=jnp.int32) - start[jnp.minimum(u_owner, shards - 1)]
            to_owner = u_owner  # row `shards` (padding) is dropped by the scatters

            def owner_resolve(width, stored, opt_slots, table):
                """Keys to owners through [S, width] buffers, resolved there; returns
                each unique local key's slot at its owner (-1: none)."""

                def bucket(values, fill):
                    buf = jnp.full((shards, width), fill, values.dtype)
                    return buf.at[to_owner, within].set(values, mode="drop")

                sent = [bucket(u_hi, 0), bucket(u_lo, 0), bucket(u_owner < shards, False)]
                r_hi, r_lo, r_valid = (
                    jax.lax.all_to_all(x, axes, 0, 0, tiled=True).reshape(-1) for x in sent
                )
                (o_invalid, o_hi, o_lo), o_inverse = _dedupe(
                    ((~r_valid).astype(jnp.int32), r_hi, r_lo), (1, 0, 0)
                )
                slot_u, new_u, table = resolve_shard(
                    table, o_hi, o_lo, o_invalid == 0, step, policy, insert
                )
                back = jax.lax.all_to_all(
                    slot_u[o_inverse].reshape(shards, width), axes, 0, 0, tiled=True
                )
                if insert:  # inserted keys start from fresh rows and optimizer slots
                    local = jnp.where(new_u, piece.row_offset + slot_u, group.rows)
                    fresh = initial_rows(spec, o_hi, o_lo)[:, piece.col_start : piece.col_end]
                    stored = stored.at[0, local].set(fresh.astype(stored.dtype), mode="drop")
                    opt_slots = {
                        k: v.at[0, local].set(jnp.asarray(slot_init[k], v.dtype), mode="drop")
                        for k, v in opt_slots.items()
                    }
                got = back.at[to_owner, within].get(mode="fill", fill_value=-1)
                return got, stored, opt_slots, table

            table = {k: v[0] for k, v in index.items()}
            width = capacity_for(m, 1 / shards, m)
            if width >= m:
                got, stored, opt_slots, table = owner_resolve(m, stored, opt_slots, table)
            else:  # the [S, width] buffers unless some device has more keys for one owner
                load = jnp.zeros((shards + 1,), jnp.int32).at[u_owner].add(1)[:shards]
                over = jax.lax.pmax((jnp.max(load) > width).astype(jnp.int32), axes)
                got, stored, opt_slots, table = jax.lax.cond(
                    over > 0,
                    functools.partial(owner_resolve, m),
                    functools.partial(owner_resolve, width),
                    stored,
                    opt_slots,
                    table,
                )
            row_u = jnp.where(got >= 0, got * shards + u_owner, -1)
            ids = jnp.where(valid, row_u[inverse], -1).reshape(shape)
            return ids, stored, opt_slots, {k: v[None] for k, v in table.items()}

        table_spec = group.partition_spec(None, None)
        slot_specs = {
            k: group.partition_spec(*([None] * (v.ndim - 1))) for k, v in opt_slots.items()
        }
        index_specs = {k: PartitionSpec(axes, *([None] * (v.ndim - 1))) for k, v in index.items()}
        ids, stored, opt_slots, index = jax.shard_map(
            shard,
            mesh=self.mesh,
            in_specs=(
                table_spec,
                slot_specs,
                index_specs,
                batch_spec,
                batch_spec,
                batch_spec,
                PartitionSpec(),
            ),
            out_specs=(batch_spec, table_spec, slot_specs, index_specs),
            check_vma=False,
        )(
            stored,
            opt_slots,
            index,
            jnp.concatenate(his, axis=-1),
            jnp.concatenate(los, axis=-1),
            jnp.concatenate(valids, axis=-1),
            step,
        )
        parts = np.cumsum([0, *widths])
        rows = [ids[..., a:b] for a, b in zip(parts[:-1], parts[1:], strict=True)]
        return rows, stored, opt_slots, index

    # ----- host views -----------------------------------------------------------------------
    def counters(self, state: Mapping) -> dict[str, dict[str, Any]]:
        """Per table: the cumulative COUNTERS summed over shards (probe_max: the largest),
        ``occupancy`` (alive keys / capacity, all shards) and ``occupancy_max`` (the
        fullest shard)."""
        out = {}
        step = int(state["embedding"]["step"])
        for name, index in jax.device_get(state["index"]).items():
            counts = index["counters"]
            alive = np.asarray(
                jax.vmap(lambda s, n=name: alive_slots(s, step, self.policies[n]))(index)
            )
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
            group, piece = self.placement[name]
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
