"""The lookup protocol on shard_map: route ids to owners -> local lookup -> combine back.

One GroupRoute per shard group lists the (feature, piece) blocks reading the group. A
block contributes ``max_ids`` entries per example; entry e of example n carries the
owner slot, the local row and a coefficient (combiner scale x weight, 0 for padding),
and adds ``coef * row`` into output column ``out_col[e]`` (one column per pooled
block, one per position for a sequence block).

Route: every device dedupes its own entries and exchanges them with the owners of their
rows only. When every owner gets at most the capacity C of distinct keys from every
device (uniform or zipf ids), one all_to_all round serves the step and the device pools
straight from the received [S, C] rows (lf_jax.embedding.buckets: a hash dedupe, no
sort over the key space); otherwise the keys are sorted and exchanged in as many rounds
as skew needs (lf_jax.embedding.exchange), exact either way. Lookup: owners gather the
rows and send them back. Combine: each device pools its own bags. The update
(lf_jax.embedding.update) sends each distinct row's gradient back the same way.
Per-device work: O(local entries + owned rows touched), never O(global batch), for
groups over mesh axes; replicated groups (data_parallel, row_wise over some axes)
all-gather the owners' received gradients over their replica axes in the update, the
inherent cost of keeping replicas equal.

Shapes: B local batch, E entries, C output columns, D dim, R rows, S slots.
Forward:  stored [S, R, D], slot/local/coef [B, E] -> out [B, C, D]

Example:
    >>> route = GroupRoute.build(group, features_by_name)
    >>> out_bcd = group_forward(mesh, route, stored_srd, *route.entries(ids, coefs))
"""

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lf_jax.embedding import bag_exchange
from lf_jax.embedding.bag_exchange import BagLayout
from lf_jax.embedding.buckets import (
    Buckets,
    always_fits,
    check_packed_range,
    fetch_one_round,
)
from lf_jax.embedding.exchange import (
    Requests,
    capacity_for,
    check_key_range,
    fetch_rows,
    replicas_gather_entries,
)
from lf_jax.embedding.kernels import fused
from lf_jax.embedding.kernels import route as fused_route
from lf_jax.embedding.sharding.layout import Group
from lf_jax.embedding.sharding.piece import Piece
from lf_jax.embedding.spec import FeatureSpec
from lf_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Block:
    feature: str
    piece: Piece
    pooled: bool
    max_ids: int
    out_start: int

    @property
    def out_width(self) -> int:
        return 1 if self.pooled else self.max_ids


@dataclasses.dataclass(frozen=True, eq=False)
class GroupRoute:
    group: Group
    blocks: tuple[Block, ...]
    slot0_e: np.ndarray
    stride_e: np.ndarray
    num_slots_e: np.ndarray
    offset_e: np.ndarray
    out_col_e: np.ndarray
    num_out: int
    owner_share: float
    id_fill: float = 1.0
    kernel: str = "xla"
    modes: tuple[str, ...] = ("rows",)

    @classmethod
    def build(
        cls,
        group: Group,
        features: Mapping,
        id_fill: float = 1.0,
        kernel: str = "xla",
        modes: tuple[str, ...] = ("rows",),
    ) -> "GroupRoute":
        """Blocks for every feature reading a table with a piece in ``group``; exchange
        capacities sized for ``id_fill`` (see ``capacity``); ``kernel``: 'fused' or 'xla',
        the path of the group's local work (lf_jax.embedding.kernels.fused); ``modes``: the
        exchange modes it may take, the first its default ("rows", "bags": the owners
        pool partial bags, lf_jax.embedding.bag_exchange.exchange_modes)."""
        blocks: list[Block] = []
        columns: dict[str, list] = {k: [] for k in ("slot0", "stride", "slots", "offset", "out")}
        out_start = 0
        load = np.zeros(group.num_slots)  # expected entries per owner, rows spread evenly
        for feature in features.values():
            for piece in group.pieces:
                if piece.table != feature.table:
                    continue
                block = Block(feature.name, piece, feature.pooled, feature.max_ids, out_start)
                blocks.append(block)
                columns["slot0"] += [piece.slot0] * feature.max_ids
                columns["stride"] += [piece.slot_stride] * feature.max_ids
                columns["slots"] += [piece.num_slots] * feature.max_ids
                columns["offset"] += [piece.row_offset] * feature.max_ids
                columns["out"] += (
                    [out_start] * feature.max_ids
                    if block.pooled
                    else list(range(out_start, out_start + feature.max_ids))
                )
                out_start += block.out_width
                load[piece.slots()] += feature.max_ids / piece.num_slots
        check_key_range(group.name, group.num_slots, group.rows)

        def as_array(key):
            return np.asarray(columns[key], np.int32)

        return cls(
            group,
            tuple(blocks),
            as_array("slot0"),
            as_array("stride"),
            as_array("slots"),
            as_array("offset"),
            as_array("out"),
            out_start,
            float(load.max() / load.sum()) if load.sum() else 1.0,
            id_fill,
            kernel,
            modes,
        )

    @functools.cached_property
    def piece_columns(self) -> tuple[tuple[Piece, np.ndarray], ...]:
        """Each piece with the entry columns that read it (pieces hold disjoint rows)."""
        columns: dict[Piece, list[int]] = {}
        e = 0
        for block in self.blocks:
            columns.setdefault(block.piece, []).extend(range(e, e + block.max_ids))
            e += block.max_ids
        return tuple((piece, np.asarray(cols, np.int32)) for piece, cols in columns.items())

    def gathers_entries(self, local_examples: int) -> bool:
        """Whether this replicated group syncs replicas by gathering entries (see
        lf_jax.embedding.exchange.replicas_gather_entries); never for sharded groups."""
        return self.group.num_slots == 1 and replicas_gather_entries(
            local_examples * len(self.out_col_e),
            local_examples * self.num_out,
            self.group.dim,
            self.group.rows,
        )

    def capacity(self, entries: int) -> int:
        """Keys per owner and exchange round for ``entries`` local (padded) entries, of
        which at most ``id_fill`` hold real ids (EmbeddingCollection's ``id_fill``, e.g.
        from lf_jax.embedding.preprocess.id_fill): the [S, C] exchange buffers follow the
        real ids, not the padding. A batch with more distinct keys for an owner takes the
        sorted multi-round path: slower, never a dropped id."""
        return capacity_for(math.ceil(entries * self.id_fill), self.owner_share, self.group.rows)

    def real_entries(self, entries: int) -> int | None:
        """Entries of ``entries`` local (padded) ones that the one-round layout keeps
        (compacted, padding skipped): ``id_fill`` of them, a multiple of 8; None when
        that is all of them. A device with more real ids takes the sorted rounds."""
        real = -(-math.ceil(entries * self.id_fill) // 8) * 8
        return None if real >= entries else real

    def entries(self, ids: Mapping[str, jax.Array], coefs: Mapping[str, jax.Array]):
        """Per-entry (slot, local row, coef) [..., B, E] from per-feature ids/coefs [..., B, L].

        Ids < 0 (padding) get slot -1, which no device owns.
        """
        ids_be = jnp.concatenate([ids[b.feature] for b in self.blocks], axis=-1)
        coef_be = jnp.concatenate([coefs[b.feature] for b in self.blocks], axis=-1)
        valid = ids_be >= 0
        safe = jnp.where(valid, ids_be, 0)
        # rows are dealt round-robin over a piece's slots (row r on slot r % num_slots),
        # so hot low ids (zipf) spread over every owner instead of piling onto one
        slot_be = jnp.where(valid, self.slot0_e + (safe % self.num_slots_e) * self.stride_e, -1)
        local_be = self.offset_e + safe // self.num_slots_e
        return slot_be.astype(jnp.int32), local_be.astype(jnp.int32), coef_be.astype(jnp.float32)

    def pool(
        self, rows_xd: jax.Array, index_be: jax.Array, coef_be: jax.Array, valid_be: jax.Array
    ) -> jax.Array:
        """[B, C, D] float32 outputs: valid entry e adds ``coef[:, e] * rows[index[:, e]]``
        into column out_col[e] (``rows_xd``: [X, D] or a device's [1, X, D] block).

        Kernel 'fused': the C++ pool (lf_jax.embedding.kernels.fused.pool), invalid
        entries skipped. Kernel 'xla': one gather per entry column, summed per pooled
        block, which XLA fuses into one loop per output: no [B, E, D] temporary (a gather
        of every entry followed by a reduction or segment_sum materialised it, 168 MB at
        B = 4096 and E = 160, and took 3.3x the time); invalid entries read a clamped
        row, which their coefficient 0 cancels."""
        if self.kernel == "fused":
            index_be = jnp.where(valid_be, index_be, -1)
            return fused.pool(rows_xd, index_be, coef_be, self.out_col_e, self.num_out)
        rows_xd = rows_xd.reshape(-1, rows_xd.shape[-1])
        columns, e = [], 0
        for block in self.blocks:
            picked = [
                rows_xd.at[index_be[:, e + i]].get(mode="clip").astype(jnp.float32)
                * coef_be[:, e + i, None]
                for i in range(block.max_ids)
            ]
            columns += [sum(picked[1:], picked[0])] if block.pooled else picked
            e += block.max_ids
        return jnp.stack(columns, axis=1)

    def split_output(self, out_bcd: jax.Array) -> dict[Block, jax.Array]:
        """Output columns -> per block [B, Dp] (pooled) or [B, L, Dp] (sequence)."""
        return {
            b: (
                out_bcd[:, b.out_start]
                if b.pooled
                else out_bcd[:, b.out_start : b.out_start + b.max_ids]
            )
            for b in self.blocks
        }

    def join_gradients(self, grads: Mapping[str, jax.Array]) -> jax.Array:
        """Per-feature activation grads [..., B, D] / [..., B, L, D] -> [..., B, C, Dp]."""
        parts = []
        for b in self.blocks:
            g = grads[b.feature][..., b.piece.col_start : b.piece.col_end]
            parts.append(g[..., None, :] if b.pooled else g)
        return jnp.concatenate(parts, axis=-2)


def shard_layout(
    route: GroupRoute, slot_m, local_m, all_axes, capacity: int | None = None
) -> Buckets:
    """Inside shard_map: the one-round layout of a device's [M] entries of a group whose
    rows are spread over several slots (the forward and the update build the same one),
    for ``capacity`` keys per owner (None: ``route.capacity(M)``)."""
    group, m = route.group, slot_m.shape[0]
    check_packed_range(group.name, m, group.num_slots)
    capacity = route.capacity(m) if capacity is None else capacity
    # a layout that always fits (forward and update skip the sorted rounds) keeps them all
    real = None if always_fits(m, group.rows, capacity) else route.real_entries(m)
    return Buckets.build(
        slot_m,
        local_m,
        group.num_slots,
        group.rows,
        capacity,
        all_axes,
        group.axes,
        real,
        route.kernel,
    )


def group_layout(
    mesh: Mesh, route: GroupRoute, slot_be, local_be, capacity: int | None = None
) -> Buckets:
    """Every device's one-round layout of its [B, E] entries, as global arrays (ask
    [n * S, C], asked and first [n * S, C], entry [n * B, E], fits and most [n]; n
    devices), for
    ``group_forward`` and ``group_update`` to share: one dedupe, bucketing and exchange
    of the asks per step instead of two.
    Only for groups with ``num_slots > 1``. ``capacity``: C (None: the static
    ``route.capacity``); the forward and update of a given layout exchange with its C."""
    all_axes = tuple(mesh.axis_names)
    spec = PartitionSpec(all_axes)

    def shard(slot_be, local_be):
        layout = shard_layout(route, slot_be.reshape(-1), local_be.reshape(-1), all_axes, capacity)
        return Buckets(
            layout.ask_sc,
            layout.entry_m.reshape(slot_be.shape),
            layout.fits[None],
            layout.most[None],
            layout.asked_sc,
            layout.first_sc,
        )

    return jax.shard_map(shard, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)(
        slot_be, local_be
    )


def local_layout(layout: Buckets) -> Buckets:
    """Inside shard_map: a device's block of ``group_layout``'s arrays, as built there."""
    return Buckets(
        layout.ask_sc,
        layout.entry_m.reshape(-1),
        layout.fits[0],
        layout.most[0],
        layout.asked_sc,
        layout.first_sc,
    )


def group_forward(
    mesh: Mesh,
    route: GroupRoute,
    stored_srd,
    slot_be,
    local_be,
    coef_be,
    layout: Buckets | BagLayout | None = None,
):
    """Pooled/sequence lookups of one group: [B, E] entries -> [B, C, D] float32.

    Each device dedupes its own entries, fetches the unique rows from their owners
    (lf_jax.embedding.exchange) and combines its bags locally. ``layout``: the group's
    ``group_layout`` of these entries, if already built.
    """
    group, all_axes = route.group, tuple(mesh.axis_names)
    entry_spec = PartitionSpec(all_axes)

    def shard(stored_1rd, slot_be, local_be, coef_be, given):
        if group.num_slots == 1:  # every row of the group is here: pool straight from it
            return route.pool(stored_1rd, local_be, coef_be, slot_be >= 0)
        b, e = slot_be.shape
        slot_m, local_m = slot_be.reshape(-1), local_be.reshape(-1)
        capacity = given.capacity if isinstance(given, Buckets) else route.capacity(b * e)

        def rounds(_):  # sorted keys, as many rounds as skew needs
            requests = Requests.build(slot_m, local_m, group.num_slots, group.rows)
            rows_ud = fetch_rows(requests, stored_1rd[0], group.axes, capacity, all_axes)
            return route.pool(rows_ud, requests.inverse_m.reshape(b, e), coef_be, slot_be >= 0)

        if bag_exchange.takes_bags(route, given):  # the owners pool partial bags
            layout = None if given is None else bag_exchange.local(given)
            return bag_exchange.forward(
                route, stored_1rd, slot_be, local_be, coef_be, rounds, layout
            )
        layout = (
            local_layout(given)
            if given is not None
            else shard_layout(route, slot_m, local_m, all_axes)
        )

        def one_round(_):  # pool straight from the received rows
            rows_scd = fetch_one_round(layout, stored_1rd[0], group.axes, route.kernel)
            index_be = layout.entry_m.reshape(b, e)
            if route.kernel == "fused":  # from each peer's block: no concatenation first
                index_be = jnp.where(slot_be >= 0, index_be, -1)
                return fused_route.pool_parts(
                    list(rows_scd), index_be, coef_be, route.out_col_e, route.num_out
                )
            rows_kd = rows_scd.reshape(-1, rows_scd.shape[-1])
            return route.pool(rows_kd, index_be, coef_be, slot_be >= 0)

        if always_fits(b * e, group.rows, capacity):
            return one_round(None)
        return jax.lax.cond(layout.fits, one_round, rounds, None)

    return jax.shard_map(
        shard,
        mesh=mesh,
        out_specs=entry_spec,
        in_specs=(group.partition_spec(None, None), entry_spec, entry_spec, entry_spec, entry_spec),
        check_vma=False,
    )(stored_srd, slot_be, local_be, coef_be, layout)


def combiner_coefficients(features: Mapping[str, FeatureSpec], batch) -> dict[str, jax.Array]:
    """Each feature's per-id pooling coefficients [B, max_ids] (or [k, B, max_ids]) from the
    batch's weights and the feature's combiner: sum = the weights, mean = weights / their
    sum, sqrtn = weights / their L2 norm; padded ids (-1) get 0."""
    coefs = {}
    for name, feature in features.items():
        w = jnp.where(batch.ids[name] >= 0, batch.weights[name], 0.0)
        if feature.combiner == "mean":
            w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)
        elif feature.combiner == "sqrtn":
            w = w / jnp.maximum(jnp.sqrt(jnp.sum(w * w, axis=-1, keepdims=True)), 1e-12)
        coefs[name] = w
    return coefs


def group_routing(
    routing: Mapping[str, Buckets | BagLayout] | None, route: GroupRoute
) -> Buckets | BagLayout | None:
    """The group's layout from ``EmbeddingCollection.routing`` (None: build it)."""
    if routing is None or route.group.num_slots == 1:
        return None
    if route.group.name not in routing:
        raise UserInputError(
            f"routing has no layout for shard group '{route.group.name}' (it has "
            f"{sorted(routing)}): build it with this collection's routing(batch)"
        )
    return routing[route.group.name]
