"""The bag-mode kernels (lf_jax.embedding.kernels.bag) and their XLA path
(lf_jax.embedding.bag_xla) against numpy oracles: the requester's layout, the owner's
pool into partial bags and the owner's update (SGD, row-wise Adagrad, Adam; float32
and bfloat16 tables)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding import bag_xla
from lf_jax.embedding.kernels import bag
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd

S, K, D, R = 4, 3, 8, 50
PATHS = pytest.mark.parametrize("path", [bag, bag_xla], ids=["fused", "xla"])


def _entries(rng, n, e, padding=0.3):
    slot = rng.integers(0, S, (n, e)).astype(np.int32)
    slot[rng.random((n, e)) < padding] = -1
    local = rng.integers(0, R, (n, e)).astype(np.int32)
    coef = rng.normal(size=(n, e)).astype(np.float32)
    out_col = np.sort(rng.integers(0, K, e)).astype(np.int32)
    return slot, local, coef, out_col


def _layout_oracle(slot, local, coef, out_col, ce, cb):
    n, e = slot.shape
    packed = np.zeros((S, ce, 3), np.int32)
    packed[..., 0] = packed[..., 1] = -1
    index = np.full((n, K * S), -1, np.int32)
    bag_of = np.full((S, cb), n * K, np.int32)
    entries, bags = [0] * S, [0] * S
    slot_of = {}
    for i in range(n):
        for j in range(e):
            s = slot[i, j]
            if s < 0:
                continue
            key = (i, out_col[j], s)
            if key not in slot_of:
                slot_of[key] = bags[s]
                if bags[s] < cb:
                    index[i, out_col[j] * S + s] = s * cb + bags[s]
                    bag_of[s, bags[s]] = i * K + out_col[j]
                bags[s] += 1
            if entries[s] < ce and slot_of[key] < cb:
                packed[s, entries[s]] = (local[i, j], slot_of[key], coef[i, j].view(np.int32))
            entries[s] += 1
    return packed, index, bag_of, np.array([max(entries), max(bags)], np.int32)


@PATHS
@pytest.mark.parametrize("ce, cb", [(64, 64), (5, 3)])  # roomy; overflowing
def test_layout_equals_oracle(ce, cb, path):
    slot, local, coef, out_col = _entries(np.random.default_rng(0), 12, 7)
    got = jax.jit(path.layout, static_argnums=(3, 4, 5, 6, 7))(
        slot, local, coef, tuple(out_col), S, K, ce, cb
    )
    want = _layout_oracle(slot, local, coef, out_col, ce, cb)
    for g, w, name in zip(got, want, ("packed", "index", "bag_of", "most"), strict=True):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)


@PATHS
def test_pool_to_equals_oracle(path):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(R, D)).astype(np.float32)
    rows = rng.integers(-1, R + 2, (S, 9)).astype(np.int32)
    dst = rng.integers(-1, 6, (S, 9)).astype(np.int32)
    coef = rng.normal(size=(S, 9)).astype(np.float32)
    got = np.asarray(jax.jit(path.pool_to, static_argnums=4)(table, rows, dst, coef, 5))
    want = np.zeros((S, 5, D), np.float32)
    for s in range(S):
        for i in range(9):
            if 0 <= rows[s, i] < R and 0 <= dst[s, i] < 5:
                want[s, dst[s, i]] += coef[s, i] * table[rows[s, i]]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer, dtype",
    [
        (sgd(0.1), jnp.float32),
        (rowwise_adagrad(0.2), jnp.float32),
        (adam(0.05), jnp.float32),
        (rowwise_adagrad(0.2), jnp.bfloat16),
    ],
)
@PATHS
def test_update_equals_oracle(optimizer, dtype, path):
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(R, D)), dtype)
    slots = {
        k: jnp.full((R, *shape), optimizer.slot_init(k), jnp.float32)
        for k, shape in optimizer.slot_shapes(D).items()
    }
    rows = rng.integers(-1, 20, (S, 11)).astype(np.int32)  # repeated rows across senders
    dst = rng.integers(-1, 6, (S, 11)).astype(np.int32)
    coef = rng.normal(size=(S, 11)).astype(np.float32)
    grads = rng.normal(size=(S, 5, D)).astype(np.float32)
    step = jnp.int32(3)
    run = jax.jit(lambda t, sl: path.update(t, sl, rows, dst, coef, grads, step, optimizer))
    got_table, got_slots = run(table, slots)

    sums: dict[int, np.ndarray] = {}
    for s in range(S):
        for i in range(11):
            if 0 <= rows[s, i] < R and 0 <= dst[s, i] < 5:
                sums[int(rows[s, i])] = (
                    sums.get(int(rows[s, i]), 0) + coef[s, i] * grads[s, dst[s, i]]
                )
    touched = np.array(sorted(sums))
    grads_ud = jnp.asarray(np.stack([sums[r] for r in touched]))
    delta, new_slots = optimizer.delta(grads_ud, {k: v[touched] for k, v in slots.items()}, step)
    want_table = np.array(table.astype(jnp.float32))
    want_table[touched] = np.asarray(
        (table[touched].astype(jnp.float32) + delta).astype(dtype).astype(jnp.float32)
    )
    np.testing.assert_allclose(
        np.asarray(got_table.astype(jnp.float32)), want_table, rtol=1e-5, atol=1e-6
    )
    for k in slots:
        want = np.array(slots[k])
        want[touched] = np.asarray(new_slots[k])
        np.testing.assert_allclose(np.asarray(got_slots[k]), want, rtol=1e-5, atol=1e-7)
