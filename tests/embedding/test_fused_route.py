"""The fused CPU kernels of the exchange's local work (lf_jax.embedding.kernels.route and
the update's gradient blocks) against numpy and the XLA path.

Kernels alone: the one-round layout (every entry on its owner's place asking its row,
each distinct key once, first entries, ``fits`` / ``most`` as the XLA layout's, also
under skew and overflow), the owners' gathers, the pool from per-peer blocks, the
gradient sums in the send layout (also at C = 1, E = 1, D = 64; a first entry that is
not its place's earliest is an error), and the update from gradient blocks (bit-equal
to one buffer). Whole steps: every exchanging strategy on (8,) and (2, 4) meshes under
kernel 'fused' and 'xla' against the numpy oracle, with skew (every id on one owner,
zipf), capacities that overflow (exact sorted rounds), and micro-batches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_exchange import SKEW_FEATURES, SKEW_TABLES, assert_skewed_steps_match_oracle, skewed_batch
from test_strategies import MESHES

from lf_jax import embedding as P
from lf_jax.embedding.buckets import Buckets
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.kernels import fused, route
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.testing import embedding_oracle as oracle

KERNELS = ("fused", "xla")


def _entries(kind: str, m: int, num_slots: int, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "one_owner":
        slot = np.zeros(m, np.int32)
    else:
        slot = rng.integers(0, num_slots, m).astype(np.int32)
    if kind == "zipf":
        local = (np.minimum(rng.zipf(1.1, m), rows) - 1).astype(np.int32)
    else:
        local = rng.integers(0, rows, m).astype(np.int32)
    slot[rng.random(m) < 0.3] = -1  # padding
    return slot, local


def _layout(slot, local, num_slots, rows, capacity, kernel):
    def build(slot_m, local_m):
        b = Buckets.build(slot_m, local_m, num_slots, rows, capacity, (), kernel=kernel)
        return b.ask_sc, b.entry_m, b.fits, b.most, b.first_sc

    return [np.asarray(x) for x in jax.jit(build)(jnp.asarray(slot), jnp.asarray(local))]


@pytest.mark.parametrize("kind", ["uniform", "zipf", "one_owner"])
@pytest.mark.parametrize("capacity", [40, 200])
def test_route_places_every_entry_like_the_xla_layout(kind, capacity):
    """Both kernels: the same fits and most; when it fits, every valid entry's place is
    on its owner and asks its row, each owner asks its distinct keys once (the fused
    layout in order of first appearance, led by their first entries)."""
    num_slots, rows, m = 8, 300, 4000
    slot, local = _entries(kind, m, num_slots, rows, seed=capacity)
    valid = slot >= 0
    distinct = {s: np.unique(local[valid & (slot == s)]) for s in range(num_slots)}
    most = max(d.size for d in distinct.values())
    got = {k: _layout(slot, local, num_slots, rows, capacity, k) for k in KERNELS}
    for kernel, (ask, entry, fits, got_most, first) in got.items():
        assert int(got_most) == most, kernel
        assert bool(fits) == (most <= capacity), kernel
        if not fits:
            continue
        np.testing.assert_array_equal((entry // capacity)[valid], slot[valid], err_msg=kernel)
        np.testing.assert_array_equal(ask.reshape(-1)[entry][valid], local[valid])
        for s in range(num_slots):
            asked = ask[s][ask[s] < rows]
            np.testing.assert_array_equal(np.sort(asked), distinct[s], err_msg=kernel)
            assert np.all(ask[s][asked.size :] == rows)
        placed = first < m
        assert np.all(entry[first[placed]] == np.flatnonzero(placed.reshape(-1))), kernel
    ask, entry, fits, _, first = got["fused"]
    if fits:  # first appearance: a key's first entry leads its place, places in that order
        for s in range(num_slots):
            mine = np.flatnonzero(valid & (slot == s))
            _, at = np.unique(local[mine], return_index=True)
            leaders = np.sort(mine[at])
            np.testing.assert_array_equal(first[s][: leaders.size], leaders)


def test_sum_places_matches_numpy():
    """Each place: its first entry's coef x gradient, plus its other entries' in order;
    places without a first start from 0; places outside the layout are skipped."""
    rng = np.random.default_rng(3)
    n, e, k, d, s, c = 40, 6, 3, 8, 4, 10
    place = rng.integers(-2, s * c + 3, (n, e)).astype(np.int32)
    coef = rng.standard_normal((n, e)).astype(np.float32)
    out_col = rng.integers(0, k, e).astype(np.int32)
    grad = rng.standard_normal((n, k, d)).astype(np.float32)
    flat = place.reshape(-1)
    first = np.full(s * c, n * e, np.int32)
    for p in range(s * c):  # a first for every other place that has entries
        hits = np.flatnonzero(flat == p)
        if hits.size and p % 2 == 0:
            first[p] = hits[0]
    expected = np.zeros((s * c, d), np.float64)
    for m in range(n * e):
        if 0 <= flat[m] < s * c:
            expected[flat[m]] += coef.flat[m] * grad[m // e, out_col[m % e]]
    for first_sc in (first.reshape(s, c), np.full((s, c), n * e, np.int32)):
        got = jax.jit(route.sum_places, static_argnums=3)(
            place, first_sc, coef, tuple(out_col.tolist()), grad
        )
        np.testing.assert_allclose(
            np.asarray(got).reshape(s * c, d), expected, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gather_asked_and_pool_parts_match_numpy(dtype):
    rng = np.random.default_rng(4)
    rows, d, s, c, n, e = 50, 8, 4, 6, 10, 5
    table = jnp.asarray(rng.standard_normal((1, rows, d)), dtype)
    asked = rng.integers(0, rows + 2, (s, c)).astype(np.int32)  # rows, rows + 1: empty
    got = np.asarray(jax.jit(route.gather_asked)(table, asked))
    want = np.where(
        (asked < rows)[..., None], np.asarray(table[0], np.float32)[np.minimum(asked, rows - 1)], 0
    )
    np.testing.assert_array_equal(got, want)

    index = rng.integers(-1, s * c, (n, e)).astype(np.int32)
    coef = rng.standard_normal((n, e)).astype(np.float32)
    out_col = np.asarray([0, 0, 1, 1, 2], np.int32)
    pooled = jax.jit(route.pool_parts, static_argnums=(3, 4))(
        list(got), index, coef, tuple(out_col.tolist()), 3
    )
    flat = got.reshape(s * c, d)
    want = np.zeros((n, 3, d), np.float32)
    for i in range(n):
        for j in range(e):
            if index[i, j] >= 0:
                want[i, out_col[j]] += coef[i, j] * flat[index[i, j]]
    np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-6, atol=1e-6)


def _first_entries(place_ne, num_places):
    """[P] int32: each place's earliest entry (flat n * E + e), N * E where none."""
    flat = place_ne.reshape(-1)
    first = np.full(num_places, flat.size, np.int32)
    for m in range(flat.size - 1, -1, -1):
        if 0 <= flat[m] < num_places:
            first[flat[m]] = m
    return first


@pytest.mark.parametrize("dim,capacity,width", [(64, 1, 1), (64, 7, 3), (8, 13, 5), (24, 5, 1)])
def test_sum_places_and_pool_parts_at_edge_shapes(dim, capacity, width):
    """The kernels' index arithmetic (a place's block p / C and an entry's example m / E
    by multiplies, D = 64 unrolled) at C = 1, E = 1, D = 64 and odd shapes, == numpy."""
    rng = np.random.default_rng(dim + capacity + width)
    n, k, s = 23, 3, 4
    place = rng.integers(-1, s * capacity + 2, (n, width)).astype(np.int32)
    coef = rng.standard_normal((n, width)).astype(np.float32)
    out_col = rng.integers(0, k, width).astype(np.int32)
    grad = rng.standard_normal((n, k, dim)).astype(np.float32)
    flat = place.reshape(-1)
    expected = np.zeros((s * capacity, dim), np.float64)
    for m in range(n * width):
        if 0 <= flat[m] < s * capacity:
            expected[flat[m]] += coef.flat[m] * grad[m // width, out_col[m % width]]
    first = _first_entries(place, s * capacity).reshape(s, capacity)
    for first_sc in (first, np.full((s, capacity), n * width, np.int32)):
        got = jax.jit(route.sum_places, static_argnums=3)(
            place, first_sc, coef, tuple(out_col.tolist()), grad
        )
        np.testing.assert_allclose(np.asarray(got).reshape(-1, dim), expected, rtol=1e-5, atol=1e-5)
    rows = rng.standard_normal((s, capacity, dim)).astype(np.float32)
    pooled = jax.jit(route.pool_parts, static_argnums=(3, 4))(
        list(rows), place, coef, tuple(out_col.tolist()), k
    )
    flat_rows = rows.reshape(-1, dim)
    want = np.zeros((n, k, dim), np.float64)
    for i in range(n):
        for j in range(width):
            if place[i, j] >= 0:  # past the rows: the last row (clamped)
                want[i, out_col[j]] += coef[i, j] * flat_rows[min(place[i, j], s * capacity - 1)]
    np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-5, atol=1e-5)


def test_sum_places_rejects_an_entry_before_its_first():
    """sum_places sums in one pass: a place's first entry must be its earliest (as the
    route kernel's first appearance is); an earlier entry is an error, not a wrong sum."""
    place = np.asarray([[0, 1, 0]], np.int32)
    first = np.asarray([[2, 1]], np.int32)  # entry 0 comes before place 0's "first" 2
    grad = np.ones((1, 1, 4), np.float32)
    with pytest.raises(Exception, match="precedes its place's first entry"):
        jax.block_until_ready(
            route.sum_places(place, first, np.ones((1, 3), np.float32), (0, 0, 0), grad)
        )


def test_update_from_gradient_blocks_equals_one_buffer():
    """The owners' update reads each sender's block as the all_to_all delivered it: the
    same table and slots, bit for bit, as from the concatenated gradients."""
    rng = np.random.default_rng(5)
    rows, d, blocks, c = 30, 8, 4, 12
    row_k = rng.integers(0, rows + 1, (blocks * c, 1)).astype(np.int32)  # rows: empty
    grad = rng.standard_normal((blocks * c, 1, d)).astype(np.float32)
    table = rng.standard_normal((rows, d)).astype(np.float32)
    slots = {"accumulator": np.zeros((rows,), np.float32)}
    opt = rowwise_adagrad(0.5)
    one, cols = np.zeros(1, np.int32), np.zeros((1, 1), np.int32)

    def apply(g):
        coef = jnp.ones(row_k.shape, jnp.float32)
        return fused.update(jnp.asarray(table), slots, row_k, coef, one, cols, g, 1, opt)

    whole = jax.jit(apply)(jnp.asarray(grad))
    parts = jax.jit(apply)([jnp.asarray(g) for g in np.split(grad, blocks)])
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


CASES = [
    ("zipf", "d8", P.row_wise(("data",)), None),
    ("one_owner", "d2m4", P.row_wise(("data", "model")), None),
    ("one_owner", "d4m2", P.table_wise_row_wise(1, "data"), None),
    ("zipf", "d2m4", P.table_wise_row_wise(0, "model"), None),
    ("zipf", "d8", P.column_wise(2), None),
    ("zipf", "d2m4", P.row_wise(("model",)), 2),  # replicated, overflowing: sorted rounds
    ("one_owner", "d8", P.row_wise(("data",)), 3),  # every step overflows
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "kind,mesh_name,strategy,capacity",
    CASES,
    ids=[
        "zipf_rw_d8",
        "one_owner_rw_d2m4",
        "one_owner_twrw_d4m2",
        "zipf_twrw_d2m4",
        "zipf_cw_d8",
        "zipf_rw_model_d2m4_c2",
        "one_owner_rw_d8_c3",
    ],
)
def test_exchanging_strategies_match_oracle(kernel, kind, mesh_name, strategy, capacity, mesh_of):
    coll = EmbeddingCollection(
        SKEW_TABLES,
        SKEW_FEATURES,
        {t.name: strategy for t in SKEW_TABLES},
        mesh_of(MESHES[mesh_name]),
        kernel=kernel,
    )
    assert set(coll.kernels.values()) <= {kernel}
    capacities = None if capacity is None else {r.group.name: capacity for r in coll.routes}
    assert_skewed_steps_match_oracle(coll, kind, shared_routing=True, capacities=capacities)


@pytest.mark.parametrize("mesh_name", ["d8", "d2m4"])
def test_microbatched_exchange_equals_one_big_batch(mesh_name, mesh_of):
    """k micro-batches through the fused exchange, summed and applied once == the
    concatenated batch (micro-batching changes no row sum's order at the owners: equal
    to float rounding), and == the XLA path."""
    mesh = mesh_of(MESHES[mesh_name])
    k, micro = 2, 16
    results = {}
    for kernel in KERNELS:
        coll = EmbeddingCollection(
            SKEW_TABLES,
            SKEW_FEATURES,
            {t.name: P.row_wise(tuple(mesh.axis_names)) for t in SKEW_TABLES},
            mesh,
            kernel=kernel,
        )
        hosts = [coll.preprocess(*skewed_batch("zipf", 10 + i)) for i in range(k)]
        hosts = [jax.tree.map(lambda x: x[:micro], h) for h in hosts]
        stacked, flat = oracle.stacked_micro_batches(hosts)
        rng = np.random.default_rng(0)
        grads = {
            f.name: rng.standard_normal(
                (k, micro, f.max_ids, 8) if f.combiner == "none" else (k, micro, 8)
            ).astype(np.float32)
            for f in SKEW_FEATURES
        }
        state = coll.state_from_logical(oracle.row_id_coded_tables(SKEW_TABLES))
        apply = jax.jit(coll.apply_gradients, static_argnames="microbatched")
        accumulated = apply(state, coll.shard_batch(stacked, 1), grads, microbatched=True)
        flat_grads = {n: g.reshape(k * micro, *g.shape[2:]) for n, g in grads.items()}
        once = apply(state, coll.shard_batch(flat), flat_grads)
        for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(once), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        results[kernel] = jax.device_get(jax.jit(coll.to_logical)(accumulated))
    for a, b in zip(
        jax.tree.leaves(results["fused"]), jax.tree.leaves(results["xla"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
