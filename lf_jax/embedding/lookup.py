"""The lookup protocol on shard_map: route ids to owners -> local lookup -> combine back.

One GroupRoute per shard group lists the (feature, piece) blocks reading the group. A
block contributes ``max_ids`` entries per example; entry e of example n carries the
owner slot, the local row and a coefficient (combiner scale x weight, 0 for padding),
and adds ``coef * row`` into output column ``out_col[e]`` (one column per pooled
block, one per position for a sequence block).

Shapes: b local batch, n gathered batch, E entries, C output columns, D dim, R rows.
Forward:  stored [S, R, D], slot/local/coef [B, E] -> out [B, C, D]
Update:   + grads [k, B, C, D] (k micro-batches) -> new stored and slots (sparse).

Example:
    >>> route = GroupRoute.build(group, features_by_name)
    >>> out_bcd = group_forward(mesh, route, stored_srd, *route.entries(ids, coefs))
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lf_jax.embedding.sharding.layout import Group
from lf_jax.embedding.sharding.piece import Piece


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
    rows_per_slot_e: np.ndarray
    offset_e: np.ndarray
    out_col_e: np.ndarray
    num_out: int

    @classmethod
    def build(cls, group: Group, features: Mapping) -> "GroupRoute":
        """Blocks for every feature reading a table with a piece in ``group``."""
        blocks: list[Block] = []
        columns: dict[str, list] = {k: [] for k in ("slot0", "stride", "rpp", "offset", "out")}
        out_start = 0
        for feature in features.values():
            for piece in group.pieces:
                if piece.table != feature.table:
                    continue
                block = Block(feature.name, piece, feature.pooled, feature.max_ids, out_start)
                blocks.append(block)
                columns["slot0"] += [piece.slot0] * feature.max_ids
                columns["stride"] += [piece.slot_stride] * feature.max_ids
                columns["rpp"] += [piece.rows_per_slot] * feature.max_ids
                columns["offset"] += [piece.row_offset] * feature.max_ids
                columns["out"] += (
                    [out_start] * feature.max_ids
                    if block.pooled
                    else list(range(out_start, out_start + feature.max_ids))
                )
                out_start += block.out_width

        def as_array(key):
            return np.asarray(columns[key], np.int32)

        return cls(
            group,
            tuple(blocks),
            as_array("slot0"),
            as_array("stride"),
            as_array("rpp"),
            as_array("offset"),
            as_array("out"),
            out_start,
        )

    def entries(self, ids: Mapping[str, jax.Array], coefs: Mapping[str, jax.Array]):
        """Per-entry (slot, local row, coef) [..., B, E] from per-feature ids/coefs [..., B, L].

        Ids < 0 (padding) get slot -1, which no device owns.
        """
        ids_be = jnp.concatenate([ids[b.feature] for b in self.blocks], axis=-1)
        coef_be = jnp.concatenate([coefs[b.feature] for b in self.blocks], axis=-1)
        valid = ids_be >= 0
        safe = jnp.where(valid, ids_be, 0)
        slot_be = jnp.where(
            valid, self.slot0_e + (safe // self.rows_per_slot_e) * self.stride_e, -1
        )
        local_be = self.offset_e + safe % self.rows_per_slot_e
        return slot_be.astype(jnp.int32), local_be.astype(jnp.int32), coef_be.astype(jnp.float32)

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


def _my_slot(mesh: Mesh, axes: tuple[str, ...]) -> jax.Array:
    index = jnp.int32(0)
    for axis in axes:
        index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
    return index


def _gather(x, axes):
    return jax.lax.all_gather(x, axes, axis=0, tiled=True) if axes else x


def group_forward(mesh: Mesh, route: GroupRoute, stored_srd, slot_be, local_be, coef_be):
    """Pooled/sequence lookups of one group: [B, E] entries -> [B, C, D] float32."""
    group, batch_axes = route.group, tuple(mesh.axis_names)
    entry_spec = PartitionSpec(batch_axes)

    def shard(stored_1rd, slot_be, local_be, coef_be):
        slot_ne, local_ne, coef_ne = (_gather(x, group.axes) for x in (slot_be, local_be, coef_be))
        own_ne = slot_ne == _my_slot(mesh, group.axes)
        rows_ned = jnp.take(stored_1rd[0], jnp.where(own_ne, local_ne, 0), axis=0)
        rows_ned = rows_ned.astype(jnp.float32) * jnp.where(own_ne, coef_ne, 0.0)[..., None]
        out_cnd = jax.ops.segment_sum(
            jnp.swapaxes(rows_ned, 0, 1),
            route.out_col_e,
            num_segments=route.num_out,
            indices_are_sorted=True,
        )
        out_ncd = jnp.swapaxes(out_cnd, 0, 1)
        if group.axes:
            out_ncd = jax.lax.psum_scatter(out_ncd, group.axes, scatter_dimension=0, tiled=True)
        return out_ncd

    return jax.shard_map(
        shard,
        mesh=mesh,
        out_specs=entry_spec,
        in_specs=(group.partition_spec(None, None), entry_spec, entry_spec, entry_spec),
    )(stored_srd, slot_be, local_be, coef_be)


def _unique_with_inverse(keys_m, fill):
    """jnp.unique(keys_m, size=M, fill_value=fill, return_inverse=True), faster on CPU.

    Sorts the keys alone (XLA's key+payload argsort is ~4x slower than a one-operand
    sort on CPU), compacts the distinct keys (ascending, padded with ``fill``, which is
    larger than every key) and finds each key's slot by binary search. Same result.
    """
    sorted_m = jnp.sort(keys_m)
    is_new = jnp.concatenate([jnp.ones((1,), bool), sorted_m[1:] != sorted_m[:-1]])
    target = jnp.where(is_new, jnp.cumsum(is_new) - 1, keys_m.size)
    unique_u = jnp.full_like(keys_m, fill).at[target].set(sorted_m, mode="drop")
    inverse_m = jnp.searchsorted(unique_u, keys_m, method="scan_unrolled")
    return unique_u, inverse_m.astype(jnp.int32)


def group_update(
    mesh: Mesh,
    route: GroupRoute,
    stored_srd,
    slots: dict,
    slot_kbe,
    local_kbe,
    coef_kbe,
    grad_kbcd,
    step,
):
    """Sparse optimizer step on the rows touched by k micro-batches of entries.

    Gradients w.r.t. looked-up rows are coef * grad of the output column; duplicate
    rows are summed (sort + segment_sum, static size) and updated once.
    """
    group, batch_axes = route.group, tuple(mesh.axis_names)
    entry_spec = PartitionSpec(None, batch_axes)
    slot_specs = {
        name: group.partition_spec(*([None] * (value.ndim - 1))) for name, value in slots.items()
    }

    def shard(stored_1rd, slots, slot_kbe, local_kbe, coef_kbe, grad_kbcd, step):
        def flat(x):
            return x.reshape(-1, *x.shape[2:])

        slot_ne, local_ne, coef_ne, grad_ncd = (
            _gather(flat(x), batch_axes) for x in (slot_kbe, local_kbe, coef_kbe, grad_kbcd)
        )
        own_ne = slot_ne == _my_slot(mesh, group.axes)
        grad_ned = jnp.take(grad_ncd, route.out_col_e, axis=1) * coef_ne[..., None]
        sentinel = group.rows
        keys_m = jnp.where(own_ne, local_ne, sentinel).reshape(-1)
        unique_u, inverse_m = _unique_with_inverse(keys_m, sentinel)
        grad_ud = jax.ops.segment_sum(
            grad_ned.reshape(-1, group.dim), inverse_m.reshape(-1), num_segments=keys_m.size
        )
        table_rd = stored_1rd[0]
        rows_ud = table_rd.at[unique_u].get(mode="fill", fill_value=0).astype(jnp.float32)
        slots_u = {k: v[0].at[unique_u].get(mode="fill", fill_value=0) for k, v in slots.items()}
        new_rows_ud, new_slots_u = group.optimizer.update(rows_ud, grad_ud, slots_u, step)
        table_rd = table_rd.at[unique_u].set(new_rows_ud.astype(table_rd.dtype), mode="drop")
        new_slots = {
            k: slots[k][0].at[unique_u].set(new_slots_u[k], mode="drop")[None] for k in slots
        }
        return table_rd[None], new_slots

    table_spec = group.partition_spec(None, None)
    # Gathered entries are identical on every replica, so replicated outputs really are
    # replicated; the vma checker cannot see through all_gather, hence check_vma=False.
    return jax.shard_map(
        shard,
        mesh=mesh,
        out_specs=(table_spec, slot_specs),
        check_vma=False,
        in_specs=(
            table_spec,
            slot_specs,
            entry_spec,
            entry_spec,
            entry_spec,
            entry_spec,
            PartitionSpec(),
        ),
    )(stored_srd, slots, slot_kbe, local_kbe, coef_kbe, grad_kbcd, step)
