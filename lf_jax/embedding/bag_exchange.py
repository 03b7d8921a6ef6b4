"""Bag mode of the owner-routed exchange: the owners pool partial bags.

The rows exchange (lf_jax.embedding.buckets) sends each owner a device's distinct keys
and gets rows back, which the device pools. In bag mode a device sends each owner its
entries (local row, partial slot, coefficient: 12 bytes each, one all_to_all); the owner
pools them into one partial sum per (example, output column) bag that has an entry
there and sends the [Cb, D] partials back, and the device adds each bag's partials. The
update sends each bag's output gradient to the owners holding part of it; each owner
sums its entries' gradients (coefficient x their bag's) per row and applies the sparse
optimizer once per row (lf_jax.embedding.kernels.bag).

It moves fewer bytes when bags hold several ids per owner and ids rarely repeat within a
device's batch (long bags over few owners); repeated ids (skewed, zipf-like) move more
(no dedupe at the device). bench/BENCHMARKS.md, "Bag mode". Exact under any skew: when
a device has more entries or bags for an owner than the capacities (Ce, Cb: static, or
from the traffic through lf_jax.embedding.capacity), the step takes the rows exchange's
sorted rounds instead.

Shapes: N examples, E entry columns, K output columns, S owners, Ce entries and Cb
partial bags per owner, R rows, D dim.

``EmbeddingCollection(exchange="bags")`` sends every such group this way, ``"auto"`` lets
the traffic pick per group (lf_jax.embedding.capacity.CapacityChooser: a few steps in
each mode, then the mode whose counts move fewer bytes, ``bag_bytes`` < ``rows_bytes``).

Example (inside group_forward's shard_map):
    >>> out_nkd = forward(route, stored_1rd, slot_ne, local_ne, coef_ne, rounds)
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lf_jax.embedding import bag_xla
from lf_jax.embedding.exchange import capacity_for, exchange_blocks
from lf_jax.embedding.kernels import bag
from lf_jax.embedding.kernels import route as fused_route
from lf_jax.errors import UserInputError

EXCHANGE_MODES = ("rows", "bags", "auto")  # EmbeddingCollection(exchange=...)


def exchange_modes(group, mesh, kernel: str, exchange: str) -> tuple[str, ...]:
    """The exchange modes ``group`` may take under ``EmbeddingCollection(exchange=...)``,
    the first its default: ("rows",), ("bags",) or ("rows", "bags") (``auto``: the
    traffic picks, lf_jax.embedding.capacity.CapacityChooser). Bag mode is for groups
    whose rows spread over every device of the mesh (no replicas); other groups keep
    rows. ``auto`` offers bags on the fused CPU kernels (where their speed is measured);
    ``exchange="bags"`` also takes the XLA path (lf_jax.embedding.bag_xla)."""
    if exchange not in EXCHANGE_MODES:
        raise UserInputError(f"exchange must be one of {EXCHANGE_MODES}, got {exchange!r}")
    if exchange == "rows" or group.num_slots == 1 or group.replica_axes(mesh):
        return ("rows",)
    if exchange == "auto":
        return ("rows", "bags") if kernel == "fused" else ("rows",)
    return ("bags",)


def rows_bytes(capacity: int, dim: int) -> int:
    """Bytes a device and one owner exchange per step in the rows exchange: ``capacity``
    keys out (int32), their float32 rows back and their gradients out."""
    return capacity * (4 + 2 * 4 * dim)


def bag_bytes(entries: int, bags: int, dim: int) -> int:
    """Bytes a device and one owner exchange per step in bag mode: ``entries`` x 12
    (local row, partial slot, coefficient) out, ``bags`` float32 partials back and their
    gradients out. The ``auto`` rule: bag mode where this is below ``rows_bytes``."""
    return entries * 12 + bags * 2 * 4 * dim


def capacities(route, examples: int, width: int) -> tuple[int, int]:
    """(Ce, Cb) of ``route``'s group for ``examples`` x ``width`` padded entries of a
    device (``capacities_for``)."""
    return capacities_for(examples, width, route.id_fill, route.owner_share, route.num_out)


def capacities_for(
    examples: int, width: int, id_fill: float, owner_share: float, num_out: int
) -> tuple[int, int]:
    """(Ce, Cb) for ``examples`` x ``width`` padded entries of a device, ``id_fill`` of
    them real, ``num_out`` output columns per example: Ce the expected entries one owner
    gets (``owner_share`` of the real ones) plus 5 standard deviations, Cb the bags: each
    of the examples x K bags has an entry at a given owner with probability
    1 - (1 - share)^L, L the mean real ids per output column, plus 5 sigma. At most every
    entry, and every bag. The planner prices bag mode with it (lf_jax.planner.cost)."""
    entries = examples * width
    real = math.ceil(entries * id_fill)
    ce = capacity_for(real, owner_share, entries)
    per_bag = real / (examples * num_out)
    p = 1.0 - (1.0 - owner_share) ** per_bag
    bags = examples * num_out
    return ce, capacity_for(bags, p, bags)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["asked_sc3", "index_nq", "bag_of_sc", "most"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class BagLayout:
    """A device's bag-mode layout (inside shard_map), or every device's as global arrays
    (``routing``: leading axes n * S, n * N and n).

    asked_sc3: [S, Ce, 3] the entries (local row, partial slot, coef bits) each sender s
    sent this device, already exchanged; index_nq: [N, K * S] where the partials of each
    (example, output column) bag come back (lf_jax.embedding.kernels.bag.layout);
    bag_of_sc: [S, Cb] the bag of each partial slot this device asks owner s for;
    most: [2] int32, the same on every device: the most entries and the most bags any
    device has for one owner (what (Ce, Cb) must be; lf_jax.embedding.capacity sizes
    them from it).
    """

    asked_sc3: jax.Array
    index_nq: jax.Array
    bag_of_sc: jax.Array
    most: jax.Array

    @property
    def fits(self) -> jax.Array:
        """Whether the bag exchange holds every entry (a device's layout)."""
        return (self.most[0] <= self.asked_sc3.shape[-2]) & (
            self.most[1] <= self.bag_of_sc.shape[-1]
        )


def takes_bags(route, layout) -> bool:
    """Whether a group's step exchanges bags: its layout from
    ``EmbeddingCollection.routing`` is a BagLayout, or, none given, bags is its default
    mode (``route.modes[0]``)."""
    if layout is not None:
        return isinstance(layout, BagLayout)
    return route.modes[0] == "bags"


def _layout(route, slot_ne, local_ne, coef_ne, given=(None, None)) -> BagLayout:
    """A device's BagLayout of its [N, E] entries (its entries sent to the owners), for
    capacities ``given`` (Ce, Cb) (None: ``capacities``)."""
    static = capacities(route, *slot_ne.shape)
    ce, cb = (g if g is not None else c for g, c in zip(given, static, strict=True))
    s_n, k = route.group.num_slots, route.num_out
    local_work = bag if route.kernel == "fused" else bag_xla
    packed, index_nq, bag_of, most = local_work.layout(
        slot_ne, local_ne, coef_ne, route.out_col_e, s_n, k, ce, cb
    )
    # each device's most rides behind its entries to every device (the group spans the
    # mesh): the largest arrives with them, no all-reduce of its own
    most_s13 = jnp.broadcast_to(jnp.pad(most, (0, 1))[None, None], (s_n, 1, 3))
    received = exchange_blocks(jnp.concatenate([packed, most_s13], axis=1), route.group.axes)
    layout = BagLayout(received[:, :-1], index_nq, bag_of, jnp.max(received[:, -1, :2], axis=0))
    asked = jnp.where(layout.fits, layout.asked_sc3, -1)  # not fitting: no entry
    return dataclasses.replace(layout, asked_sc3=asked)


def routing(mesh, route, slot_be, local_be, coef_be, given=(None, None)) -> BagLayout:
    """Every device's BagLayout of its [B, E] entries, as global arrays, for ``forward``
    and ``update`` to share (EmbeddingCollection.routing): one layout and one exchange
    of the entries per step instead of two. ``given``: (Ce, Cb), None for the static."""
    all_axes = tuple(mesh.axis_names)
    spec = PartitionSpec(all_axes)

    def shard(slot_be, local_be, coef_be):
        layout = _layout(route, slot_be, local_be, coef_be, given)
        return dataclasses.replace(layout, most=layout.most[None])

    return jax.shard_map(shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        slot_be, local_be, coef_be
    )


def local(layout: BagLayout) -> BagLayout:
    """Inside shard_map: a device's block of ``routing``'s arrays."""
    return dataclasses.replace(layout, most=layout.most[0])


def forward(route, stored_1rd, slot_ne, local_ne, coef_ne, rounds, given=None):
    """[N, K, D] float32 pooled outputs of a device's [N, E] entries (inside shard_map):
    the bag exchange when every device's entries fit, else ``rounds(None)`` (the rows
    exchange's sorted rounds). ``given``: the device's BagLayout (``local(routing)``)."""
    layout = given if given is not None else _layout(route, slot_ne, local_ne, coef_ne)
    axes, s_n, k = route.group.axes, route.group.num_slots, route.num_out
    cb = layout.bag_of_sc.shape[-1]

    def bags(_):
        rows_sx, dst_sx, coef_sx = bag.unpack(layout.asked_sc3)
        if route.kernel != "fused":
            parts = bag_xla.pool_to(stored_1rd[0], rows_sx, dst_sx, coef_sx, cb)
            n = slot_ne.shape[0]
            return bag_xla.pool_parts(exchange_blocks(parts, axes), layout.bag_of_sc, n, k)
        parts_scd = exchange_blocks(bag.pool_to(stored_1rd, rows_sx, dst_sx, coef_sx, cb), axes)
        out_col_q = np.repeat(np.arange(k, dtype=np.int32), s_n)  # column k * S + s -> k
        ones = jnp.ones(layout.index_nq.shape, jnp.float32)
        return fused_route.pool_parts(list(parts_scd), layout.index_nq, ones, out_col_q, k)

    return jax.lax.cond(layout.fits, bags, rounds, None)


def update(
    route,
    stored_1rd,
    slots_1r,
    slot_ne,
    local_ne,
    coef_ne,
    grad_nkd,
    step,
    fallback,
    given=None,
):
    """(table [1, R, D], slots [1, R, ...]) after the sparse optimizer (inside shard_map):
    the bag exchange's update when every device's entries fit (the table is not carried
    through a cond, which would copy it: when they do not fit the layout holds no
    entries), then ``fallback(table, slots)`` (the rows exchange's update) run by a loop
    of 0 or 1 trips. ``given``: the device's BagLayout (``local(routing)``)."""
    layout = given if given is not None else _layout(route, slot_ne, local_ne, coef_ne)
    axes, group = route.group.axes, route.group
    grad_xd = grad_nkd.reshape(-1, grad_nkd.shape[-1])
    # one gather per owner: XLA hands each block to the all_to_all as it is (one [S, Cb]
    # gather was sliced into the S blocks again, a second copy of every sent gradient)
    send_s = [
        jnp.take(grad_xd, bag_of_c, axis=0, mode="fill", fill_value=0.0)
        for bag_of_c in layout.bag_of_sc
    ]
    grads_scd = exchange_blocks(jnp.stack(send_s), axes)
    rows_sx, dst_sx, coef_sx = bag.unpack(layout.asked_sc3)
    received = (stored_1rd, slots_1r, rows_sx, dst_sx, coef_sx)
    if route.kernel == "fused":
        table, slots = bag.update(*received, list(grads_scd), step, group.optimizer)
    else:
        table_rd, slots_r = bag_xla.update(
            stored_1rd[0],
            {name: v[0] for name, v in slots_1r.items()},
            *received[2:],
            grads_scd,
            step,
            group.optimizer,
        )
        table, slots = table_rd[None], {name: v[None] for name, v in slots_r.items()}

    def rows_round(state):
        _, table, slots = state
        return (jnp.int32(0), *fallback(table, slots))

    state = (1 - layout.fits.astype(jnp.int32), table, slots)
    return jax.lax.while_loop(lambda s: s[0] > 0, rows_round, state)[1:]
